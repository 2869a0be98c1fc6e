//! What the outbox needs of a transaction: [`OutboxTransaction`], implemented by the
//! SQL stores for `sqlx::Transaction` and driven by the transactional protocol.

use super::message::Outbox;
use crate::store::TxFuture;

/// The outbox table of `#[idempotent(tx = "…", outbox = "…")]` and of the SQL stores'
/// outbox, when none is named.
pub const DEFAULT_OUTBOX_TABLE: &str = idempotent_shared::DEFAULT_OUTBOX_TABLE;

/// A transaction the messages of an [`Outbox`] can be written in, beside the business
/// writes and the dedup row of `#[idempotent(tx = "…", outbox = "…")]`.
///
/// With the runtime's `mysql`, `postgres` and `sqlite` features,
/// `sqlx::Transaction<'_, MySql>`, `<'_, Postgres>` and `<'_, Sqlite>` implement it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a SQL transaction outbox messages can be written in",
    label = "`tx = …` names this parameter",
    note = "`outbox = \"PARAM\"` needs `tx = \"PARAM\"` of type `&mut sqlx::Transaction<'_, DB>`, \
            for `DB` = `MySql`, `Postgres` or `Sqlite` (use the driver re-exported as `idempotent_runtime::sqlx`)"
)]
pub trait OutboxTransaction: Send {
    /// Writes the messages of `outbox` (bound to the execution's key, checked with
    /// [`Outbox::check`]) as pending rows of the outbox table `table`, in this
    /// transaction, in one statement where the database allows. An id already in the
    /// table is an error (the same execution's messages written twice).
    fn enqueue_in_tx<'a>(&'a mut self, table: &'a str, outbox: &'a Outbox) -> TxFuture<'a, ()>;
}
