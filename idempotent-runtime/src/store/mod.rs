//! For store implementers and operators' tools: the [`Store`] trait (the protocol
//! steps every store implements atomically on its own side), the [`StoreAdmin`] trait
//! (the operator actions: inspect, forget, purge, scan, stats, force release, reset
//! attempts), their request and record types, record scans, and [`DedupTransaction`]
//! for transactional mode. Handler authors need none of it beyond the stores
//! themselves.
//!
//! # Writing a store
//!
//! Implement the four protocol steps of [`Store`]; the rules are on [`ClaimOutcome`]
//! and on each method. A store whose map is one `Mutex<HashMap>` on the process's
//! clock:
//!
//! ```
//! use async_trait::async_trait;
//! use idempotent_runtime::store::{
//!     ClaimOutcome, ClaimRequest, Completion, Fence, RecordKey, Release, Store, StoreError,
//!     Token,
//! };
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::{Duration, Instant};
//!
//! #[derive(Debug, Clone, Copy, PartialEq)]
//! enum State {
//!     InProgress,
//!     Completed,
//!     Released,
//! }
//!
//! #[derive(Debug)]
//! struct Entry {
//!     state: State,
//!     attempts: u32,
//!     token: u64,
//!     lease_until: Instant,
//!     expires_at: Instant,
//!     fingerprint: Option<Vec<u8>>,
//!     output: Option<Vec<u8>>,
//! }
//!
//! #[derive(Debug, Default)]
//! struct Map {
//!     records: HashMap<Vec<u8>, Entry>,
//!     last_token: u64,
//! }
//!
//! /// Tokens come from one counter, so they grow per record whatever happens to it.
//! #[derive(Debug, Default)]
//! pub struct MapStore(Mutex<Map>);
//!
//! impl MapStore {
//!     /// Runs `f` on the live record of `key` while `token` owns it (In progress).
//!     fn owned(&self, key: &RecordKey, token: Token, f: impl FnOnce(&mut Entry, Instant)) -> Fence {
//!         let now = Instant::now();
//!         let mut map = self.0.lock().unwrap();
//!         match map.records.get_mut(key.as_bytes()) {
//!             Some(e) if e.expires_at > now && e.token == token.get() && e.state == State::InProgress => {
//!                 f(e, now);
//!                 Fence::Held
//!             }
//!             _ => Fence::Lost,
//!         }
//!     }
//!
//!     /// A completion or release that `token` already made: a retry after a lost reply.
//!     fn already(&self, key: &RecordKey, token: Token, state: State) -> Fence {
//!         let map = self.0.lock().unwrap();
//!         match map.records.get(key.as_bytes()) {
//!             Some(e) if e.expires_at > Instant::now() && e.token == token.get() && e.state == state => {
//!                 Fence::Held
//!             }
//!             _ => Fence::Lost,
//!         }
//!     }
//! }
//!
//! #[async_trait]
//! impl Store for MapStore {
//!     async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
//!         let now = Instant::now();
//!         let mut guard = self.0.lock().unwrap();
//!         let map = &mut *guard;
//!         let keep = req.ttl.max(req.lease);
//!         if let Some(e) = map.records.get_mut(req.key.as_bytes()).filter(|e| e.expires_at > now) {
//!             if let (Some(had), Some(asked)) = (&e.fingerprint, req.fingerprint) {
//!                 if had.as_slice() != asked {
//!                     return Ok(ClaimOutcome::FingerprintMismatch);
//!                 }
//!             }
//!             match e.state {
//!                 State::Completed => {
//!                     return Ok(ClaimOutcome::Completed { output: e.output.clone() });
//!                 }
//!                 State::InProgress if e.lease_until > now => {
//!                     return Ok(ClaimOutcome::InProgress { retry_after: e.lease_until - now });
//!                 }
//!                 _ if req.max_attempts.is_some_and(|max| e.attempts >= max) => {
//!                     return Ok(ClaimOutcome::Exhausted { attempts: e.attempts });
//!                 }
//!                 _ => {}
//!             }
//!             map.last_token += 1;
//!             e.state = State::InProgress;
//!             e.attempts += 1;
//!             e.token = map.last_token;
//!             e.lease_until = now + req.lease;
//!             e.expires_at = e.expires_at.max(now + keep);
//!             return Ok(ClaimOutcome::Acquired { token: Token::new(e.token), attempt: e.attempts });
//!         }
//!         map.last_token += 1;
//!         let entry = Entry {
//!             state: State::InProgress,
//!             attempts: 1,
//!             token: map.last_token,
//!             lease_until: now + req.lease,
//!             expires_at: now + keep,
//!             fingerprint: req.fingerprint.map(<[u8]>::to_vec),
//!             output: None,
//!         };
//!         map.records.insert(req.key.as_bytes().to_vec(), entry);
//!         Ok(ClaimOutcome::Acquired { token: Token::new(map.last_token), attempt: 1 })
//!     }
//!
//!     async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
//!         let done = self.owned(c.key, c.token, |e, now| {
//!             e.state = State::Completed;
//!             e.output = c.output.map(<[u8]>::to_vec);
//!             e.expires_at = now + c.ttl;
//!         });
//!         Ok(match done {
//!             Fence::Held => Fence::Held,
//!             Fence::Lost => self.already(c.key, c.token, State::Completed),
//!         })
//!     }
//!
//!     async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
//!         let done = self.owned(r.key, r.token, |e, _| e.state = State::Released);
//!         Ok(match done {
//!             Fence::Held => Fence::Held,
//!             Fence::Lost => self.already(r.key, r.token, State::Released),
//!         })
//!     }
//!
//!     async fn renew(&self, key: &RecordKey, token: Token, lease: Duration) -> Result<Fence, StoreError> {
//!         Ok(self.owned(key, token, |e, now| {
//!             e.lease_until = now + lease;
//!             e.expires_at = e.expires_at.max(e.lease_until);
//!         }))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use idempotent_runtime::{Error, Idempotency};
//!
//! let payments = Idempotency::new("payments").store(MapStore::default());
//! let first: u32 = payments.run("p-1", async { Ok::<_, Error>(7) }).await.unwrap();
//! let again: u32 = payments.run("p-1", async { Ok::<_, Error>(8) }).await.unwrap();
//! assert_eq!((first, again), (7, 7)); // the duplicate replays the first output
//! # });
//! ```
//!
//! Then prove it with the conformance suite, as the stores of this crate are proved:
//! `idempotent_runtime::testing::conformance` (feature `testing`), in a test of your
//! crate:
//!
//! ```ignore
//! idempotent_runtime::protocol_conformance_suite!(async {
//!     Arc::new(MapStore::default()) as Arc<dyn Store>
//! });
//! ```
//!
//! Optionally, override the batch methods (one round trip for many keys) and
//! [`as_immediate`](Store::as_immediate) (a store that answers without awaiting), and
//! implement [`StoreAdmin`] and return it from [`as_admin`](Store::as_admin) to support
//! the `idempotent` command, record scans and statistics.

