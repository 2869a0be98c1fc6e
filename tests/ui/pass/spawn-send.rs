// Owned arguments: the handler's future is `Send + 'static`, so it can be spawned.
use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Msg {
    id: String,
    amount: u64,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: Msg, label: String) -> Result<String, Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::task::yield_now().await;
    Ok(format!("{label}:{}", msg.amount))
}

fn assert_send<T: Send + 'static>(t: T) -> T {
    t
}

#[tokio::main]
async fn main() {
    let first = tokio::spawn(assert_send(handle(
        Msg { id: "p-1".into(), amount: 5 },
        "paid".into(),
    )));
    assert_eq!(first.await.unwrap().unwrap(), "paid:5");
    let dup = tokio::spawn(handle(Msg { id: "p-1".into(), amount: 6 }, "again".into()));
    assert_eq!(dup.await.unwrap().unwrap(), "paid:5");
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
