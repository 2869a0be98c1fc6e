use idempotent_runtime::outbox::Outbox;
use idempotent_runtime::{Error, idempotent};

struct Payment {
    id: String,
}

#[idempotent(key = "payment.id", outbox = "outbox")]
async fn pay(payment: &Payment, outbox: &mut Outbox) -> Result<(), Error> {
    outbox.emit("receipts", payment.id.clone());
    Ok(())
}

fn main() {}
