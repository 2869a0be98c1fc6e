//! What the conformance cases share: their leases and ttl, a scope per case, claim
//! requests, and the steps they take.

use crate::error::Error;
use crate::key::RecordKey;
use crate::manual::Idempotency;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Record, Release, Store, Token};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Short lease of the cases that wait for a lease to run out.
pub const LEASE: Duration = Duration::from_millis(300);
/// Lease of the cases that do not wait for expiry: long enough that a loaded machine
/// never lets it lapse mid-case.
pub(super) const LONG_LEASE: Duration = Duration::from_secs(30);
/// The ttl of the records the cases claim.
pub const TTL: Duration = Duration::from_secs(60);

/// A scope no other case, test or run uses (`conformance::{case}::{random}`), so that
/// cases can run in parallel against one shared store.
pub fn unique_scope(case: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("conformance::{case}::{:016x}", h.finish())
}

pub(super) fn key(scope: &str, k: &str) -> RecordKey {
    RecordKey::new(scope, k).expect("valid key")
}

/// A claim of `key` with `lease`, a ttl of [`TTL`], no fingerprint and no attempt limit.
pub fn claim_request(key: &RecordKey, lease: Duration) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        lease,
        ttl: TTL,
        fingerprint: None,
        max_attempts: None,
    }
}

pub(super) fn req(key: &RecordKey) -> ClaimRequest<'_> {
    claim_request(key, LONG_LEASE)
}

/// A claim with the short lease, for the cases that wait for it to expire.
pub(super) fn short(key: &RecordKey) -> ClaimRequest<'_> {
    ClaimRequest {
        lease: LEASE,
        ..req(key)
    }
}

pub(super) async fn acquire(store: &dyn Store, r: &ClaimRequest<'_>) -> (Token, u32) {
    match store.claim(r).await.expect("claim") {
        ClaimOutcome::Acquired { token, attempt } => (token, attempt),
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Claims `r`, which must be acquired; its token.
pub async fn acquire_token(store: &dyn Store, r: &ClaimRequest<'_>) -> Token {
    acquire(store, r).await.0
}

pub(super) async fn complete(
    store: &dyn Store,
    key: &RecordKey,
    token: Token,
    output: &[u8],
) -> Fence {
    store
        .complete(&Completion {
            key,
            token,
            output: Some(output),
            ttl: TTL,
        })
        .await
        .expect("complete")
}

pub(super) async fn release(store: &dyn Store, key: &RecordKey, token: Token) -> Fence {
    store
        .release(&Release { key, token })
        .await
        .expect("release")
}

/// The record of `key` read with the store's operator actions, or `None` when the
/// store has none: the protocol cases check the records they leave only on a store
/// that can read them.
pub(super) async fn record(store: &dyn Store, key: &RecordKey) -> Option<Option<Record>> {
    match store.as_admin() {
        Some(admin) => Some(admin.inspect(key).await.expect("inspect")),
        None => None,
    }
}

pub(super) fn handler(store: &Arc<dyn Store>, case: &str) -> Idempotency {
    Idempotency::new(unique_scope(case))
        .shared_store(store.clone())
        .lease(LEASE)
        .ttl(TTL)
}

/// The error type of the handlers in the cases.
#[derive(Debug)]
pub enum HandlerError {
    /// From the protocol.
    Idem(Error),
    /// From the handler body.
    Business(&'static str),
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        HandlerError::Idem(e)
    }
}
