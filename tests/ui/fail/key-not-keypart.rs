use idempotent_runtime::{Error, idempotent};

struct OrderId(u64);

struct Msg {
    id: OrderId,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = msg.id.0;
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: OrderId(1) });
}