pub(crate) mod admin;
pub mod coalesce;
pub(crate) mod scan;
pub(crate) mod tx;
pub(crate) mod types;

pub use crate::error::{StoreError, StoreErrorKind};
pub use crate::key::RecordKey;
pub use admin::{StoreAdmin, scan_stats, stats_by_scan};
pub use scan::{
    AdminOutcome, DEFAULT_PAGE, ScanCursor, ScanFilter, ScanItem, ScanPage, ScanStats, ScopeStats,
};
pub use tx::{DedupTransaction, TxFuture};
pub use types::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release, Token,
};

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

/// The protocol steps of a store that answers at once, without awaiting: an
/// in-process store such as [`MemoryStore`](crate::MemoryStore). See
/// [`Store::as_immediate`].
///
/// Each method gives exactly the answer of the [`Store`] method of the same step.
pub trait ImmediateStore: Send + Sync {
    /// As [`Store::claim`].
    fn claim_immediate(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError>;

    /// As [`Store::complete`].
    fn complete_immediate(&self, completion: &Completion<'_>) -> Result<Fence, StoreError>;

    /// As [`Store::release`].
    fn release_immediate(&self, release: &Release<'_>) -> Result<Fence, StoreError>;
}

/// A dedup store: the claim → complete/release protocol, with leases and fencing, on
/// the store's own clock.
///
/// Every method is one atomic operation on the store's side (a Lua script, one SQL
/// statement, one critical section): never a read followed by a write from the client.
/// The batch methods take many keys in one round trip; their default implementations
/// loop over the single-key methods, and stores with pipelining override them.
///
/// The trait is object safe; the protocol uses it as `&dyn Store`.
///
/// # Implementing it
///
/// 1. Implement the four protocol steps: [`claim`](Self::claim),
///    [`complete`](Self::complete), [`release`](Self::release) and
///    [`renew`](Self::renew) (an example is in the [module docs](self)).
/// 2. Optionally, override the batch methods and [`as_immediate`](Self::as_immediate).
/// 3. To support the `idempotent` command, record scans and statistics, implement
///    [`StoreAdmin`] too and return `Some(self)` from [`as_admin`](Self::as_admin).
/// 4. A wrapper store (one that adds faults, metrics or logs around another) forwards
///    `as_admin` to keep the inner store's operator actions, and `as_immediate` only
///    if it changes nothing the protocol steps do.
/// 5. Then run the conformance suite against it: `idempotent_runtime::testing::conformance`
///    (feature `testing`), whose protocol cases need only this trait and whose admin
///    cases need [`StoreAdmin`] through `as_admin`; one test per case is
///    `idempotent_runtime::protocol_conformance_suite!(async { Arc::new(MyStore::new()) as Arc<dyn Store> });`
///    (and `admin_conformance_suite!` likewise for a store with operator actions).
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Claims a key; see [`ClaimOutcome`] for the rules.
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError>;

    /// Marks a claimed key Completed with its output, if `token` still owns it.
    ///
    /// A completion repeated by the claim that completed the key (a retry after a
    /// lost reply) is [`Fence::Held`] and changes nothing.
    async fn complete(&self, completion: &Completion<'_>) -> Result<Fence, StoreError>;

    /// Releases a claim after a failed attempt, if `token` still owns it: the key is
    /// claimable again at once and keeps its attempt count.
    ///
    /// A release repeated by the claim that released the key, before another claim
    /// took it, is [`Fence::Held`] and changes nothing.
    async fn release(&self, release: &Release<'_>) -> Result<Fence, StoreError>;

    /// Extends the lease of a claim to `lease` from now, if `token` still owns it.
    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError>;

    /// The same store as an [`ImmediateStore`], if it answers the protocol steps
    /// without awaiting (an in-process store); `None`, the default, otherwise. The
    /// protocol then calls the immediate methods and spares a boxed future per step.
    ///
    /// A wrapper store that changes what `claim`, `complete` or `release` do (one that
    /// injects faults, counts or logs) returns `None`, so that its own methods run; a
    /// wrapper that only forwards may forward this too.
    fn as_immediate(&self) -> Option<&dyn ImmediateStore> {
        None
    }

    /// The same store's operator actions, if it has them; `None`, the default,
    /// otherwise. The `idempotent` command, record scans, statistics,
    /// [`Idempotency::inspect`](crate::Idempotency::inspect) and
    /// [`Idempotency::forget`](crate::Idempotency::forget) reach the store through it
    /// ([`admin_of`]), and fail with [`StoreErrorKind::Rejected`] when it is `None`.
    ///
    /// A store that implements [`StoreAdmin`] returns `Some(self)`. A wrapper store
    /// forwards it (`self.inner.as_admin()`), or the inner store's operator actions are
    /// lost behind it.
    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        None
    }

    /// Claims many keys; the answer has one outcome per request, in order.
    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(self.claim(r).await?);
        }
        Ok(out)
    }

    /// Completes many claims; one [`Fence`] per completion, in order.
    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for c in items {
            out.push(self.complete(c).await?);
        }
        Ok(out)
    }

