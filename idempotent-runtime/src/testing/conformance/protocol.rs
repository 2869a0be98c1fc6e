//! The protocol cases: the rules of [`ClaimOutcome`] and of each [`Store`] method, and
//! the guarantees of the protocol that runs on them (G1–G6, G8). They need only
//! [`Store`]; on a store with operator actions ([`Store::as_admin`]) they also check
//! the records they leave.

use super::support::{
    HandlerError, LEASE, LONG_LEASE, TTL, acquire, acquire_token, complete, handler, key, record,
    release, req, short, unique_scope,
};
use crate::error::{Error, NotReplayable};
use crate::key::RecordKey;
use crate::manual::Idempotency;
use crate::protocol::{OnInProgress, OnStoreError, current_claim};
use crate::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, RecordState, Release, Store, Token,
};
use crate::testing::FaultyStore;
use futures_util::future::join_all;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

// ---------------------------------------------------------------- claim rules

/// A fresh key is acquired with attempt 1 and is In progress.
pub async fn claim_fresh_key_acquires(store: Arc<dyn Store>) {
    let scope = unique_scope("fresh");
    let k = key(&scope, "m-1");
    let (token, attempt) = acquire(&*store, &req(&k)).await;
    assert_eq!(attempt, 1);
    if let Some(found) = record(&*store, &k).await {
        let rec = found.expect("record exists");
        assert_eq!(rec.state, RecordState::InProgress);
        assert_eq!(rec.attempts, 1);
        assert_eq!(rec.token, token);
        let left = rec.lease_remaining.expect("lease is live");
        assert!(
            left <= LONG_LEASE && left > Duration::ZERO,
            "lease left {left:?}"
        );
    }
}

/// G2: a duplicate of a completed key gets the cached output from the claim itself.
pub async fn duplicate_of_completed_key_replays_output(store: Arc<dyn Store>) {
    let scope = unique_scope("replay");
    let k = key(&scope, "m-1");
    let (token, _) = acquire(&*store, &req(&k)).await;
    assert_eq!(
        complete(&*store, &k, token, b"{\"receipt\":7}").await,
        Fence::Held
    );
    for _ in 0..3 {
        assert_eq!(
            store.claim(&req(&k)).await.unwrap(),
            ClaimOutcome::Completed {
                output: Some(b"{\"receipt\":7}".to_vec())
            }
        );
    }
    if let Some(found) = record(&*store, &k).await {
        let rec = found.unwrap();
        assert_eq!(rec.state, RecordState::Completed);
        assert_eq!(rec.attempts, 1, "replays are not attempts");
    }
}

/// A completion without a cached output replays as `output: None`.
pub async fn completed_without_output_replays_none(store: Arc<dyn Store>) {
    let scope = unique_scope("no-output");
    let k = key(&scope, "m-1");
    let (token, _) = acquire(&*store, &req(&k)).await;
    let fence = store
        .complete(&Completion {
            key: &k,
            token,
            output: None,
            ttl: TTL,
        })
        .await
        .unwrap();
    assert_eq!(fence, Fence::Held);
    assert_eq!(
        store.claim(&req(&k)).await.unwrap(),
        ClaimOutcome::Completed { output: None }
    );
}

