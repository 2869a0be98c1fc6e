//! What the store tests share beyond the conformance suite
//! (`idempotent_runtime::testing::conformance`): free loopback ports for private
//! servers, and two stores (two connections, as two consumer processes have) racing on
//! the same keys.

use futures_util::future::join_all;
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{Error, Idempotency, OnInProgress, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A loopback port nothing listens on (at the time of the call).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The operator actions of `store`, which every store of the crate has.
pub fn admin(store: &dyn Store) -> &dyn idempotent_runtime::store::StoreAdmin {
    store.as_admin().expect("the store has operator actions")
}

/// Two stores (separate connections, as two consumer processes have) run `tasks`
/// concurrent deliveries of each of `keys` keys, half through each store, waiting on
/// each other's claims (handlers with `lease`, in a scope named after `case`). Asserts
/// that every key's body ran exactly once and that every delivery got that key's output.
pub async fn race_two_stores(
    case: &str,
    lease: Duration,
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    keys: usize,
    tasks: usize,
) {
    let scope = unique_scope(case);
    let make = |s: &Arc<dyn Store>| {
        Idempotency::new(scope.clone())
            .shared_store(s.clone())
            .lease(lease)
            .ttl(Duration::from_secs(120))
            .on_in_progress(OnInProgress::Wait)
    };
    let handlers = [make(&a), make(&b)];
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..keys).map(|_| AtomicU32::new(0)).collect());
    let mut jobs = Vec::new();
    for t in 0..tasks {
        for k in 0..keys {
            let h = handlers[(t + k) % 2].clone();
            let runs = runs.clone();
            jobs.push(tokio::spawn(async move {
                let id = format!("order-{k}");
                let r: Result<u64, Error> = h
                    .run(id.as_str(), async {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(k as u64 * 7 + 1)
                    })
                    .await;
                (k, r)
            }));
        }
    }
    for j in join_all(jobs).await {
        let (k, r) = j.expect("task");
        match r {
            Ok(v) => assert_eq!(v, k as u64 * 7 + 1, "key {k} got another key's output"),
            Err(e) => panic!("delivery of key {k} failed: {e} ({e:?})"),
        }
    }
    for (k, n) in runs.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "the body of key {k} ran {n:?} times"
        );
    }
}
