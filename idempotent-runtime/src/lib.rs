#![doc = include_str!("../README.md")]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]

mod batch;
mod clock;
mod disposition;
mod error;
mod fingerprint;
mod key;
mod manual;
mod memory;
mod output;
mod protocol;
mod registry;
mod scan;
mod scope;
mod store;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "rocketmq")]
pub mod rocketmq;

#[cfg(feature = "kafka")]
pub mod kafka;

#[cfg(feature = "amqp")]
pub mod amqp;

#[cfg(feature = "tower")]
pub mod http;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;

#[cfg(feature = "redis")]
mod redis_store;
/// The `redis` driver this crate's [`RedisStore`] uses.
#[cfg(feature = "redis")]
pub use redis;
#[cfg(feature = "redis")]
pub use redis_store::*;

#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
pub use sql::*;
/// The `sqlx` driver this crate's SQL stores use.
#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
pub use sqlx;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use clock::{Clock, ManualClock, SystemClock};
pub use disposition::{AsIdempotencyError, Disposition, RetryPolicy};
pub use error::{Error, NotReplayable, StoreError, StoreErrorKind};
pub use fingerprint::fingerprint;
pub use idempotent_macros::idempotent;
pub use key::{KeyBuilder, KeyPart, MAX_KEY_BYTES, MAX_SCOPE_BYTES, RecordKey};
pub use manual::Idempotency;
pub use memory::MemoryStore;
pub use protocol::{
    Claim, DEFAULT_MAX_OUTPUT_BYTES, MIN_LEASE, OnInProgress, OnStoreError, Settings,
    current_claim, set_max_output_bytes,
};
pub use registry::{register_store, registered_store};
pub use scan::{
    AdminOutcome, DEFAULT_PAGE, ScanCursor, ScanFilter, ScanItem, ScanPage, ScopeStats,
    stats_by_scan,
};
pub use store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release, Store, Token,
};

/// `Arc<S>` is a store, so one store can be registered and also kept.
#[async_trait::async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        (**self).claim(req).await
    }
    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        (**self).complete(c).await
    }
    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        (**self).release(r).await
    }
    fn claim_now(&self, req: &ClaimRequest<'_>) -> Option<Result<ClaimOutcome, StoreError>> {
        (**self).claim_now(req)
    }
    fn complete_now(&self, c: &Completion<'_>) -> Option<Result<Fence, StoreError>> {
        (**self).complete_now(c)
    }
    fn release_now(&self, r: &Release<'_>) -> Option<Result<Fence, StoreError>> {
        (**self).release_now(r)
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: std::time::Duration,
    ) -> Result<Fence, StoreError> {
        (**self).renew(key, token, lease).await
    }
    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        (**self).inspect(key).await
    }
    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        (**self).forget(key).await
    }
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        (**self).purge_expired().await
    }
    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        (**self).scan(filter, cursor, limit).await
    }
    async fn stats(
        &self,
        scope: Option<&str>,
        poisoned_at: Option<u32>,
    ) -> Result<Vec<ScopeStats>, StoreError> {
        (**self).stats(scope, poisoned_at).await
    }
    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        (**self).force_release(key).await
    }
    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        (**self).reset_attempts(key).await
    }
    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        (**self).claim_batch(reqs).await
    }
    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        (**self).complete_batch(items).await
    }
    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        (**self).release_batch(items).await
    }
}
