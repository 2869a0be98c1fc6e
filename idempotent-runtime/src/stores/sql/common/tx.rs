//! Transactional mode (`#[idempotent(tx = "…")]`): the claim and the completion are
//! written through the caller's `sqlx::Transaction`, so the dedup row commits or rolls
//! back with the handler's own writes.
//!
//! Each database reuses its store's statements (same table, same columns, same
//! database clock), so `inspect` and `forget` of the stores see tx-mode rows:
//!
//! | step | MySQL / MariaDB | PostgreSQL | SQLite |
//! | --- | --- | --- | --- |
//! | claim | `INSERT … ON DUPLICATE KEY UPDATE` (inserts, or takes the row's exclusive lock); on a duplicate `SELECT … FOR UPDATE`, then the store's take-over `UPDATE` if the row is claimable | the store's claim statement (`INSERT … ON CONFLICT DO UPDATE … WHERE <claimable>` in a CTE; the insert waits on a concurrent claimant's row lock) | the store's `INSERT … ON CONFLICT DO NOTHING RETURNING`; on a duplicate the store's read, then its take-over `UPDATE … RETURNING` |
//! | complete | the store's `UPDATE … SET status = 1, output = ?` (compare-and-set on the token) | the same | the same |
//!
//! The claim is written with a lease that ends at once: the transaction's row lock is
//! what keeps a concurrent duplicate out, and a claim that is committed without a
//! completion (the caller committed after a handler error) is claimable again at once.
//!
//! This file holds what the three share: the statements prepared per table, and the
//! one [`DedupTransaction`] implementation, whose completion is the stores' (the
//! compare-and-set `UPDATE`, then the fence check); each database gives its
//! statements and its claim ([`TxDialect`]) in its own folder (`mysql/tx.rs`,
//! `postgres/tx.rs`, `sqlite/tx.rs`).

use super::base::{BindExt, SqlDialect, TableName};
use super::row::Columns;
use super::steps::{SqlQuery, StepSql, Steps};
use crate::error::StoreError;
use crate::error::StoreErrorKind;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture};
use sqlx::{Executor, IntoArguments};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};

/// What transactional mode differs in per database: the statements it prepares per
/// table, and the claim.
pub(crate) trait TxDialect: SqlDialect {
    /// The statements of one table.
    type Sql: Send + Sync + 'static;
    /// The statements of `table`, built on first use; a bad name is a
    /// [`StoreErrorKind::Rejected`] error.
    fn prepared(table: &str) -> Result<Arc<Self::Sql>, StoreError>;
    /// The statements of the shared steps among them.
    fn steps(sql: &Self::Sql) -> &StepSql;
    /// Claims `req` on `conn`, the caller's transaction.
    fn claim_in<'a>(
        conn: &'a mut Self::Connection,
        sql: &'a Self::Sql,
        req: &'a ClaimRequest<'a>,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send + 'a;
}

impl<DB> DedupTransaction for sqlx::Transaction<'_, DB>
where
    DB: TxDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    DB::Row: Columns,
    for<'a> SqlQuery<'a, DB>: BindExt,
{
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome> {
        Box::pin(async move {
            let sql = DB::prepared(table)?;
            DB::storable(req.key)?;
            DB::claim_in(&mut **self, &sql, req).await
        })
    }

    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        c: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence> {
        Box::pin(async move {
            let sql = DB::prepared(table)?;
            DB::storable(c.key)?;
            let steps = DB::steps(&sql);
            let (complete, read) = (steps.complete_query(c), steps.read_query(c.key));
            Steps::<DB>::complete_in(&mut **self, complete, read, c).await
        })
    }
}

/// The statements of each dedup table a transactional handler used, by table name,
/// built on first use; a bad table name is kept as its error message.
pub(crate) type Prepared<S> = RwLock<BTreeMap<Box<str>, Result<Arc<S>, String>>>;

pub(crate) fn prepared<S>(
    cache: &Prepared<S>,
    table: &str,
    build: fn(TableName) -> S,
) -> Result<Arc<S>, StoreError> {
    let known = cache
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(table)
        .cloned();
    let built = match known {
        Some(b) => b,
        None => {
            let built = TableName::parse(table)
                .map(|t| Arc::new(build(t)))
                .map_err(|e| e.to_string());
            cache
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(table.into())
                .or_insert(built)
                .clone()
        }
    };
    built.map_err(|e| StoreError::new(StoreErrorKind::Rejected, e))
}
