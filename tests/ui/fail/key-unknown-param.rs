use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
}

struct Db;

#[idempotent(key = "message.id")]
async fn handle(msg: &Msg, db: &Db) -> Result<(), Error> {
    let _ = (&msg.id, db);
    Ok(())
}

fn main() {
    let _ = handle(&Msg { id: String::new() }, &Db);
}