/// G1: while a lease is live, every other claim is refused with the time left.
pub async fn live_claim_refuses_others(store: Arc<dyn Store>) {
    let scope = unique_scope("in-progress");
    let k = key(&scope, "m-1");
    acquire(&*store, &req(&k)).await;
    match store.claim(&req(&k)).await.unwrap() {
        ClaimOutcome::InProgress { retry_after } => {
            assert!(retry_after <= LONG_LEASE && retry_after > Duration::ZERO);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
}

/// G1: many claimers racing on one key: exactly one wins.
pub async fn racing_claims_have_one_winner(store: Arc<dyn Store>) {
    let scope = unique_scope("race");
    for round in 0..20 {
        let k = key(&scope, &format!("m-{round}"));
        let results = join_all((0..16).map(|_| {
            let store = store.clone();
            let k = k.clone();
            tokio::spawn(async move { store.claim(&req(&k)).await.unwrap() })
        }))
        .await;
        let winners = results
            .into_iter()
            .map(|r| r.unwrap())
            .filter(|o| matches!(o, ClaimOutcome::Acquired { .. }))
            .count();
        assert_eq!(winners, 1, "round {round}");
    }
}

/// G3: a released key is claimable at once, with the next attempt and a larger token.
pub async fn released_key_is_claimable_at_once(store: Arc<dyn Store>) {
    let scope = unique_scope("release");
    let k = key(&scope, "m-1");
    let (t1, _) = acquire(&*store, &req(&k)).await;
    assert_eq!(release(&*store, &k, t1).await, Fence::Held);
    if let Some(found) = record(&*store, &k).await {
        let rec = found.unwrap();
        assert_eq!(rec.state, RecordState::Released);
        assert_eq!(rec.attempts, 1);
    }
    let (t2, attempt) = acquire(&*store, &req(&k)).await;
    assert_eq!(attempt, 2);
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
}

/// G3: a crashed holder (no release, no renewal) frees the key when its lease expires.
pub async fn expired_lease_is_taken_over(store: Arc<dyn Store>) {
    let scope = unique_scope("takeover");
    let k = key(&scope, "m-1");
    let (t1, _) = acquire(&*store, &short(&k)).await;
    tokio::time::sleep(LEASE + Duration::from_millis(150)).await;
    let (t2, attempt) = acquire(&*store, &short(&k)).await;
    assert_eq!(attempt, 2);
    assert!(t2 > t1);
}

/// G6: once another claim took over, the old token can neither complete, release nor
/// renew, and the new owner's record is untouched.
pub async fn stale_owner_is_fenced(store: Arc<dyn Store>) {
    let scope = unique_scope("fencing");
    let k = key(&scope, "m-1");
    let (old, _) = acquire(&*store, &short(&k)).await;
    tokio::time::sleep(LEASE + Duration::from_millis(150)).await;
    let (new, _) = acquire(&*store, &short(&k)).await;
    assert_eq!(complete(&*store, &k, old, b"\"stale\"").await, Fence::Lost);
    assert_eq!(release(&*store, &k, old).await, Fence::Lost);
    assert_eq!(store.renew(&k, old, LEASE).await.unwrap(), Fence::Lost);
    if let Some(found) = record(&*store, &k).await {
        let rec = found.unwrap();
        assert_eq!(rec.state, RecordState::InProgress);
        assert_eq!(rec.token, new);
    }
    assert_eq!(complete(&*store, &k, new, b"\"fresh\"").await, Fence::Held);
    assert_eq!(
        store.claim(&short(&k)).await.unwrap(),
        ClaimOutcome::Completed {
            output: Some(b"\"fresh\"".to_vec())
        }
    );
    // a completed record cannot be released by anyone nor completed by another claim
    // (its own claim's retried completion is held: see
    // `retried_completion_after_a_lost_reply_is_held`)
    assert_eq!(release(&*store, &k, new).await, Fence::Lost);
    assert_eq!(complete(&*store, &k, old, b"\"again\"").await, Fence::Lost);
}

/// G6: tokens strictly increase per key, also when the record is forgotten and
/// created again.
pub async fn tokens_strictly_increase(store: Arc<dyn Store>) {
    let scope = unique_scope("tokens");
    let k = key(&scope, "m-1");
    let mut last = Token::new(0);
    for i in 0..10 {
        let (t, _) = acquire(&*store, &req(&k)).await;
        assert!(t > last, "token {t} after {last}");
        last = t;
        match store.as_admin() {
            Some(admin) if i % 2 == 1 => assert!(admin.forget(&k).await.unwrap()),
            _ => assert_eq!(release(&*store, &k, t).await, Fence::Held),
        }
    }
}

/// G1: renewing extends the lease past its original end.
pub async fn renewal_extends_the_lease(store: Arc<dyn Store>) {
    let scope = unique_scope("renew");
    let k = key(&scope, "m-1");
    let (t, _) = acquire(&*store, &short(&k)).await;
    for _ in 0..4 {
        tokio::time::sleep(LEASE / 2).await;
        assert_eq!(store.renew(&k, t, LEASE).await.unwrap(), Fence::Held);
    }
    // 4 × LEASE/2 after the claim: without renewals the lease would have expired twice
    assert!(matches!(
        store.claim(&short(&k)).await.unwrap(),
        ClaimOutcome::InProgress { .. }
    ));
}

/// Poisoning: after `max_attempts` failed attempts (released or crashed), claims are
/// refused with `Exhausted`.
pub async fn max_attempts_poisons_the_key(store: Arc<dyn Store>) {
    let scope = unique_scope("poison");
    let k = key(&scope, "m-1");
    let r = ClaimRequest {
        max_attempts: Some(3),
        ..short(&k)
    };
    for attempt in 1..=2 {
        let (t, a) = acquire(&*store, &r).await;
        assert_eq!(a, attempt);
        release(&*store, &k, t).await;
    }
    // the third attempt crashes: no release, the lease runs out
    let (_, a) = acquire(&*store, &r).await;
    assert_eq!(a, 3);
    tokio::time::sleep(LEASE + Duration::from_millis(150)).await;
    assert_eq!(
        store.claim(&r).await.unwrap(),
        ClaimOutcome::Exhausted { attempts: 3 }
    );
    // without the limit the key is claimable (the limit belongs to the handler)
    let (_, a) = acquire(&*store, &short(&k)).await;
    assert_eq!(a, 4);
}

/// The same key with another fingerprint is refused; the same fingerprint replays.
pub async fn fingerprint_mismatch_is_refused(store: Arc<dyn Store>) {
    let scope = unique_scope("fingerprint");
    let k = key(&scope, "m-1");
    let fp_a = [1u8; 32];
    let fp_b = [2u8; 32];
    let with = |fp: &'static [u8]| ClaimRequest {
        fingerprint: Some(fp),
        ..req(&k)
    };
    let fp_a: &'static [u8] = Box::leak(Box::new(fp_a));
    let fp_b: &'static [u8] = Box::leak(Box::new(fp_b));
    let (t, _) = acquire(&*store, &with(fp_a)).await;
    assert_eq!(
        store.claim(&with(fp_b)).await.unwrap(),
        ClaimOutcome::FingerprintMismatch
    );
    complete(&*store, &k, t, b"1").await;
    assert_eq!(
        store.claim(&with(fp_b)).await.unwrap(),
        ClaimOutcome::FingerprintMismatch
    );
    assert_eq!(
        store.claim(&with(fp_a)).await.unwrap(),
        ClaimOutcome::Completed {
            output: Some(b"1".to_vec())
        }
    );
    if let Some(found) = record(&*store, &k).await {
        let rec = found.unwrap();
        assert_eq!(rec.fingerprint.as_deref(), Some(fp_a));
    }
}

/// G2 is bounded by the ttl: a completed record is forgotten after it.
pub async fn completed_record_expires_after_ttl(store: Arc<dyn Store>) {
    let scope = unique_scope("ttl");
    let k = key(&scope, "m-1");
    let short = ClaimRequest {
        ttl: Duration::from_millis(400),
        lease: Duration::from_millis(200),
        ..req(&k)
    };
    let (t, _) = acquire(&*store, &short).await;
    let fence = store
        .complete(&Completion {
            key: &k,
            token: t,
            output: Some(b"1"),
            ttl: Duration::from_millis(400),
        })
        .await
        .unwrap();
    assert_eq!(fence, Fence::Held);
    assert!(matches!(
        store.claim(&short).await.unwrap(),
        ClaimOutcome::Completed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    if let Some(found) = record(&*store, &k).await {
        assert_eq!(found, None);
    }
    let (_, attempt) = acquire(&*store, &short).await;
    assert_eq!(attempt, 1, "an expired record starts over");
    // purging is safe to call at any time
    if let Some(admin) = store.as_admin() {
        admin.purge_expired().await.unwrap();
    }
}

/// Scopes never share records.
pub async fn scopes_are_isolated(store: Arc<dyn Store>) {
    let a = unique_scope("scope-a");
    let b = unique_scope("scope-b");
    let ka = key(&a, "same-id");
    let kb = key(&b, "same-id");
    let (t, _) = acquire(&*store, &req(&ka)).await;
    complete(&*store, &ka, t, b"1").await;
    let (_, attempt) = acquire(&*store, &req(&kb)).await;
    assert_eq!(attempt, 1);
}

/// G8: keys are data, whatever their bytes, and composite keys never collide.
pub async fn keys_are_data(store: Arc<dyn Store>) {
    let scope = unique_scope("bytes");
    let long = vec![b'k'; 100 * 1024];
    let mut long2 = long.clone();
    *long2.last_mut().unwrap() = b'j';
    let raw: Vec<Vec<u8>> = vec![
        b"plain".to_vec(),
        b"quote'\"`".to_vec(),
        b"glob*?[a-z]{}".to_vec(),
        b"sql'; DROP TABLE message_idempotent; --".to_vec(),
        b"like%_\\".to_vec(),
        b"line\nbreak\r\n".to_vec(),
        b"nul\0byte".to_vec(),
        b"\0leading-nul".to_vec(),
        vec![0xff, 0xfe, 0x80, 0x00, 0xc3],
        "ünïcödé 🦀".as_bytes().to_vec(),
        b"colon:separated:key".to_vec(),
        b"{hash-tag}".to_vec(),
        long.clone(),
        long2,
    ];
    let mut keys: Vec<RecordKey> = raw
        .iter()
        .map(|r| RecordKey::new(&scope, r.as_slice()).unwrap())
        .collect();
    keys.push(RecordKey::new(&scope, &("a:b", "c")).unwrap());
    keys.push(RecordKey::new(&scope, &("a", "b:c")).unwrap());
    keys.push(RecordKey::new(&scope, &("1", ":a")).unwrap());
    let distinct: HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "encodings are distinct");
    for (i, k) in keys.iter().enumerate() {
        let (t, _) = acquire(&*store, &req(k)).await;
        let out = format!("{i}");
        assert_eq!(complete(&*store, k, t, out.as_bytes()).await, Fence::Held);
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            store.claim(&req(k)).await.unwrap(),
            ClaimOutcome::Completed {
                output: Some(format!("{i}").into_bytes())
            },
            "key #{i} kept its own record"
        );
        if let Some(found) = record(&*store, k).await {
            let rec = found.unwrap();
            assert_eq!(rec.output, Some(format!("{i}").into_bytes()));
        }
    }
}

/// Batches follow the same rules as single claims, one outcome per request, in order.
pub async fn batches_follow_the_same_rules(store: Arc<dyn Store>) {
    let scope = unique_scope("batch");
    let keys: Vec<RecordKey> = (0..20).map(|i| key(&scope, &format!("m-{i}"))).collect();
    // key 0 completed, key 1 in progress beforehand
    let (t0, _) = acquire(&*store, &req(&keys[0])).await;
    complete(&*store, &keys[0], t0, b"0").await;
    acquire(&*store, &req(&keys[1])).await;
    let reqs: Vec<_> = keys.iter().map(req).collect();
    let out = store.claim_batch(&reqs).await.unwrap();
    assert_eq!(out.len(), keys.len());
    assert_eq!(
        out[0],
        ClaimOutcome::Completed {
            output: Some(b"0".to_vec())
        }
    );
    assert!(matches!(out[1], ClaimOutcome::InProgress { .. }));
    let mut completions = Vec::new();
    let mut releases = Vec::new();
    let outputs: Vec<String> = (0..keys.len()).map(|i| i.to_string()).collect();
    for (i, o) in out.iter().enumerate().skip(2) {
        let ClaimOutcome::Acquired { token, attempt } = o else {
            panic!("key {i}: {o:?}");
        };
        assert_eq!(*attempt, 1);
        if i % 2 == 0 {
            completions.push(Completion {
                key: &keys[i],
                token: *token,
                output: Some(outputs[i].as_bytes()),
                ttl: TTL,
            });
        } else {
            releases.push(Release {
                key: &keys[i],
                token: *token,
            });
        }
    }
    let fences = store.complete_batch(&completions).await.unwrap();
    assert!(fences.iter().all(|f| *f == Fence::Held));
    let fences = store.release_batch(&releases).await.unwrap();
    assert!(fences.iter().all(|f| *f == Fence::Held));
    let again = store.claim_batch(&reqs).await.unwrap();
    for (i, o) in again.iter().enumerate().skip(2) {
        if i % 2 == 0 {
            assert_eq!(
                *o,
                ClaimOutcome::Completed {
                    output: Some(outputs[i].clone().into_bytes())
                }
            );
        } else {
            assert!(
                matches!(o, ClaimOutcome::Acquired { attempt: 2, .. }),
                "key {i}: {o:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- protocol

/// G1 + G2 end to end: many deliveries of the same messages racing on several tasks;
/// each message's body runs once and every delivery gets its output.
pub async fn concurrent_duplicates_run_once(store: Arc<dyn Store>) {
    let h = Arc::new(handler(&store, "concurrent").on_in_progress(OnInProgress::Wait));
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..100).map(|_| AtomicU32::new(0)).collect());
    let mut tasks = Vec::new();
    for copy in 0..6 {
        for id in 0..100u32 {
            let h = h.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                let _ = copy;
                h.run(&id, async {
                    runs[id as usize].fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<_, HandlerError>(id * 10)
                })
                .await
            }));
        }
    }
    for (i, t) in join_all(tasks).await.into_iter().enumerate() {
        let out = t.unwrap().expect("every delivery succeeds");
        assert_eq!(out, (i as u32 % 100) * 10);
    }
    for (id, n) in runs.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "message {id} ran once");
    }
}

