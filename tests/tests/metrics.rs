//! With the `metrics` feature, every handled message increments
//! `idempotent_messages_total{scope, outcome}`.

use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::{Error, idempotent};
use idempotent_tests::metrics_support::Counts;
use std::sync::{Arc, OnceLock};

/// The process's recorder, shared by the tests (each counts its own scopes).
fn counts() -> Arc<Counts> {
    static COUNTS: OnceLock<Arc<Counts>> = OnceLock::new();
    COUNTS.get_or_init(Counts::install).clone()
}

#[idempotent(key = "id", scope = "metered")]
async fn metered(id: u32, fail: bool) -> Result<u32, Error> {
    if fail {
        return Err(Error::MissingKey);
    }
    Ok(id)
}

#[tokio::test]
async fn outcomes_are_counted_per_scope() {
    let counts = counts();
    metered(1, false).await.unwrap();
    metered(1, false).await.unwrap();
    metered(1, false).await.unwrap();
    metered(2, true).await.unwrap_err();
    let get = |outcome: &str| {
        counts.get(
            "idempotent_messages_total",
            &[("scope", "metered"), ("outcome", outcome)],
        )
    };
    assert_eq!(get("executed"), 1);
    assert_eq!(get("replayed"), 2);
    assert_eq!(get("failed"), 1);
}

/// A body that succeeded but whose completion could not be stored, or was fenced out
/// because another execution took the key over, returns its value; the outcome says
/// which, so it can be alerted on (a later duplicate runs again).
#[tokio::test]
async fn unrecorded_and_fenced_out_completions_have_their_own_outcomes() {
    use idempotent_runtime::store::{ClaimOutcome, ClaimRequest};
    use idempotent_runtime::testing::FaultyStore;
    use idempotent_runtime::{Idempotency, MemoryStore, Store};
    use std::time::Duration;

    let counts = counts();
    let get = |scope: &str, outcome: &str| {
        counts.get(
            "idempotent_messages_total",
            &[("scope", scope), ("outcome", outcome)],
        )
    };

    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let unrecorded = Idempotency::new("metered-unrecorded")
        .shared_store(store.clone())
        .lease(Duration::from_millis(300));
    store.lose_next_completions(u64::MAX);
    let r: Result<u32, Error> = unrecorded.run("k", async { Ok(3) }).await;
    assert_eq!(r.unwrap(), 3);
    assert_eq!(get("metered-unrecorded", "unrecorded"), 1);
    assert_eq!(get("metered-unrecorded", "executed"), 0);
    store.lose_next_completions(0);

    let fenced = Idempotency::new("metered-fenced").shared_store(store.clone());
    let key = fenced.record_key("k").unwrap();
    let inner = store.clone();
    let r: Result<u32, Error> = fenced
        .run("k", async move {
            // another execution takes the key over while this one runs
            assert!(inner.inner().forget(&key).await.unwrap());
            let req = ClaimRequest {
                key: &key,
                lease: Duration::from_secs(60),
                ttl: Duration::from_secs(60),
                fingerprint: None,
                max_attempts: None,
            };
            let taken = inner.inner().claim(&req).await.unwrap();
            assert!(matches!(taken, ClaimOutcome::Acquired { .. }));
            Ok(4)
        })
        .await;
    assert_eq!(r.unwrap(), 4);
    assert_eq!(get("metered-fenced", "lease_lost"), 1);
    assert_eq!(get("metered-fenced", "executed"), 0);
}
