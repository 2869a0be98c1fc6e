//! Transactional mode on MySQL and MariaDB (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's insert takes the row's lock on a duplicate, then a locking read and the
//! store's take-over.

use super::statements::Statements;
use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest, Token};
use crate::stores::sql::common::tx::{Prepared, TxDialect, prepared};
use crate::stores::sql::common::{self, BindExt, SqlDialect, StepSql, TableName};
use crate::stores::sql::common::{Plan, RowView};
use sqlx::SqlStr;
use sqlx::mysql::{MySql, MySqlConnection};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

static MYSQL: Prepared<MySqlTx> = RwLock::new(BTreeMap::new());

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
                s.insert.as_str()
            )),
            read_for_update: common::sql(format!("{} FOR UPDATE", s.steps.read.as_str())),
            store: s,
        }
    }
}

impl TxDialect for MySql {
    type Sql = MySqlTx;

    fn prepared(table: &str) -> Result<Arc<MySqlTx>, StoreError> {
        prepared(&MYSQL, table, MySqlTx::new)
    }

    fn steps(sql: &MySqlTx) -> &StepSql {
        &sql.store.steps
    }

    async fn claim_in<'a>(
        conn: &'a mut MySqlConnection,
        s: &'a MySqlTx,
        req: &'a ClaimRequest<'a>,
    ) -> Result<ClaimOutcome, StoreError> {
        let err = || MySql::err("claim in transaction");
        common::retrying!({
            let done = sqlx::query(s.insert_or_lock.clone())
                .bind_claim(req)
                .execute(&mut *conn)
                .await
                .map_err(err())?;
            if done.last_insert_id() != 0 {
                return Ok(ClaimOutcome::Acquired {
                    token: Token(done.last_insert_id()),
                    attempt: 1,
                });
            }
            let row = sqlx::query(s.read_for_update.clone())
                .bind_key(req.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(err())?;
            // deleted between the two statements (forget, purge): insert again
            let Some(row) = row else { continue };
            // the row is locked by this transaction: the compare-and-set holds
            let plan = Plan::of(req, Some(RowView::decode(&row, 0, req.key.scope())?));
            s.store.write_claim(&mut *conn, req, plan, err()).await?
        })
    }
}
