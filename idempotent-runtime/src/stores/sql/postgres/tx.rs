//! Transactional mode on PostgreSQL (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's own claim statement, which locks what it writes.

use super::statements::Statements;
use super::PostgresStore;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture};
use crate::stores::sql::common::tx::{Prepared, prepared};
use crate::stores::sql::common::{self, BindExt, SqlDialect, Steps, TableName};
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

impl DedupTransaction for sqlx::Transaction<'_, Postgres> {
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome> {
        Box::pin(async move {
            let s = prepared(&POSTGRES, table, PostgresTx::new)?;
            Postgres::storable(req.key)?;
            let conn = &mut **self;
            common::retrying!({
                let row = sqlx::query(s.0.claim.clone())
                    .bind_claim(req)
                    .bind(None::<i32>)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(Postgres::err("claim in transaction"))?;
                // no row: the statement waited for a concurrent claimant that
                // committed after its snapshot; the next statement sees that row
                // (READ COMMITTED). Under REPEATABLE READ and SERIALIZABLE the
                // insert fails with a serialization failure instead.
                match row {
                    Some(row) => PostgresStore::decode_claim(&row, 0, req)?,
                    None => None,
                }
            })
        })
    }

    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        c: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence> {
        Box::pin(async move {
            let s = prepared(&POSTGRES, table, PostgresTx::new)?;
            Postgres::storable(c.key)?;
            let steps = &s.0.steps;
            Steps::<Postgres>::complete_in(&mut **self, steps.complete_query(c), steps.read_query(c.key), c).await
        })
    }
}