/// G3: a handler error releases the claim at once and the next delivery retries.
pub async fn handler_error_releases_for_retry(store: Arc<dyn Store>) {
    let h = handler(&store, "error");
    let r: Result<u32, HandlerError> = h
        .run("m-1", async { Err(HandlerError::Business("db down")) })
        .await;
    assert!(matches!(r, Err(HandlerError::Business("db down"))));
    if let Some(found) = record(&*store, &h.record_key("m-1").unwrap()).await {
        let rec = found.unwrap();
        assert_ne!(rec.state, RecordState::Completed);
    }
    let r: Result<u32, HandlerError> = h
        .run("m-1", async {
            assert_eq!(current_claim().unwrap().attempt, 2);
            Ok(5)
        })
        .await;
    assert_eq!(r.unwrap(), 5);
}

/// G3: a panicking handler releases the claim and the panic reaches the caller.
pub async fn panic_releases_for_retry(store: Arc<dyn Store>) {
    let h = Arc::new(handler(&store, "panic"));
    let h2 = h.clone();
    let joined = tokio::spawn(async move {
        h2.run("m-1", async {
            if true {
                panic!("handler bug");
            }
            Ok::<u32, HandlerError>(0)
        })
        .await
    })
    .await;
    assert!(joined.unwrap_err().is_panic());
    if let Some(found) = record(&*store, &h.record_key("m-1").unwrap()).await {
        let rec = found.unwrap();
        assert_eq!(rec.state, RecordState::Released);
    }
    let r: Result<u32, HandlerError> = h.run("m-1", async { Ok(1) }).await;
    assert_eq!(r.unwrap(), 1);
}

