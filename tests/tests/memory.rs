//! The conformance suite and the memory-specific guarantees on `MemoryStore`.

use idempotent_runtime::memory::ManualClock;
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion, Fence};
use idempotent_runtime::{Error, Idempotency, MemoryStore, RecordKey, Store};
use std::sync::Arc;
use std::time::Duration;

idempotent_runtime::protocol_conformance_suite!(async {
    Arc::new(MemoryStore::new()) as Arc<dyn Store>
});
idempotent_runtime::admin_conformance_suite!(async {
    Arc::new(MemoryStore::new()) as Arc<dyn Store>
});

fn req(key: &RecordKey, ttl: Duration) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        lease: Duration::from_secs(60),
        ttl,
        fingerprint: None,
        max_attempts: None,
    }
}

/// G5: leases and expiry follow the store's clock, not the time that passes for the
/// caller: a lease outlives any real wait until the store clock moves past it.
#[tokio::test]
async fn leases_follow_the_store_clock() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    let k = RecordKey::new("clock", "m-1").unwrap();
    let r = ClaimRequest {
        lease: Duration::from_millis(50),
        ..req(&k, Duration::from_secs(3600))
    };
    assert!(matches!(
        store.claim(&r).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        matches!(
            store.claim(&r).await.unwrap(),
            ClaimOutcome::InProgress { .. }
        ),
        "real time passing does not expire a lease"
    );
    clock.advance(Duration::from_millis(51));
    assert!(matches!(
        store.claim(&r).await.unwrap(),
        ClaimOutcome::Acquired { attempt: 2, .. }
    ));
}

/// A stream of one million unique keys with a short ttl holds memory for the keys
/// live within one ttl, not for every key ever seen.
#[tokio::test]
async fn memory_stays_bounded_under_unique_keys() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    let ttl = Duration::from_millis(10);
    let mut peak = 0;
    for i in 0..1_000_000u32 {
        let k = RecordKey::new("stream", &i).unwrap();
        let r = ClaimRequest {
            lease: Duration::from_millis(5),
            ..req(&k, ttl)
        };
        let ClaimOutcome::Acquired { token, .. } = store.claim(&r).await.unwrap() else {
            panic!("fresh key {i} not acquired");
        };
        let c = Completion {
            key: &k,
            token,
            output: Some(b"null"),
            ttl,
        };
        assert_eq!(store.complete(&c).await.unwrap(), Fence::Held);
        // 1000 messages per store millisecond: 10 000 keys live within one ttl
        if i % 1000 == 999 {
            clock.advance(Duration::from_millis(1));
        }
        if i % 10_000 == 0 {
            peak = peak.max(store.len());
        }
    }
    peak = peak.max(store.len());
    eprintln!("peak records held: {peak} for 1000000 keys");
    assert!(
        peak < 40_000,
        "held {peak} records; about 10 000 are live at a time"
    );
    clock.advance(Duration::from_secs(1));
    store.purge_expired().await.unwrap();
    assert_eq!(store.len(), 0);
}

/// The manual API with an owned scope over the scope bound and keys on the heap:
/// a cancelled run releases its claim, a completed one replays, and the record is the
/// one `record_key` names.
#[tokio::test]
async fn manual_runs_with_long_scopes_and_keys() {
    use idempotent_runtime::store::RecordState;
    use idempotent_runtime::{Error, Idempotency};
    let store = Arc::new(MemoryStore::new());
    let scope = format!("{}-{}", "s".repeat(250), std::process::id());
    let h = Idempotency::new(scope)
        .shared_store(store.clone())
        .lease(Duration::from_secs(30));
    for len in [5usize, 80, 104, 127, 128, 129, 1000] {
        let key = ("tenant", "k".repeat(len));
        let slow = h.run(&key, async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<u32, Error>(0)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(20), slow)
                .await
                .is_err()
        );
        let k = h.record_key(&key).unwrap();
        let mut state = None;
        for _ in 0..50 {
            state = store.inspect(&k).await.unwrap().map(|r| r.state);
            if state == Some(RecordState::Released) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state, Some(RecordState::Released), "key of {len} bytes");
        let out = "o".repeat(len);
        let r: Result<String, Error> = h.run(&key, async { Ok(out.clone()) }).await;
        assert_eq!(r.unwrap(), out);
        let r: Result<String, Error> = h.run(&key, async { Ok(String::new()) }).await;
        assert_eq!(r.unwrap(), out, "replayed");
        let rec = store.inspect(&k).await.unwrap().unwrap();
        assert_eq!((rec.state, rec.attempts), (RecordState::Completed, 2));
    }
}

/// Regression: `lease(1ms)` was accepted silently, and with duplicates arriving while
/// the body ran, every store executed the body several times (the lease lapsed between
/// renewals). A lease under `MIN_LEASE` is refused before anything runs, for single
/// messages and batches alike; `MIN_LEASE` itself is accepted.
#[tokio::test]
async fn a_lease_below_the_minimum_is_refused() {
    use idempotent_runtime::MIN_LEASE;
    let ran = std::sync::atomic::AtomicU32::new(0);
    let h = Idempotency::new("short-lease").lease(Duration::from_millis(1));
    let r: Result<u32, Error> = h
        .run("k", async {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(1)
        })
        .await;
    match r {
        Err(e @ Error::InvalidSettings { .. }) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("100ms"), "{e}");
        }
        other => panic!("expected InvalidSettings, got {other:?}"),
    }
    let batch: Vec<Result<u32, Error>> = h
        .run_batch(&[1u32, 2], |m| *m, |m| async move { Ok(*m) })
        .await;
    assert!(
        batch
            .iter()
            .all(|r| matches!(r, Err(Error::InvalidSettings { .. })))
    );
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
    let ok = Idempotency::new("min-lease").lease(MIN_LEASE);
    let r: Result<u32, Error> = ok.run("k", async { Ok(2) }).await;
    assert_eq!(r.unwrap(), 2);
}

#[tokio::test]
async fn a_ttl_over_the_maximum_is_refused() {
    use idempotent_runtime::MAX_TTL;
    let h = Idempotency::new("long-ttl").ttl(MAX_TTL + Duration::from_secs(1));
    let r: Result<u32, Error> = h.run("k", async { Ok(1) }).await;
    match r {
        Err(e @ Error::InvalidSettings { .. }) => assert!(e.to_string().contains("3650"), "{e}"),
        other => panic!("expected InvalidSettings, got {other:?}"),
    }
    let ok = Idempotency::new("max-ttl").ttl(MAX_TTL);
    let r: Result<u32, Error> = ok.run("k", async { Ok(2) }).await;
    assert_eq!(r.unwrap(), 2);
}

/// Batch futures are `Send`, so consumers can spawn them (fingerprint closure included).
#[test]
fn batch_futures_are_send() {
    fn spawnable<F: std::future::Future + Send>(_: F) {}
    let h = Idempotency::new("send");
    let batch = [1u32, 2];
    spawnable(h.run_batch(&batch, |m| *m, |m| async move { Ok::<_, Error>(*m) }));
    spawnable(h.run_batch_with_fingerprint(
        &batch,
        |m| *m,
        |m| m + 1,
        |m| async move { Ok::<_, Error>(*m) },
    ));
}
