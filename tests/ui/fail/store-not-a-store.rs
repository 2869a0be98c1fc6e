use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
}

static ORDERS: &str = "orders";

#[idempotent(key = "msg.id", store = ORDERS)]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = &msg.id;
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
