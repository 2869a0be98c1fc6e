use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
    amount: u64,
}

#[idempotent(key = "msg.id", fingerprint = "(msg.amount, body)")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = (&msg.id, msg.amount);
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new(), amount: 0 });
}
