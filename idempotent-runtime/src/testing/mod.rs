//! Test your own handlers under the failures that cause duplicates, and your own
//! stores against the store contract ([`conformance`]) (feature `testing`).
//!
//! [`FaultyStore`] wraps any store and injects faults on command: the store going
//! down, completions that never arrive, completions whose reply never arrives,
//! renewals that never arrive (so leases expire under a running handler), a slow store,
//! and a write path blocked from outside (as another connection holding a database's
//! write lock blocks a single-writer store). It also counts the calls each protocol
//! step makes, so tests can assert round trips. Its operator actions
//! ([`as_admin`](Store::as_admin)) are the wrapped store's, without faults. Pair it with a
//! [`MemoryStore`](crate::MemoryStore) on a [`ManualClock`] to move
//! time by hand.
//!
//! ```
//! use idempotent_runtime::testing::FaultyStore;
//! use idempotent_runtime::{Error, Idempotency, MemoryStore};
//! use std::sync::Arc;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = Arc::new(FaultyStore::new(MemoryStore::new()));
//! let payments = Idempotency::new("payments").shared_store(store.clone());
//!
//! store.set_down(true);
//! let r: Result<(), Error> = payments.run("p-1", async { panic!("must not run") }).await;
//! assert!(matches!(r, Err(Error::Store(_)))); // fail closed: the body did not run
//!
//! store.set_down(false);
//! let r: Result<(), Error> = payments.run("p-1", async { Ok(()) }).await;
//! assert!(r.is_ok());
//! assert_eq!(store.calls().claim, 2);
//! # });
//! ```

pub mod conformance;

pub use crate::clock::ManualClock;
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::admin::StoreAdmin;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Release, Store, Token};
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many times each operation was called on a [`FaultyStore`] (faulted calls included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Calls {
    /// `claim` and one per request of `claim_batch`.
    pub claim: u64,
    /// `complete` and one per item of `complete_batch`.
    pub complete: u64,
    /// `release` and one per item of `release_batch`.
    pub release: u64,
    /// `renew`.
    pub renew: u64,
}

/// A store wrapper that injects faults; see the [module docs](self).
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    down: AtomicBool,
    lose_completions: AtomicU64,
    lose_completion_replies: AtomicU64,
    drop_renewals: AtomicBool,
    delay: Mutex<Duration>,
    writer: Arc<tokio::sync::Mutex<()>>,
    claim: AtomicU64,
    complete: AtomicU64,
    release: AtomicU64,
    renew: AtomicU64,
}

fn unavailable(what: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        format!("injected fault: {what}"),
    )
}

impl<S: Store> FaultyStore<S> {
    /// Wraps `inner` with no faults active.
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            down: AtomicBool::new(false),
            lose_completions: AtomicU64::new(0),
            lose_completion_replies: AtomicU64::new(0),
            drop_renewals: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            claim: AtomicU64::new(0),
            complete: AtomicU64::new(0),
            release: AtomicU64::new(0),
            renew: AtomicU64::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// While down, every operation fails with [`StoreErrorKind::Unavailable`].
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The next `n` completions never reach the store: the caller sees an
    /// unavailable error, the record stays In progress until its lease expires.
    pub fn lose_next_completions(&self, n: u64) {
        self.lose_completions.store(n, Ordering::SeqCst);
    }

    /// The next `n` completions are applied by the store but their reply is lost: the
    /// caller sees an unavailable error while the record is already Completed (a
    /// store that applied the write and died before answering).
    pub fn lose_next_completion_replies(&self, n: u64) {
        self.lose_completion_replies.store(n, Ordering::SeqCst);
    }

    /// Blocks the store's write path until the returned guard is dropped.
    ///
    /// Every claim, completion, release and renewal goes through one writer, in
    /// order, as on a single-writer store (SQLite); while the guard is held they queue
    /// behind it, as they do while another connection holds the database's write lock.
    /// Waits for the writes already running to finish.
    pub async fn block_writes(&self) -> WriteBlock {
        WriteBlock(self.writer.clone().lock_owned().await)
    }

    /// While set, renewals are dropped (answered as held, never applied), so the
    /// lease of a running handler expires as if its process had stalled.
    pub fn drop_renewals(&self, on: bool) {
        self.drop_renewals.store(on, Ordering::SeqCst);
    }

    /// Delays every operation by `delay` (a slow store or network).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Calls made so far.
    pub fn calls(&self) -> Calls {
        Calls {
            claim: self.claim.load(Ordering::SeqCst),
            complete: self.complete.load(Ordering::SeqCst),
            release: self.release.load(Ordering::SeqCst),
            renew: self.renew.load(Ordering::SeqCst),
        }
    }

    async fn gate(&self, what: &str) -> Result<(), StoreError> {
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(unavailable(what));
        }
        Ok(())
    }

    fn take_lost_completion(&self) -> bool {
        take_one(&self.lose_completions)
    }
}

fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The write path of a [`FaultyStore`] blocked by
/// [`block_writes`](FaultyStore::block_writes); dropping it lets the queued writes run.
#[derive(Debug)]
#[must_use = "the writes are blocked only while this guard is held"]
pub struct WriteBlock(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.claim.fetch_add(1, Ordering::SeqCst);
        self.gate("store down").await?;
        let _writer = self.writer.lock().await;
        self.inner.claim(req).await
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        self.complete.fetch_add(1, Ordering::SeqCst);
        self.gate("store down").await?;
        if self.take_lost_completion() {
            return Err(unavailable("completion lost"));
        }
        let _writer = self.writer.lock().await;
        let fence = self.inner.complete(c).await?;
        if take_one(&self.lose_completion_replies) {
            return Err(unavailable("completion applied, its reply lost"));
        }
        Ok(fence)
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        self.release.fetch_add(1, Ordering::SeqCst);
        self.gate("store down").await?;
        let _writer = self.writer.lock().await;
        self.inner.release(r).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.renew.fetch_add(1, Ordering::SeqCst);
        self.gate("store down").await?;
        if self.drop_renewals.load(Ordering::SeqCst) {
            return Ok(Fence::Held);
        }
        let _writer = self.writer.lock().await;
        self.inner.renew(key, token, lease).await
    }

    /// The inner store's operator actions, without faults: they are not protocol
    /// steps, and a test reads through them what the faults left behind.
    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        self.inner.as_admin()
    }
}