    /// Releases many claims; one [`Fence`] per release, in order.
    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for r in items {
            out.push(self.release(r).await?);
        }
        Ok(out)
    }
}

/// [`Store::claim`], answered at once when the store can.
pub(crate) async fn claim(
    store: &dyn Store,
    req: &ClaimRequest<'_>,
) -> Result<ClaimOutcome, StoreError> {
    match store.as_immediate() {
        Some(s) => s.claim_immediate(req),
        None => store.claim(req).await,
    }
}

/// [`Store::complete`], answered at once when the store can.
pub(crate) async fn complete(store: &dyn Store, c: &Completion<'_>) -> Result<Fence, StoreError> {
    match store.as_immediate() {
        Some(s) => s.complete_immediate(c),
        None => store.complete(c).await,
    }
}

/// [`Store::release`], answered at once when the store can.
pub(crate) async fn release(store: &dyn Store, r: &Release<'_>) -> Result<Fence, StoreError> {
    match store.as_immediate() {
        Some(s) => s.release_immediate(r),
        None => store.release(r).await,
    }
}

/// The operator actions of `store` ([`Store::as_admin`]), or the error of a store that
/// has none: [`StoreErrorKind::Rejected`], naming the store.
pub fn admin_of<S: Store + ?Sized>(store: &S) -> Result<&dyn StoreAdmin, StoreError> {
    store.as_admin().ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Rejected,
            format!("this store has no operator actions ({store:?})"),
        )
    })
}

/// A store behind a pointer is a store, so one store can be registered and also kept.
macro_rules! forward_store {
    ($($ty:ty),+) => {$(
        #[async_trait]
        impl<S: Store + ?Sized> Store for $ty {
            async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
                (**self).claim(req).await
            }
            async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
                (**self).complete(c).await
            }
            async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
                (**self).release(r).await
            }
            async fn renew(
                &self,
                key: &RecordKey,
                token: Token,
                lease: Duration,
            ) -> Result<Fence, StoreError> {
                (**self).renew(key, token, lease).await
            }
            fn as_immediate(&self) -> Option<&dyn ImmediateStore> {
                (**self).as_immediate()
            }
            fn as_admin(&self) -> Option<&dyn StoreAdmin> {
                (**self).as_admin()
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
    )+};
}

forward_store!(std::sync::Arc<S>, Box<S>, &S);
