// An `Option` key: `None` is `Error::MissingKey` and the body does not run.
use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Msg {
    id: Option<String>,
}

#[idempotent(key = "msg.id")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    handle(&Msg { id: Some("k-1".into()) }).await.unwrap();
    handle(&Msg { id: Some("k-1".into()) }).await.unwrap();
    assert!(matches!(handle(&Msg { id: None }).await, Err(Error::MissingKey)));
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
