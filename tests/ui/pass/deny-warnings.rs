// Generated code adds no warnings, with rustc's and clippy's lints denied.
#![deny(warnings, clippy::all, clippy::pedantic, unused_qualifications, unreachable_pub)]
#![deny(non_snake_case, unused_results, let_underscore_drop)]

use idempotent_runtime::{Error, MemoryStore, idempotent};
use std::sync::LazyLock;

static STORE: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

struct Msg {
    id: String,
    amount: u64,
}

#[idempotent(
    key = "(msg.id, msg.amount)",
    fingerprint = "msg.amount",
    store = STORE,
    ttl = "1h30m",
    lease = "5s",
    max_attempts = 3,
    scope = "strict",
    on_store_error = "process",
    on_in_progress = "wait"
)]
async fn handle(msg: &Msg) -> Result<(), Error> {
    if msg.amount == 0 {
        return Err(Error::MissingKey);
    }
    Ok(())
}

#[idempotent(key = "id")]
async fn early_return(id: u64) -> Result<u64, Error> {
    return Ok(id);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let msg = Msg { id: "d-1".into(), amount: 3 };
    handle(&msg).await.unwrap();
    handle(&msg).await.unwrap();
    assert_eq!(early_return(4).await.unwrap(), 4);
}
