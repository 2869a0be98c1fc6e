use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id", ttl = "99999999999999999999w")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = &msg.id;
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new() });
}
