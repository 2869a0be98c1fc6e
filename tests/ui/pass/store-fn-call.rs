// `store = f()`: a call returning `&'static` store, evaluated on each call.
use idempotent_runtime::{Error, MemoryStore, idempotent};
use std::sync::OnceLock;

static PAYMENTS: OnceLock<MemoryStore> = OnceLock::new();

fn payments() -> &'static MemoryStore {
    PAYMENTS.get().expect("payments store not set")
}

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id", store = payments())]
async fn handle(msg: &Msg) -> Result<(), Error> {
    let _ = &msg.id;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    PAYMENTS.set(MemoryStore::new()).unwrap();
    handle(&Msg { id: "p-1".into() }).await.unwrap();
    handle(&Msg { id: "p-1".into() }).await.unwrap();
    handle(&Msg { id: "p-2".into() }).await.unwrap();
    assert_eq!(payments().len(), 2);
}
