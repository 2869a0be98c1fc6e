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
//! This file holds what the three share, the statements prepared per table; each
//! database implements [`DedupTransaction`](crate::store::DedupTransaction) in its own
//! folder (`mysql/tx.rs`, `postgres/tx.rs`, `sqlite/tx.rs`).

use super::base::TableName;
use crate::error::StoreError;
use crate::error::StoreErrorKind;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

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
