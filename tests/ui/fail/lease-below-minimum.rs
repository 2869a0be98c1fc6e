use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id", lease = "1ms")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = &msg.id;
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
