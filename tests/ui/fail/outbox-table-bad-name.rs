use idempotent_runtime::outbox::Outbox;
use idempotent_runtime::{Error, idempotent};

struct Payment {
    id: String,
}

/// Stands in for `sqlx::Transaction<'_, Postgres>` (the UI cases build without drivers).
struct Transaction;

#[idempotent(key = "payment.id", tx = "tx", outbox = "outbox", outbox_table = "outbox; DROP TABLE x")]
async fn pay(payment: &Payment, tx: &mut Transaction, outbox: &mut Outbox) -> Result<(), Error> {
    let _ = (&payment.id, tx, outbox);
    Ok(())
}

fn main() {}
