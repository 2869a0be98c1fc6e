//! Transactional mode on MySQL and MariaDB (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's insert takes the row's lock on a duplicate, then a locking read and the
//! store's take-over.

use super::statements::Statements;
use crate::error::StoreError;
use crate::store::{ClaimOutcome, Token};
use crate::stores::sql::common::tx::TxClaim;
use crate::stores::sql::common::{self, BindExt, Plan, TableName, read_row};
use sqlx::SqlStr;
use sqlx::mysql::MySql;
use std::ops::Deref;

/// The MySQL store's statements plus the two locking ones of tx mode.
pub(crate) struct MySqlTx {
    store: Statements,
    /// The store's insert; on a duplicate key it takes the existing row's
    /// exclusive lock (waiting for a concurrent claimant's transaction to end)
    /// and changes nothing. `LAST_INSERT_ID(0)` on that path tells the two apart:
    /// the OK packet carries the new token after an insert, 0 after a duplicate.
    insert_or_lock: SqlStr,
    /// The store's read as a locking read: the latest committed version, whatever
    /// the isolation level's snapshot.
    read_for_update: SqlStr,
}

impl MySqlTx {
    fn new(table: TableName) -> Self {
        let s = Statements::new(table);
        MySqlTx {
            insert_or_lock: common::sql(format!(
                "{} ON DUPLICATE KEY UPDATE owner_token = owner_token + LAST_INSERT_ID(0)",
                s.plans.insert.as_str()
            )),
            read_for_update: common::sql(format!("{} FOR UPDATE", s.steps.read.as_str())),
            store: s,
        }
    }
}

/// The store's statements among them.
impl Deref for MySqlTx {
    type Target = Statements;

    fn deref(&self) -> &Statements {
        &self.store
    }
}

common::tx::tx_mode!(MySql, MySqlTx, claim_once);

/// One attempt: the insert, or on a duplicate the locking read and the take-over.
async fn claim_once(c: TxClaim<'_, MySql, MySqlTx>) -> Result<Option<ClaimOutcome>, StoreError> {
    let (err, req) = (c.err(), c.req);
    let done = sqlx::query(c.sql.insert_or_lock.clone())
        .bind_claim(req)
        .execute(&mut *c.conn)
        .await
        .map_err(&err)?;
    if done.last_insert_id() != 0 {
        let token = Token(done.last_insert_id());
        return Ok(Some(ClaimOutcome::Acquired { token, attempt: 1 }));
    }
    let read = sqlx::query(c.sql.read_for_update.clone()).bind_key(req.key);
    // deleted between the two statements (forget, purge): insert again
    let Some(seen) = read_row(&mut *c.conn, read, req.key.scope(), &err).await? else {
        return Ok(None);
    };
    // the row is locked by this transaction: the compare-and-set holds
    let plan = Plan::of(req, Some(seen));
    c.sql.write_claim(&mut *c.conn, req, plan, &err).await
}
