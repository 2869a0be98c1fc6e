//! For store implementers and operators' tools: the [`Store`] trait (the protocol
//! steps and the admin operations every store implements atomically on its own side),
//! its request and record types, record scans, and [`DedupTransaction`] for
//! transactional mode. Handler authors need none of it beyond the stores themselves.
//!
//! A store passes when the conformance suite of this crate's repository passes
//! against it; the rules are on [`ClaimOutcome`] and on each method.

pub use crate::error::{StoreError, StoreErrorKind};
pub use crate::key::RecordKey;
pub use crate::protocol::tx::{DedupTransaction, TxFuture};
use async_trait::async_trait;
pub use scan::{
    AdminOutcome, DEFAULT_PAGE, ScanCursor, ScanFilter, ScanItem, ScanPage, ScanStats, ScopeStats,
    scan_stats, stats_by_scan,
};
use std::fmt;
use std::time::Duration;

pub(crate) mod scan;

/// A fencing token: issued by the store with every successful claim, strictly greater
/// than every token issued before for the same record (the store takes the larger of
/// the previous token plus one and its clock in microseconds, so tokens keep growing
/// even after a record is forgotten and created again).
///
/// Complete, release and renew are compare-and-set on it; handlers can use it to fence
/// their own downstream writes (`UPDATE … SET version = token WHERE version < token`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub(crate) u64);

impl Token {
    /// A token, for [`Store`] implementations outside this crate: the store issues
    /// them, strictly growing per record.
    pub const fn new(token: u64) -> Self {
        Token(token)
    }

    /// The token as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A request to claim a key: one protocol step, answered in one round trip.
#[derive(Clone, Copy, Debug)]
pub struct ClaimRequest<'a> {
    /// The record to claim.
    pub key: &'a RecordKey,
    /// How long the claim holds without renewal.
    pub lease: Duration,
    /// How long the record (with its attempt count) is kept while not Completed;
    /// also the retention of a Completed record unless `complete` says otherwise.
    pub ttl: Duration,
    /// The message's fingerprint, if the handler declares one.
    pub fingerprint: Option<&'a [u8]>,
    /// Claims are refused with [`ClaimOutcome::Exhausted`] once this many attempts
    /// have been recorded without success.
    pub max_attempts: Option<u32>,
}

/// The store's answer to a claim.
///
/// Rules every store follows, atomically (the conformance suite checks them):
///
/// 1. No live record (absent or expired): create it In progress with `attempts = 1`,
///    a fresh [`Token`], the lease and the fingerprint → [`Acquired`](Self::Acquired).
/// 2. A live record whose fingerprint is set and differs from a set request
///    fingerprint → [`FingerprintMismatch`](Self::FingerprintMismatch), nothing changes.
/// 3. Completed → [`Completed`](Self::Completed) with the cached output.
/// 4. In progress with an unexpired lease → [`InProgress`](Self::InProgress) with the
///    time left on the lease.
/// 5. Released, or In progress with an expired lease: if `max_attempts` is set and
///    `attempts >= max_attempts` → [`Exhausted`](Self::Exhausted); otherwise take it over:
///    `attempts += 1`, fresh token, new lease → [`Acquired`](Self::Acquired).
///
/// Attempts are counted when claimed, so a consumer that crashes mid-handler still
/// uses up an attempt: a message that kills its consumer is poisoned, not retried forever.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// The caller holds the claim and must run the handler.
    Acquired {
        /// The fencing token of this claim.
        token: Token,
        /// 1 for the first attempt, 2 for the first retry, …
        attempt: u32,
    },
    /// The key completed before; `output` is the cached output, `None` if it was not
    /// cached (too large).
    Completed {
        /// The serialized output of the successful execution.
        output: Option<Vec<u8>>,
    },
    /// Another execution holds a live claim.
    InProgress {
        /// Time left on the holder's lease, by the store's clock.
        retry_after: Duration,
    },
    /// `max_attempts` attempts failed; the key is poisoned until its record expires.
    Exhausted {
        /// Attempts recorded.
        attempts: u32,
    },
    /// The record was created with a different fingerprint.
    FingerprintMismatch,
}

/// Result of a compare-and-set on a [`Token`] (complete, release, renew).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The token still owned the record; the operation was applied (or had been: a
    /// completion or release repeated by the same claim).
    Held,
    /// Another claim took the record over (or it was forgotten or expired); nothing changed.
    Lost,
}

