//! Transactional mode on PostgreSQL (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's own claim statement, which locks what it writes.

use super::statements::Statements;
use super::{PostgresStore, storable};
use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture};
use crate::stores::sql::common::RowView;
use crate::stores::sql::common::tx::{Prepared, prepared};
use crate::stores::sql::common::{self, BindExt, CLAIM_RETRIES, SqlDatabase, TableName};
use sqlx::postgres::Postgres;
use std::collections::BTreeMap;
use std::sync::RwLock;

static POSTGRES: Prepared<PostgresTx> = RwLock::new(BTreeMap::new());

/// The PostgreSQL store's statements: its claim already locks what it writes.
struct PostgresTx(Statements);

impl PostgresTx {
    fn new(table: TableName) -> Self {
        PostgresTx(Statements::new(table))
    }
}

fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    Postgres::err(op)
}

impl DedupTransaction for sqlx::Transaction<'_, Postgres> {
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome> {
        Box::pin(async move {
            let s = prepared(&POSTGRES, table, PostgresTx::new)?;
            storable(req.key)?;
            for _ in 0..CLAIM_RETRIES {
                let row = sqlx::query(s.0.claim.clone())
                    .bind_claim(req)
                    .bind(None::<i32>)
                    .fetch_optional(&mut **self)
                    .await
                    .map_err(err("claim in transaction"))?;
                // no row: the statement waited for a concurrent claimant that
                // committed after its snapshot; the next statement sees that row
                // (READ COMMITTED). Under REPEATABLE READ and SERIALIZABLE the
                // insert fails with a serialization failure instead.
                if let Some(row) = row
                    && let Some(outcome) = PostgresStore::decode_claim(&row, 0, req)?
                {
                    return Ok(outcome);
                }
            }
            Err(common::contended())
        })
    }

    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        c: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence> {
        Box::pin(async move {
            let s = prepared(&POSTGRES, table, PostgresTx::new)?;
            storable(c.key)?;
            let q = sqlx::query(s.0.complete.clone()).bind_completion(c);
            let conn = &mut **self;
            let op = "complete in transaction";
            if common::execute(&mut *conn, q, err(op)).await? > 0 {
                return Ok(Fence::Held);
            }
            let row = sqlx::query(s.0.inspect.clone())
                .bind_key(c.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(err(op))?;
            let seen = row.map(|r| RowView::decode(&r, 0, c.key.scope()));
            Ok(common::unmatched_fence(
                seen.transpose()?,
                common::Step::Complete(c.token),
            ))
        })
    }
}
