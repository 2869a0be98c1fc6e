//! Transactional mode on MySQL and MariaDB (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's insert takes the row's lock on a duplicate, then a locking read and the
//! store's take-over.

use super::statements::Statements;
use crate::store::Token;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture};
use crate::stores::sql::common::tx::{Prepared, prepared};
use crate::stores::sql::common::{self, BindExt, SqlDialect, Steps, TableName};
use crate::stores::sql::common::{Plan, RowView};
use sqlx::SqlStr;
use sqlx::mysql::MySql;
use std::collections::BTreeMap;
use std::sync::RwLock;

static MYSQL: Prepared<MySqlTx> = RwLock::new(BTreeMap::new());

/// The MySQL store's statements plus the two locking ones of tx mode.
struct MySqlTx {
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

impl DedupTransaction for sqlx::Transaction<'_, MySql> {
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome> {
        Box::pin(async move {
            let s = prepared(&MYSQL, table, MySqlTx::new)?;
            let conn = &mut **self;
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
        })
    }

    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        c: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence> {
        Box::pin(async move {
            let s = prepared(&MYSQL, table, MySqlTx::new)?;
            let steps = &s.store.steps;
            Steps::<MySql>::complete_in(&mut **self, steps.complete_query(c), steps.read_query(c.key), c).await
        })
    }
}
