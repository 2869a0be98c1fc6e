// The attribute is wrong (`max_attempts = 0`), but the handler still exists: its
// callers type-check and report nothing, only the attribute does.
use idempotent_runtime::{Error, idempotent};

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id", max_attempts = 0)]
async fn handle(msg: &Msg) -> Result<u64, Error> {
    Ok(msg.id.len() as u64)
}

async fn consume(msg: &Msg) -> Result<u64, Error> {
    let n: u64 = handle(msg).await?;
    Ok(n + 1)
}

fn main() {
    let _ = consume(&Msg { id: String::new() });
}
