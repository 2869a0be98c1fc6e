//! What transactional mode needs of a transaction: [`DedupTransaction`], implemented by
//! the SQL stores for `sqlx::Transaction` and driven by the protocol.

use super::types::{ClaimOutcome, ClaimRequest, Completion, Fence};
use crate::error::StoreError;
use std::future::Future;
use std::pin::Pin;

/// The boxed future of a [`DedupTransaction`] step.
pub type TxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A transaction the dedup record of `#[idempotent(tx = "…")]` can be written in.
///
/// With the runtime's `mysql`, `postgres` and `sqlite` features,
/// `sqlx::Transaction<'_, MySql>`, `<'_, Postgres>` and `<'_, Sqlite>` implement it on
/// the SQL stores' tables. Another transaction type can implement it to take part in
/// transactional mode; both steps follow the rules of [`Store::claim`] and
/// [`Store::complete`](crate::Store::complete), except that an acquired claim holds
/// the row's lock until the transaction ends instead of a lease.
///
/// [`Store::claim`]: crate::Store::claim
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a SQL transaction the dedup record can be written in",
    label = "`tx = …` names this parameter",
    note = "`tx = \"PARAM\"` takes a parameter of type `&mut sqlx::Transaction<'_, DB>` that the caller begins and commits, \
            for `DB` = `MySql`, `Postgres` or `Sqlite` (use the driver re-exported as `idempotent_runtime::sqlx`)",
    note = "enable the matching feature of `idempotent-runtime`: `mysql`, `postgres` or `sqlite`"
)]
pub trait DedupTransaction: Send {
    /// Claims the key in the dedup table `table` inside the transaction; see
    /// [`ClaimOutcome`]. An acquired claim holds the row's lock until the transaction
    /// ends. `table` is a table name the attribute checked; an implementation checks it
    /// again and answers [`StoreErrorKind::Rejected`](super::StoreErrorKind::Rejected)
    /// for a name it cannot use.
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome>;

    /// Marks the claimed key Completed with its output, in the same transaction.
    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a str,
        completion: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence>;
}
