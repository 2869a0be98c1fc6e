//! A store written outside the runtime, against the public contract only: one that
//! implements just the four protocol steps passes the protocol conformance cases; a
//! wrapper store that forwards `as_admin` keeps its inner store's scans, statistics
//! and operator actions (the admin cases pass through it); one that does not forward
//! it has none, and every operator path says so.

use async_trait::async_trait;
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, RecordKey, Release, Store, StoreAdmin,
    StoreError, StoreErrorKind, Token, admin_of,
};
use idempotent_runtime::{Error, Idempotency, MemoryStore};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- a store of four methods

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    InProgress,
    Completed,
    Released,
}

#[derive(Debug)]
struct Entry {
    state: State,
    attempts: u32,
    token: u64,
    lease_until: Instant,
    expires_at: Instant,
    fingerprint: Option<Vec<u8>>,
    output: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Map {
    records: HashMap<Vec<u8>, Entry>,
    last_token: u64,
}

/// One `Mutex<HashMap>` on the process's clock; tokens come from one counter, so they
/// grow per record whatever happens to it. No operator actions.
#[derive(Debug, Default)]
struct MapStore(Mutex<Map>);

impl MapStore {
    /// Runs `f` on the live record of `key` while `token` owns it (In progress).
    fn owned(&self, key: &RecordKey, token: Token, f: impl FnOnce(&mut Entry, Instant)) -> Fence {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap();
        match map.records.get_mut(key.as_bytes()) {
            Some(e)
                if e.expires_at > now && e.token == token.get() && e.state == State::InProgress =>
            {
                f(e, now);
                Fence::Held
            }
            _ => Fence::Lost,
        }
    }

    /// A completion or release that `token` already made: a retry after a lost reply.
    fn already(&self, key: &RecordKey, token: Token, state: State) -> Fence {
        let map = self.0.lock().unwrap();
        match map.records.get(key.as_bytes()) {
            Some(e)
                if e.expires_at > Instant::now() && e.token == token.get() && e.state == state =>
            {
                Fence::Held
            }
            _ => Fence::Lost,
        }
    }
}

#[async_trait]
impl Store for MapStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let now = Instant::now();
        let mut guard = self.0.lock().unwrap();
        let map = &mut *guard;
        let keep = req.ttl.max(req.lease);
        if let Some(e) = map
            .records
            .get_mut(req.key.as_bytes())
            .filter(|e| e.expires_at > now)
        {
            if let (Some(had), Some(asked)) = (&e.fingerprint, req.fingerprint)
                && had.as_slice() != asked
            {
                return Ok(ClaimOutcome::FingerprintMismatch);
            }
            match e.state {
                State::Completed => {
                    return Ok(ClaimOutcome::Completed {
                        output: e.output.clone(),
                    });
                }
                State::InProgress if e.lease_until > now => {
                    return Ok(ClaimOutcome::InProgress {
                        retry_after: e.lease_until - now,
                    });
                }
                _ if req.max_attempts.is_some_and(|max| e.attempts >= max) => {
                    return Ok(ClaimOutcome::Exhausted {
                        attempts: e.attempts,
                    });
                }
                _ => {}
            }
            map.last_token += 1;
            e.state = State::InProgress;
            e.attempts += 1;
            e.token = map.last_token;
            e.lease_until = now + req.lease;
            e.expires_at = e.expires_at.max(now + keep);
            return Ok(ClaimOutcome::Acquired {
                token: Token::new(e.token),
                attempt: e.attempts,
            });
        }
        map.last_token += 1;
        let entry = Entry {
            state: State::InProgress,
            attempts: 1,
            token: map.last_token,
            lease_until: now + req.lease,
            expires_at: now + keep,
            fingerprint: req.fingerprint.map(<[u8]>::to_vec),
            output: None,
        };
        map.records.insert(req.key.as_bytes().to_vec(), entry);
        Ok(ClaimOutcome::Acquired {
            token: Token::new(map.last_token),
            attempt: 1,
        })
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        let done = self.owned(c.key, c.token, |e, now| {
            e.state = State::Completed;
            e.output = c.output.map(<[u8]>::to_vec);
            e.expires_at = now + c.ttl;
        });
        Ok(match done {
            Fence::Held => Fence::Held,
            Fence::Lost => self.already(c.key, c.token, State::Completed),
        })
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        let done = self.owned(r.key, r.token, |e, _| e.state = State::Released);
        Ok(match done {
            Fence::Held => Fence::Held,
            Fence::Lost => self.already(r.key, r.token, State::Released),
        })
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        Ok(self.owned(key, token, |e, now| {
            e.lease_until = now + lease;
            e.expires_at = e.expires_at.max(e.lease_until);
        }))
    }
}

/// The protocol cases, one test each, on the store of four methods.
mod four_methods {
    use super::*;
    idempotent_runtime::protocol_conformance_suite!(async {
        Arc::new(MapStore::default()) as Arc<dyn Store>
    });
}

// ---------------------------------------------------------------- wrappers

/// A wrapper that counts claims and forwards everything else, `as_admin` included.
#[derive(Debug, Default)]
struct Forwarding<S> {
    inner: S,
    claims: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl<S: Store> Store for Forwarding<S> {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.claim(req).await
    }
    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        self.inner.complete(c).await
    }
    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
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
    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        self.inner.as_admin()
    }
}

