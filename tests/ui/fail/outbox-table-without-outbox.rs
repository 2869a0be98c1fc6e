use idempotent_runtime::{Error, idempotent};

struct Payment {
    id: String,
}

/// Stands in for `sqlx::Transaction<'_, Postgres>` (the UI cases build without drivers).
struct Transaction;

#[idempotent(key = "payment.id", tx = "tx", outbox_table = "billing_outbox")]
async fn pay(payment: &Payment, tx: &mut Transaction) -> Result<(), Error> {
    let _ = (&payment.id, tx);
    Ok(())
}

fn main() {}
