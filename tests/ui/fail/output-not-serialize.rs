use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
}

struct Receipt {
    id: String,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) -> Result<Receipt, Error> {
    Ok(Receipt { id: msg.id.clone() })
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
