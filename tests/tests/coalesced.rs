//! `store::coalesce::Coalesced`: concurrent single steps go to the inner store as batch calls,
//! each step gets its own answer, two steps of one key never share a call, and
//! cancelled callers neither block the others nor get their steps sent.

use async_trait::async_trait;
use idempotent_runtime::MemoryStore;
use idempotent_runtime::store::coalesce::Coalesced;
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, RecordKey, Release, Store, StoreError,
    StoreErrorKind, Token,
};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

/// A memory store behind a round trip of `delay`, recording the keys of each call.
#[derive(Debug, Default)]
struct Slow {
    inner: MemoryStore,
    calls: StdMutex<Vec<Vec<RecordKey>>>,
    fail_batches: std::sync::atomic::AtomicBool,
}

const DELAY: Duration = Duration::from_millis(20);

impl Slow {
    async fn trip(&self, keys: Vec<RecordKey>) -> Result<(), StoreError> {
        self.calls.lock().unwrap().push(keys);
        tokio::time::sleep(DELAY).await;
        Ok(())
    }

    fn calls(&self) -> Vec<Vec<RecordKey>> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Store for Slow {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.trip(vec![req.key.clone()]).await?;
        self.inner.claim(req).await
    }
    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        self.trip(vec![c.key.clone()]).await?;
        self.inner.complete(c).await
    }
    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        self.trip(vec![r.key.clone()]).await?;
        self.inner.release(r).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        self.trip(reqs.iter().map(|r| r.key.clone()).collect())
            .await?;
        if self.fail_batches.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "batch refused",
            ));
        }
        self.inner.claim_batch(reqs).await
    }
    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.trip(items.iter().map(|c| c.key.clone()).collect())
            .await?;
        self.inner.complete_batch(items).await
    }
}

fn key(i: usize) -> RecordKey {
    RecordKey::new("coalesce", &format!("k{i}")).unwrap()
}

fn claim_of(key: &RecordKey) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
        fingerprint: None,
        max_attempts: None,
    }
}

fn token(o: &ClaimOutcome) -> Token {
    match o {
        ClaimOutcome::Acquired { token, .. } => *token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

#[tokio::test]
async fn concurrent_steps_go_as_batches_and_each_gets_its_own_answer() {
    let store = Arc::new(Coalesced::new(Slow::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            let k = key(i);
            let t = token(&store.claim(&claim_of(&k)).await.unwrap());
            let out = format!("out{i}");
            let c = Completion {
                key: &k,
                token: t,
                output: Some(out.as_bytes()),
                ttl: Duration::from_secs(60),
            };
            assert_eq!(store.complete(&c).await.unwrap(), Fence::Held);
            i
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 32);
    let calls = store.inner().calls();
    // 32 claims and 32 completions: the first of each goes alone, the rest in batches
    assert!(calls.len() < 16, "{} calls for 64 steps", calls.len());
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 64);
    for i in 0..32 {
        let k = key(i);
        match store.claim(&claim_of(&k)).await.unwrap() {
            ClaimOutcome::Completed { output, .. } => {
                assert_eq!(output.as_deref(), Some(format!("out{i}").as_bytes()))
            }
            other => panic!("{i}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_lone_step_goes_at_once_as_a_single_call() {
    let store = Coalesced::new(Slow::default());
    let k = key(0);
    let started = std::time::Instant::now();
    token(&store.claim(&claim_of(&k)).await.unwrap());
    assert!(started.elapsed() < DELAY * 3);
    assert_eq!(store.inner().calls(), vec![vec![k]]);
}

#[tokio::test]
async fn two_steps_of_one_key_never_share_a_batch() {
    let store = Arc::new(Coalesced::new(Slow::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let store = store.clone();
        // keys 0..8, three claims each
        tasks.spawn(async move { store.claim(&claim_of(&key(i % 8))).await.unwrap() });
    }
    let mut acquired = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r.unwrap(), ClaimOutcome::Acquired { .. }) {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 8, "one claim per key acquires it");
    for call in store.inner().calls() {
        let distinct: HashSet<_> = call.iter().collect();
        assert_eq!(
            distinct.len(),
            call.len(),
            "a batch repeats a key: {call:?}"
        );
    }
}

#[tokio::test]
async fn a_failed_batch_fails_each_of_its_steps_and_the_lane_goes_on() {
    let store = Arc::new(Coalesced::new(Slow::default()));
    store
        .inner()
        .fail_batches
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.spawn(async move { store.claim(&claim_of(&key(i))).await.map(|_| ()) });
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            assert_eq!(e.kind(), StoreErrorKind::Unavailable);
            assert!(e.to_string().contains("batch refused"), "{e}");
            failed += 1;
        }
    }
    // the first went alone; the seven queued behind it went as one refused batch
    assert_eq!(failed, 7);
    store
        .inner()
        .fail_batches
        .store(false, std::sync::atomic::Ordering::SeqCst);
    token(&store.claim(&claim_of(&key(100))).await.unwrap());
}

#[tokio::test]
async fn a_dropped_waiter_is_left_out_and_a_dropped_leader_frees_the_lane() {
    let store = Arc::new(Coalesced::new(Slow::default()));
    // a lone call in flight
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_of(&key(0))).await.unwrap() }
    });
    tokio::time::sleep(DELAY / 4).await;
    // a queued step whose caller gives up before the call returns
    let gave_up = tokio::time::timeout(DELAY / 4, store.claim(&claim_of(&key(1)))).await;
    assert!(gave_up.is_err());
    token(&first.await.unwrap());
    // the step of the caller that gave up was never sent
    assert!(store.inner().calls().iter().all(|c| !c.contains(&key(1))));

    // a leader cancelled during its batch call: the others fail, retryable
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_of(&key(2))).await.unwrap() }
    });
    tokio::time::sleep(DELAY / 4).await;
    let leader = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_of(&key(3))).await }
    });
    tokio::time::sleep(DELAY / 8).await;
    let follower = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_of(&key(4))).await }
    });
    token(&first.await.unwrap());
    // the leader's batch call is in flight now
    tokio::time::sleep(DELAY / 4).await;
    leader.abort();
    let e = follower.await.unwrap().unwrap_err();
    assert!(e.is_retryable(), "{e}");
    // and the lane is free for the next step
    let k = key(5);
    tokio::time::timeout(DELAY * 10, store.claim(&claim_of(&k)))
        .await
        .expect("the lane was handed on")
        .unwrap();
}
