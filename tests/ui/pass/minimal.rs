use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Msg {
    id: String,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) -> Result<usize, Error> {
    let _ = &msg.id;
    Ok(RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let msg = Msg { id: "m-1".into() };
    assert_eq!(handle(&msg).await.unwrap(), 1);
    assert_eq!(handle(&msg).await.unwrap(), 1);
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
