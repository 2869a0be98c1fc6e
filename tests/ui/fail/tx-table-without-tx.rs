use idempotent_runtime::{Error, idempotent};

struct Payment {
    id: String,
}

#[idempotent(key = "payment.id", table = "payments_dedup")]
async fn pay(payment: &Payment) -> Result<(), Error> {
    let _ = &payment.id;
    Ok(())
}

fn main() {}