/// A completion to record.
#[derive(Clone, Copy, Debug)]
pub struct Completion<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The token of the claim being completed.
    pub token: Token,
    /// The serialized output, `None` when it is too large to cache.
    pub output: Option<&'a [u8]>,
    /// How long the completed record is kept.
    pub ttl: Duration,
}

/// A release (failed attempt) to record.
#[derive(Clone, Copy, Debug)]
pub struct Release<'a> {
    /// The record.
    pub key: &'a RecordKey,
    /// The token of the claim being released.
    pub token: Token,
}

/// The lifecycle state of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordState {
    /// Claimed; the lease may have expired (see [`Record::lease_remaining`]).
    InProgress,
    /// Completed successfully (`status = 1` in SQL tables).
    Completed,
    /// The last attempt failed and released the claim; claimable again.
    Released,
}

/// A snapshot of one record, for admin tools and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The state.
    pub state: RecordState,
    /// Attempts claimed so far (the classic `retry_times`).
    pub attempts: u32,
    /// Token of the latest claim.
    pub token: Token,
    /// Time left on the lease when In progress; `None` otherwise or when expired.
    pub lease_remaining: Option<Duration>,
    /// Time until the record expires, if it expires.
    pub expires_in: Option<Duration>,
    /// The fingerprint given at the first claim.
    pub fingerprint: Option<Vec<u8>>,
    /// The cached output when Completed.
    pub output: Option<Vec<u8>>,
}

impl Record {
    /// A record snapshot; for [`Store`] implementations outside this crate.
    pub fn new(state: RecordState, attempts: u32, token: Token) -> Self {
        Record {
            state,
            attempts,
            token,
            lease_remaining: None,
            expires_in: None,
            fingerprint: None,
            output: None,
        }
    }
}

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

    /// Reads a record without changing it; `None` if absent or expired.
    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError>;

    /// Deletes a record whatever its state; returns whether one existed.
    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError>;

    /// Deletes expired records and returns how many. Stores whose records expire on
    /// their own (Redis) return 0.
    async fn purge_expired(&self) -> Result<u64, StoreError>;

    /// Reads one page of the records that pass `filter`, starting at `cursor` (`None`:
    /// the beginning), about `limit` records per page (a hint: a page may hold fewer,
    /// even none, and still have a next one). Cursor based, so a scan of any number of
    /// records holds one page at a time; records created, changed or deleted during a
    /// scan may or may not be seen, and on Redis a record may be seen twice.
    ///
    /// The default fails with [`StoreErrorKind::Rejected`]
    /// ("not supported"); every store of this crate implements it.
    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let _ = (filter, cursor, limit);
        Err(crate::store::scan::unsupported(self, "scanning records"))
    }

    /// Counts the live records per scope and state (only `scope`'s when given), with
    /// the age of the oldest claim, the records past their lease and, when
    /// `poisoned_at` is given, the records a claim with that `max_attempts` would refuse.
    /// Sorted by scope, then In progress, Released, Completed.
    ///
    /// The default walks [`scan`](Self::scan) ([`stats_by_scan`]);
    /// the SQL stores count in the database.
    async fn stats(
        &self,
        scope: Option<&str>,
        poisoned_at: Option<u32>,
    ) -> Result<Vec<ScopeStats>, StoreError> {
        crate::store::scan::stats_by_scan(self, scope, poisoned_at).await
    }

    /// An operator frees a stuck claim: an In progress record (lease live or run out)
    /// becomes Released with a new, larger token, so the key is claimable at once and a
    /// holder still running is fenced out (its complete, release and renew are
    /// [`Fence::Lost`]). Attempts are kept. Other states are left
    /// [`Unchanged`](AdminOutcome::Unchanged).
    ///
    /// The default fails with [`StoreErrorKind::Rejected`]
    /// ("not supported").
    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        let _ = key;
        Err(crate::store::scan::unsupported(self, "releasing a claim"))
    }

    /// An operator un-poisons a key: a Released record, or an In progress one whose
    /// lease ran out, becomes Released with zero attempts and a new, larger token, so
    /// the next delivery runs as attempt 1 whatever its `max_attempts`. A Completed
    /// record or a live claim is left [`Unchanged`](AdminOutcome::Unchanged).
    ///
    /// The default fails with [`StoreErrorKind::Rejected`]
    /// ("not supported").
    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        let _ = key;
        Err(crate::store::scan::unsupported(self, "resetting attempts"))
    }

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
            fn as_immediate(&self) -> Option<&dyn ImmediateStore> {
                (**self).as_immediate()
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
