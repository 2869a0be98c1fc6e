// Generic handlers keep their parameters and where-clauses; the key and the output
// may depend on them.
use idempotent_runtime::{Error, KeyPart, idempotent};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Envelope<K, P> {
    id: K,
    payload: P,
}

#[idempotent(key = "msg.id", scope = "generic")]
async fn handle<'a, K, P: Clone + Send + Sync>(msg: &'a Envelope<K, P>) -> Result<P, Error>
where
    K: KeyPart + Sync + Debug,
    P: Serialize + DeserializeOwned,
{
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(msg.payload.clone())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let msg = Envelope { id: 7u64, payload: vec![1u8, 2, 3] };
    assert_eq!(handle(&msg).await.unwrap(), vec![1, 2, 3]);
    let dup = Envelope { id: 7u64, payload: vec![9u8] };
    // a duplicate gets the first output, not its own payload
    assert_eq!(handle(&dup).await.unwrap(), vec![1, 2, 3]);
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
