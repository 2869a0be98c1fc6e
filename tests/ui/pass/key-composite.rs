// `(msg.topic, msg.id)`: one key part per element, without moving out of the message.
use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Msg {
    topic: String,
    id: String,
}

#[idempotent(key = "(msg.topic, msg.id)")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let m = |topic: &str, id: &str| Msg { topic: topic.into(), id: id.into() };
    handle(&m("a:b", "c")).await.unwrap();
    handle(&m("a:b", "c")).await.unwrap(); // duplicate
    handle(&m("a", "b:c")).await.unwrap(); // another key: parts are not concatenated
    handle(&m("orders", "c")).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 3);
}