/// G3: a cancelled handler (its future dropped) never completes the key, and the
/// claim is released without waiting for the lease.
pub async fn cancellation_releases_for_retry(store: Arc<dyn Store>) {
    let h = handler(&store, "cancel").lease(Duration::from_secs(30));
    let slow = h.run("m-1", async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<u32, HandlerError>(0)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), slow)
            .await
            .is_err()
    );
    // the release runs on a spawned task; give it a moment, far less than the lease
    let k = h.record_key("m-1").unwrap();
    if let Some(admin) = store.as_admin() {
        let mut state = None;
        for _ in 0..50 {
            state = admin.inspect(&k).await.unwrap().map(|r| r.state);
            if state == Some(RecordState::Released) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state, Some(RecordState::Released));
    }
    // on any store, the next delivery runs once the claim is released, long before
    // the 30 s lease could run out
    assert_eq!(run_when_free(&h, "m-1", 2).await.unwrap(), 2);
}

/// G2/G3: a handler cancelled after its body succeeded, while its completion is in
/// flight, still records the completion: the work happened and must not run again.
pub async fn cancelled_while_completing_still_completes(store: Arc<dyn Store>) {
    let faulty = Arc::new(FaultyStore::new(store.clone()));
    let h = Idempotency::new(unique_scope("cancel-completing"))
        .shared_store(faulty.clone())
        .lease(Duration::from_secs(30));
    let slow_store = faulty.clone();
    let run = h.run("m-1", async move {
        // from now on every store call takes 300 ms: the completion is still in
        // flight when the caller gives up
        slow_store.set_delay(Duration::from_millis(300));
        Ok::<u32, HandlerError>(11)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(100), run)
            .await
            .is_err()
    );
    faulty.set_delay(Duration::ZERO);
    let k = h.record_key("m-1").unwrap();
    if let Some(admin) = store.as_admin() {
        let mut state = None;
        for _ in 0..50 {
            state = admin.inspect(&k).await.unwrap().map(|r| r.state);
            if state == Some(RecordState::Completed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state, Some(RecordState::Completed));
    }
    // on any store, the next delivery replays once the completion landed, long before
    // the 30 s lease could run out
    assert_eq!(run_when_free(&h, "m-1", 0).await.unwrap(), 11);
}

/// Delivers `id` to `h` with a body answering `value`, again every 20 ms for up to a
/// second while another claim holds it (a release or completion still on its way).
async fn run_when_free(h: &Idempotency, id: &str, value: u32) -> Result<u32, HandlerError> {
    for _ in 0..50 {
        match h.run(id, async move { Ok(value) }).await {
            Err(HandlerError::Idem(Error::InProgress { .. })) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
    h.run(id, async move { Ok(value) }).await
}

/// G1: the lease is renewed while a handler outlives it, so duplicates keep being
/// refused until it finishes.
pub async fn long_handler_keeps_its_lease(store: Arc<dyn Store>) {
    let h = Arc::new(handler(&store, "long"));
    let runs = Arc::new(AtomicU32::new(0));
    let (h1, r1) = (h.clone(), runs.clone());
    let first = tokio::spawn(async move {
        h1.run("m-1", async {
            r1.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(LEASE * 4).await;
            Ok::<u32, HandlerError>(9)
        })
        .await
    });
    for _ in 0..6 {
        tokio::time::sleep(LEASE / 2).await;
        let r2 = runs.clone();
        let dup: Result<u32, HandlerError> = h
            .run("m-1", async {
                r2.fetch_add(1, Ordering::SeqCst);
                Ok(0)
            })
            .await;
        match dup {
            Err(HandlerError::Idem(Error::InProgress { .. })) | Ok(9) => {}
            other => panic!("duplicate got {other:?}"),
        }
    }
    assert_eq!(first.await.unwrap().unwrap(), 9);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// G6 end to end: a handler whose lease expired (its renewals lost) cannot overwrite
/// the result of the execution that took over.
pub async fn expired_holder_cannot_overwrite(store: Arc<dyn Store>) {
    let faulty = Arc::new(FaultyStore::new(store.clone()));
    let scope = unique_scope("overwrite");
    let stalled = Idempotency::new(scope.clone())
        .shared_store(faulty.clone())
        .lease(LEASE);
    let healthy = Idempotency::new(scope)
        .shared_store(store.clone())
        .lease(LEASE);
    faulty.drop_renewals(true);
    let first = tokio::spawn(async move {
        stalled
            .run("m-1", async {
                tokio::time::sleep(LEASE * 3).await;
                Ok::<String, HandlerError>("stale".into())
            })
            .await
    });
    tokio::time::sleep(LEASE + Duration::from_millis(150)).await;
    let second: Result<String, HandlerError> =
        healthy.run("m-1", async { Ok("fresh".into()) }).await;
    assert_eq!(second.unwrap(), "fresh");
    // the stalled handler still returns its own value to its caller…
    assert_eq!(first.await.unwrap().unwrap(), "stale");
    // …but the record keeps the result of the execution that held the claim
    let replay: Result<String, HandlerError> =
        healthy.run("m-1", async { Ok("third".into()) }).await;
    assert_eq!(replay.unwrap(), "fresh");
}

/// G4: with the store down the handler does not run (fail closed); with
/// `on_store_error = process` it runs without deduplication.
pub async fn store_outage_fails_closed(store: Arc<dyn Store>) {
    let faulty = Arc::new(FaultyStore::new(store.clone()));
    let scope = unique_scope("outage");
    let closed = Idempotency::new(scope.clone()).shared_store(faulty.clone());
    let open = Idempotency::new(scope)
        .shared_store(faulty.clone())
        .on_store_error(OnStoreError::Process);
    faulty.set_down(true);
    let runs = AtomicU32::new(0);
    let r: Result<u32, HandlerError> = closed
        .run("m-1", async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    match r {
        Err(HandlerError::Idem(e @ Error::Store(_))) => assert!(e.is_retryable()),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "nothing runs unclaimed");
    let r: Result<u32, HandlerError> = open
        .run("m-1", async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    assert_eq!(r.unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    faulty.set_down(false);
    let r: Result<u32, HandlerError> = closed.run("m-1", async { Ok(2) }).await;
    assert_eq!(
        r.unwrap(),
        2,
        "after the outage the key is processed normally"
    );
}

/// A lost completion leaves the key In progress, never Completed without an output
/// that a duplicate could replay; it frees after the lease.
pub async fn lost_completion_frees_after_lease(store: Arc<dyn Store>) {
    let faulty = Arc::new(FaultyStore::new(store.clone()));
    let h = Idempotency::new(unique_scope("lost-completion"))
        .shared_store(faulty.clone())
        .lease(LEASE);
    faulty.lose_next_completions(100);
    let r: Result<u32, HandlerError> = h.run("m-1", async { Ok(1) }).await;
    assert_eq!(r.unwrap(), 1, "the handler's value is returned");
    faulty.lose_next_completions(0);
    let dup: Result<u32, HandlerError> = h.run("m-1", async { Ok(2) }).await;
    assert!(matches!(
        dup,
        Err(HandlerError::Idem(Error::InProgress { .. }))
    ));
    tokio::time::sleep(LEASE + Duration::from_millis(150)).await;
    let retry: Result<u32, HandlerError> = h.run("m-1", async { Ok(3) }).await;
    assert_eq!(retry.unwrap(), 3);
}

/// A completion applied by the store whose reply was lost (the store died before
/// answering) is retried; the retry finds the record Completed by the same token and
/// is a success, not a refusal: no execution took the key over. Any other token is
/// still refused.
pub async fn retried_completion_after_a_lost_reply_is_held(store: Arc<dyn Store>) {
    let scope = unique_scope("lost-reply");
    let k = key(&scope, "m-1");
    let token = acquire_token(&*store, &req(&k)).await;
    assert_eq!(complete(&*store, &k, token, b"1").await, Fence::Held);
    assert_eq!(
        complete(&*store, &k, token, b"1").await,
        Fence::Held,
        "a retried completion by the token that completed the key"
    );
    let other = Token::new(token.get() + 1);
    assert_eq!(complete(&*store, &k, other, b"2").await, Fence::Lost);
    assert_eq!(release(&*store, &k, token).await, Fence::Lost);
    let replay = store.claim(&req(&k)).await.expect("claim");
    assert!(
        matches!(&replay, ClaimOutcome::Completed { output: Some(o) } if o == b"1"),
        "{replay:?}"
    );

    // through the protocol: the first completion's reply is lost, the retry succeeds
    let faulty = Arc::new(FaultyStore::new(store.clone()));
    let h = Idempotency::new(unique_scope("lost-reply-protocol"))
        .shared_store(faulty.clone())
        .lease(LONG_LEASE);
    faulty.lose_next_completion_replies(1);
    let r: Result<u32, HandlerError> = h.run("m-1", async { Ok(5) }).await;
    assert_eq!(r.unwrap(), 5);
    assert_eq!(
        faulty.calls().complete,
        2,
        "the completion was retried once"
    );
    let dup: Result<u32, HandlerError> = h.run("m-1", async { Ok(6) }).await;
    assert_eq!(dup.unwrap(), 5);
}

/// A release applied by the store whose reply was lost is Held when its claim repeats
/// it, singly or in a batch (twice in one batch too): nothing took the key over, and
/// the repeat changes nothing. Once another claim took the key, the old token's
/// release is Lost.
pub async fn retried_release_after_a_lost_reply_is_held(store: Arc<dyn Store>) {
    let scope = unique_scope("lost-release");
    let k = key(&scope, "m-1");
    let first = acquire_token(&*store, &req(&k)).await;
    assert_eq!(release(&*store, &k, first).await, Fence::Held);
    assert_eq!(
        release(&*store, &k, first).await,
        Fence::Held,
        "a retried release by the token that released the key"
    );
    let twice = [
        Release {
            key: &k,
            token: first,
        },
        Release {
            key: &k,
            token: first,
        },
    ];
    assert_eq!(
        store.release_batch(&twice).await.unwrap(),
        vec![Fence::Held, Fence::Held]
    );
    let other = Token::new(first.get() + 1);
    assert_eq!(release(&*store, &k, other).await, Fence::Lost);
    if let Some(found) = record(&*store, &k).await {
        let rec = found.expect("record");
        assert_eq!((rec.state, rec.attempts), (RecordState::Released, 1));
        assert_eq!(rec.token, first, "the repeats changed nothing");
    }

    let (second, attempt) = acquire(&*store, &req(&k)).await;
    assert_eq!(attempt, 2);
    assert_eq!(release(&*store, &k, first).await, Fence::Lost);
    assert_eq!(
        store
            .release_batch(&[Release {
                key: &k,
                token: first
            }])
            .await
            .unwrap(),
        vec![Fence::Lost]
    );
    if let Some(found) = record(&*store, &k).await {
        let rec = found.expect("record");
        assert_eq!((rec.state, rec.token), (RecordState::InProgress, second));
    }
    assert_eq!(release(&*store, &k, second).await, Fence::Held);
    // a released claim cannot complete
    assert_eq!(complete(&*store, &k, second, b"1").await, Fence::Lost);
}

/// A renewal in flight when the body returns, while the store's write path is
/// blocked from outside (another connection holding a database's write lock): the
/// renewal must be finished before the completion starts, or the completion waits
/// behind a renewal nobody drives any more and the handler never returns.
///
/// Regression: on a single-writer store the handler hung for good, and every later
/// write on that store with it.
pub async fn renewal_in_flight_when_the_body_returns(store: Arc<dyn Store>) {
    let faulty = Arc::new(FaultyStore::new(store.clone()));
    let h = Idempotency::new(unique_scope("renewal-in-flight"))
        .shared_store(faulty.clone())
        .lease(LEASE)
        .ttl(TTL);
    // renewals every LEASE / 3 = 100 ms; the body returns at 150 ms while the
    // renewal of 100 ms waits for the writer, blocked from 50 ms to 250 ms
    let blocker = faulty.clone();
    let blocked = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let block = blocker.block_writes().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(block);
    });
    let run = h.run("m-1", async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok::<u32, HandlerError>(21)
    });
    let r = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the handler returns once the store's writes are unblocked");
    assert_eq!(r.unwrap(), 21);
    blocked.await.unwrap();
    assert!(faulty.calls().renew >= 1, "a renewal was in flight");
    let k = h.record_key("m-1").unwrap();
    if let Some(found) = record(&*store, &k).await {
        let state = found.map(|r| r.state);
        assert_eq!(state, Some(RecordState::Completed));
    }
    // the store still takes writes: another key runs and completes
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        h.run("m-2", async { Ok::<u32, HandlerError>(22) }),
    )
    .await
    .expect("later writes are not wedged");
    assert_eq!(next.unwrap(), 22);
}

/// `on_in_progress = wait` returns the winner's output instead of an error.
pub async fn waiting_duplicate_gets_winners_output(store: Arc<dyn Store>) {
    let h = Arc::new(handler(&store, "wait").on_in_progress(OnInProgress::Wait));
    let h1 = h.clone();
    let (started, running) = tokio::sync::oneshot::channel();
    let first = tokio::spawn(async move {
        h1.run("m-1", async {
            let _ = started.send(());
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<u32, HandlerError>(77)
        })
        .await
    });
    // the duplicate arrives while the first holds the claim
    running.await.expect("the first delivery runs");
    let dup: Result<u32, HandlerError> = h.run("m-1", async { Ok(0) }).await;
    assert_eq!(dup.unwrap(), 77);
    assert_eq!(first.await.unwrap().unwrap(), 77);
}

/// `max_attempts` through the protocol: failures count, then `AttemptsExhausted`.
pub async fn attempts_exhausted_after_failures(store: Arc<dyn Store>) {
    let h = handler(&store, "exhausted").max_attempts(2);
    for _ in 0..2 {
        let r: Result<u32, HandlerError> = h
            .run("m-1", async { Err(HandlerError::Business("x")) })
            .await;
        assert!(matches!(r, Err(HandlerError::Business(_))));
    }
    let runs = AtomicU32::new(0);
    let r: Result<u32, HandlerError> = h
        .run("m-1", async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
    match r {
        Err(HandlerError::Idem(e @ Error::AttemptsExhausted { attempts: 2 })) => {
            assert!(!e.is_retryable())
        }
        other => panic!("expected AttemptsExhausted, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// A fingerprint mismatch through the protocol; the body does not run.
pub async fn fingerprint_mismatch_through_protocol(store: Arc<dyn Store>) {
    let h = handler(&store, "fp-protocol");
    let r: Result<u32, HandlerError> = h
        .run_with_fingerprint("m-1", &("alice", 100), async { Ok(1) })
        .await;
    assert_eq!(r.unwrap(), 1);
    let r: Result<u32, HandlerError> = h
        .run_with_fingerprint("m-1", &("alice", 999), async { Ok(2) })
        .await;
    assert!(matches!(
        r,
        Err(HandlerError::Idem(Error::FingerprintMismatch))
    ));
    let r: Result<u32, HandlerError> = h
        .run_with_fingerprint("m-1", &("alice", 100), async { Ok(3) })
        .await;
    assert_eq!(r.unwrap(), 1);
}

/// An output over the cap is returned once, then duplicates get a clear error.
pub async fn oversized_output_is_not_replayed(store: Arc<dyn Store>) {
    let h = handler(&store, "big-output").max_output_bytes(16);
    let big = "x".repeat(64);
    let r: Result<String, HandlerError> = h.run("m-1", async { Ok(big.clone()) }).await;
    assert_eq!(r.unwrap(), big);
    let r: Result<String, HandlerError> = h.run("m-1", async { Ok("again".into()) }).await;
    match r {
        Err(HandlerError::Idem(Error::OutputNotReplayable {
            reason: NotReplayable::TooLarge,
        })) => {}
        other => panic!("expected OutputNotReplayable (too large), got {other:?}"),
    }
}

/// An output whose `Serialize` fails: the first delivery gets its value, the key is
/// Completed, and a duplicate is told that the output could not be serialized (not
/// that it was too large).
pub async fn unserializable_output_says_why(store: Arc<dyn Store>) {
    use std::collections::HashMap;
    // JSON object keys must be strings: a map keyed by tuples does not serialize
    let h = handler(&store, "unserializable-output");
    let value: HashMap<(u32, u32), u32> = HashMap::from([((1, 2), 3)]);
    let first = value.clone();
    let r: Result<HashMap<(u32, u32), u32>, HandlerError> =
        h.run("m-1", async move { Ok(first) }).await;
    assert_eq!(r.unwrap(), value);
    let r: Result<HashMap<(u32, u32), u32>, HandlerError> =
        h.run("m-1", async { Ok(HashMap::new()) }).await;
    match r {
        Err(HandlerError::Idem(
            e @ Error::OutputNotReplayable {
                reason: NotReplayable::NotSerializable { .. },
            },
        )) => assert!(e.to_string().contains("could not be serialized"), "{e}"),
        other => panic!("expected OutputNotReplayable (not serializable), got {other:?}"),
    }
}

/// `current_claim()` inside the handler matches the store's record.
pub async fn current_claim_matches_the_record(store: Arc<dyn Store>) {
    let h = handler(&store, "current-claim");
    assert!(current_claim().is_none());
    let seen = h
        .run("m-1", async {
            Ok::<_, HandlerError>(current_claim().map(|c| (c.token.get(), c.attempt)))
        })
        .await
        .unwrap()
        .expect("claim visible inside the handler");
    if let Some(found) = record(&*store, &h.record_key("m-1").unwrap()).await {
        let rec = found.unwrap();
        assert_eq!(seen, (rec.token.get(), 1));
    }
}

/// The batch protocol: each distinct key runs once, repeats inside the batch and keys
/// completed before get the cached output, failures are released for retry.
pub async fn batch_protocol_runs_each_key_once(store: Arc<dyn Store>) {
    let h = handler(&store, "batch-protocol");
    let runs: Vec<AtomicU32> = (0..10).map(|_| AtomicU32::new(0)).collect();
    // key 0 was completed by an earlier delivery
    let r: Result<u32, HandlerError> = h.run(&0u32, async { Ok(1000) }).await;
    assert_eq!(r.unwrap(), 1000);
    // keys 0..8, with key 3 twice (a send retry in the same pull) and key 7 failing
    let batch: Vec<u32> = vec![0, 1, 2, 3, 4, 3, 5, 6, 7];
    let results: Vec<Result<u32, HandlerError>> = h
        .run_batch(
            &batch,
            |id| *id,
            |id| {
                let runs = &runs;
                async move {
                    runs[*id as usize].fetch_add(1, Ordering::SeqCst);
                    if *id == 7 {
                        return Err(HandlerError::Business("declined"));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(id * 10)
                }
            },
        )
        .await;
    let shown: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(e) => format!("{e:?}"),
        })
        .collect();
    assert_eq!(
        &shown[..8],
        &["1000", "10", "20", "30", "40", "30", "50", "60"],
        "{shown:?}"
    );
    assert!(matches!(
        results[8],
        Err(HandlerError::Business("declined"))
    ));
    assert_eq!(
        runs[0].load(Ordering::SeqCst),
        0,
        "completed before: replayed"
    );
    assert_eq!(
        runs[3].load(Ordering::SeqCst),
        1,
        "a repeat in the batch runs once"
    );
    // a second delivery of the whole batch runs only the failed key
    let again: Vec<Result<u32, HandlerError>> = h
        .run_batch(
            &batch,
            |id| *id,
            |id| {
                let runs = &runs;
                async move {
                    runs[*id as usize].fetch_add(1, Ordering::SeqCst);
                    Ok(id * 10)
                }
            },
        )
        .await;
    assert_eq!(again[8].as_ref().unwrap(), &70);
    for (id, n) in runs.iter().enumerate().take(7).skip(1) {
        assert_eq!(n.load(Ordering::SeqCst), 1, "key {id}");
    }
    assert_eq!(runs[7].load(Ordering::SeqCst), 2);
    if let Some(found) = record(&*store, &h.record_key(&7u32).unwrap()).await {
        let rec = found.unwrap();
        assert_eq!((rec.state, rec.attempts), (RecordState::Completed, 2));
    }
}

/// `run_batch_with_fingerprint`: a key seen before with another fingerprint (in an
/// earlier batch, or earlier in the same batch) is a mismatch and its handler does not
/// run; the same fingerprint replays.
pub async fn batch_fingerprints_are_checked(store: Arc<dyn Store>) {
    let h = handler(&store, "batch-fp");
    let runs = AtomicU32::new(0);
    let batch = [("a", 1u32), ("b", 1), ("a", 2), ("c", 0), ("c", 1)];
    let r: Vec<Result<u32, HandlerError>> = h
        .run_batch_with_fingerprint(
            &batch,
            |m| m.0,
            |m| m.1,
            |m| {
                let runs = &runs;
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    match m.1 {
                        0 => Err(HandlerError::Business("fails")),
                        n => Ok(n * 10),
                    }
                }
            },
        )
        .await;
    assert_eq!(r[0].as_ref().unwrap(), &10);
    assert_eq!(r[1].as_ref().unwrap(), &10);
    assert!(
        matches!(r[2], Err(HandlerError::Idem(Error::FingerprintMismatch))),
        "{:?}",
        r[2]
    );
    assert!(matches!(r[3], Err(HandlerError::Business("fails"))));
    // the first `c` failed and released its claim; its record keeps the fingerprint it
    // was created with, so the repeat with another one is refused too (rule 2 of
    // `ClaimOutcome`)
    assert!(
        matches!(r[4], Err(HandlerError::Idem(Error::FingerprintMismatch))),
        "{:?}",
        r[4]
    );
    let ran_first = runs.load(Ordering::SeqCst);
    assert_eq!(ran_first, 3, "a, b and the first c ran");

    let again = [("a", 1u32), ("a", 2), ("b", 3)];
    let r: Vec<Result<u32, HandlerError>> = h
        .run_batch_with_fingerprint(
            &again,
            |m| m.0,
            |m| m.1,
            |m| {
                let runs = &runs;
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(m.1 * 100)
                }
            },
        )
        .await;
    assert_eq!(r[0].as_ref().unwrap(), &10, "replayed, not run again");
    assert!(matches!(
        r[1],
        Err(HandlerError::Idem(Error::FingerprintMismatch))
    ));
    assert!(matches!(
        r[2],
        Err(HandlerError::Idem(Error::FingerprintMismatch))
    ));
    assert_eq!(runs.load(Ordering::SeqCst), ran_first, "no handler ran");
}

/// `observe` tells the caller how each message ended without reading logs.
pub async fn observe_tells_replays_from_executions(store: Arc<dyn Store>) {
    use crate::protocol::{Outcome, observe};
    let h = handler(&store, "observe");
    let (r, o) = observe(h.run("m-1", async { Ok::<_, HandlerError>(7) })).await;
    assert_eq!((r.unwrap(), o), (7, Some(Outcome::Executed)));
    let (r, o) = observe(h.run("m-1", async { Ok::<_, HandlerError>(8) })).await;
    assert_eq!((r.unwrap(), o), (7, Some(Outcome::Replayed)));
    let (r, o) = observe(h.run("m-2", async { Err::<u32, _>(HandlerError::Business("no")) })).await;
    assert!(matches!(r, Err(HandlerError::Business("no"))));
    assert_eq!(o, Some(Outcome::Failed));
    // a handler that runs another: the caller sees the outer one's outcome
    let inner = handler(&store, "observe-inner");
    let (r, o) = observe(h.run("m-3", async {
        let v: u32 = inner.run("i-1", async { Ok::<_, HandlerError>(1) }).await?;
        let w: u32 = inner.run("i-1", async { Ok::<_, HandlerError>(2) }).await?;
        Ok::<_, HandlerError>(v + w)
    }))
    .await;
    assert_eq!((r.unwrap(), o), (2, Some(Outcome::Executed)));
    let (_, o) = observe(h.run("m-3", async { Ok::<_, HandlerError>(0) })).await;
    assert_eq!(o, Some(Outcome::Replayed));
}