/// A wrapper that forwards the four protocol steps only.
#[derive(Debug, Default)]
struct Opaque<S>(S);

#[async_trait]
impl<S: Store> Store for Opaque<S> {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.0.claim(req).await
    }
    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        self.0.complete(c).await
    }
    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        self.0.release(r).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.0.renew(key, token, lease).await
    }
}

/// Every case, protocol and admin, through the forwarding wrapper over a memory store:
/// scans, statistics and the operator actions survive the wrapper.
mod forwarding_wrapper {
    use super::*;
    idempotent_runtime::protocol_conformance_suite!(async {
        Arc::new(Forwarding::<MemoryStore>::default()) as Arc<dyn Store>
    });
    idempotent_runtime::admin_conformance_suite!(async {
        Arc::new(Forwarding::<MemoryStore>::default()) as Arc<dyn Store>
    });
}

/// The protocol cases with the single steps coalesced into batch calls, over a store
/// that answers after a delay (so that steps meet a call in flight) and whose batch
/// methods are the trait's defaults.
mod coalesced {
    use super::*;
    use idempotent_runtime::store::coalesce::Coalesced;
    use idempotent_runtime::testing::FaultyStore;
    idempotent_runtime::protocol_conformance_suite!(async {
        let store = FaultyStore::new(MemoryStore::new());
        store.set_delay(std::time::Duration::from_millis(1));
        Arc::new(Coalesced::new(store)) as Arc<dyn Store>
    });
}

/// The protocol cases through the wrapper that forwards only the protocol steps.
mod opaque_wrapper {
    use super::*;
    idempotent_runtime::protocol_conformance_suite!(async {
        Arc::new(Opaque(MemoryStore::new())) as Arc<dyn Store>
    });
}

/// The error of an operator action on a store without any: Rejected, saying so and
/// naming the store.
fn assert_no_admin(e: &StoreError, store_name: &str) {
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("this store has no operator actions"),
        "{text}"
    );
    assert!(
        text.contains(store_name),
        "the error names the store: {text}"
    );
}

#[tokio::test]
async fn a_wrapper_that_forwards_as_admin_keeps_scans_and_stats() {
    let store = Forwarding::<MemoryStore>::default();
    let scope = idempotent_runtime::testing::conformance::unique_scope("forwarded");
    let k = RecordKey::new(&scope, "m-1").unwrap();
    let token = idempotent_runtime::testing::conformance::acquire_token(
        &store,
        &idempotent_runtime::testing::conformance::claim_request(&k, Duration::from_secs(30)),
    )
    .await;
    let admin = admin_of(&store).expect("the wrapper forwards as_admin");
    let rec = admin.inspect(&k).await.unwrap().expect("the record");
    assert_eq!(rec.token, token);
    let stats = admin.stats(Some(&scope), None).await.unwrap();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].count, 1, "{stats:?}");
    assert_eq!(
        store.claims.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the claim went through the wrapper"
    );
}

#[tokio::test]
async fn a_wrapper_that_does_not_forward_as_admin_has_no_operator_actions() {
    let store: Arc<dyn Store> = Arc::new(Opaque(MemoryStore::new()));
    assert!(store.as_admin().is_none());
    let e = admin_of(&*store).err().expect("no operator actions");
    assert_no_admin(&e, "Opaque(MemoryStore");

    // the handle's operator helpers fail with that error, after the body ran once
    let h = Idempotency::new(idempotent_runtime::testing::conformance::unique_scope(
        "opaque",
    ))
    .shared_store(store.clone());
    let r: Result<u32, Error> = h.run("m-1", async { Ok(1) }).await;
    assert_eq!(r.unwrap(), 1);
    for e in [
        h.inspect("m-1").await.map(drop).unwrap_err(),
        h.forget("m-1").await.map(drop).unwrap_err(),
    ] {
        match e {
            Error::Store(e) => assert_no_admin(&e, "Opaque(MemoryStore"),
            other => panic!("expected a store error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_store_of_four_methods_has_no_operator_actions() {
    let store = MapStore::default();
    assert!(store.as_admin().is_none());
    assert_no_admin(&admin_of(&store).err().expect("none"), "MapStore");
}

#[tokio::test]
#[should_panic(expected = "the admin cases need a store with operator actions")]
async fn the_admin_cases_refuse_a_store_without_operator_actions() {
    idempotent_runtime::testing::conformance::forget_and_inspect(Arc::new(Opaque(
        MemoryStore::new(),
    )))
    .await;
}

/// A store that accepts every completion, whoever holds the claim.
#[derive(Debug, Default)]
struct Unfenced(MapStore);

#[async_trait]
impl Store for Unfenced {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.0.claim(req).await
    }
    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        self.0.complete(c).await?;
        Ok(Fence::Held)
    }
    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        self.0.release(r).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.0.renew(key, token, lease).await
    }
}

/// The protocol cases catch a store that breaks the contract.
#[tokio::test]
#[should_panic(expected = "left: Held")]
async fn the_protocol_cases_catch_a_store_without_fencing() {
    idempotent_runtime::testing::conformance::stale_owner_is_fenced(Arc::new(Unfenced::default()))
        .await;
}
