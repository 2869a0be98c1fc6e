// `store = STATIC`: a `LazyLock<MemoryStore>`, type-checked, used instead of the registry.
use idempotent_runtime::{Error, MemoryStore, idempotent};
use std::sync::LazyLock;

static ORDERS: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id", store = ORDERS)]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = &msg.id;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert!(ORDERS.is_empty());
    handle(&Msg { id: "o-1".into() }).await.unwrap();
    handle(&Msg { id: "o-1".into() }).await.unwrap();
    assert_eq!(ORDERS.len(), 1);
}
