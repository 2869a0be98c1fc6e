//! Transactional mode on SQLite (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's insert, then on a duplicate its read and take-over, under the
//! database's write lock.

use super::statements::Statements;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture};
use crate::stores::sql::common::tx::{Prepared, prepared};
use crate::stores::sql::common::{self, SqlDialect, Steps, TableName};
use crate::stores::sql::common::{Plan, RowView};
use sqlx::sqlite::Sqlite;
use std::collections::BTreeMap;
use std::sync::RwLock;

static SQLITE: Prepared<SqliteTx> = RwLock::new(BTreeMap::new());

/// The SQLite store's statements; the transaction holds the database's write lock
/// from its first write, so reads after the insert see the latest rows.
struct SqliteTx(Statements);

impl SqliteTx {
    fn new(table: TableName) -> Self {
        SqliteTx(Statements::new(table))
    }
}

impl DedupTransaction for sqlx::Transaction<'_, Sqlite> {
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome> {
        Box::pin(async move {
            let s = prepared(&SQLITE, table, SqliteTx::new)?;
            let s = &s.0;
            let conn = &mut **self;
            let err = || Sqlite::err("claim in transaction");
            common::retrying!({
                let inserted = s.write_claim(conn, req, Plan::Insert, None, err());
                if let Some(outcome) = inserted.await? {
                    return Ok(outcome);
                }
                let row = s
                    .steps
                    .read_query(req.key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(err())?;
                let Some(row) = row else { continue };
                let plan = Plan::of(req, Some(RowView::decode(&row, 0, req.key.scope())?));
                s.write_claim(conn, req, plan, None, err()).await?
            })
        })
    }

    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        c: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence> {
        Box::pin(async move {
            let s = prepared(&SQLITE, table, SqliteTx::new)?;
            let s = &s.0;
            let steps = &s.steps;
            Steps::<Sqlite>::complete_in(&mut **self, steps.complete_query(c), steps.read_query(c.key), c).await
        })
    }
}
