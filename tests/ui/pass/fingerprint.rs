// `fingerprint`: the same key with another payload is `FingerprintMismatch`.
use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Msg {
    id: String,
    amount: u64,
    currency: String,
}

#[idempotent(key = "msg.id", fingerprint = "(msg.amount, msg.currency)")]
async fn handle(msg: &Msg) -> Result<u64, Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(msg.amount)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let m = |amount: u64| Msg { id: "pay-1".into(), amount, currency: "EUR".into() };
    assert_eq!(handle(&m(10)).await.unwrap(), 10);
    assert_eq!(handle(&m(10)).await.unwrap(), 10);
    assert!(matches!(handle(&m(11)).await, Err(Error::FingerprintMismatch)));
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
