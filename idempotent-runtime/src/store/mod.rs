//! For store implementers and operators' tools: the [`Store`] trait (the protocol
//! steps and the admin operations every store implements atomically on its own side),
//! its request and record types, record scans, and [`DedupTransaction`] for
//! transactional mode. Handler authors need none of it beyond the stores themselves.
//!
//! A store passes when the conformance suite of this crate's repository passes
//! against it; the rules are on [`ClaimOutcome`] and on each method.

pub(crate) mod scan;
pub(crate) mod tx;
pub(crate) mod types;

pub use crate::error::{StoreError, StoreErrorKind};
pub use crate::key::RecordKey;
pub use scan::{
    AdminOutcome, DEFAULT_PAGE, ScanCursor, ScanFilter, ScanItem, ScanPage, ScanStats, ScopeStats,
};
pub use tx::{DedupTransaction, TxFuture};
pub use types::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release, Token,
};

use async_trait::async_trait;
use scan::state_rank;
use std::collections::BTreeMap;
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
        Err(scan::unsupported(self, "scanning records"))
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
        stats_by_scan(self, scope, poisoned_at).await
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
        Err(scan::unsupported(self, "releasing a claim"))
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
        Err(scan::unsupported(self, "resetting attempts"))
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

/// [`Store::stats`] computed from a full [`Store::scan`]: constant memory in the number
/// of records (one entry per scope and state).
pub async fn stats_by_scan<S: Store + ?Sized>(
    store: &S,
    scope: Option<&str>,
    poisoned_at: Option<u32>,
) -> Result<Vec<ScopeStats>, StoreError> {
    scan_stats(store, scope, poisoned_at)
        .await
        .map(|s| s.scopes)
}

/// [`stats_by_scan`], with the count of the keys the scan left out because they hold
/// no record ([`ScanPage::skipped`]): for an operator's tool, which should say so.
pub async fn scan_stats<S: Store + ?Sized>(
    store: &S,
    scope: Option<&str>,
    poisoned_at: Option<u32>,
) -> Result<ScanStats, StoreError> {
    let mut filter = ScanFilter::new();
    filter.scope = scope.map(str::to_owned);
    let mut by: BTreeMap<(String, u8), ScopeStats> = BTreeMap::new();
    let mut skipped = 0u64;
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = store.scan(&filter, cursor.as_ref(), DEFAULT_PAGE).await?;
        skipped = skipped.saturating_add(page.skipped);
        for item in &page.items {
            let scope = item.key.scope();
            let slot = (scope.to_owned(), state_rank(item.state));
            by.entry(slot)
                .or_insert_with(|| ScopeStats::new(scope, item.state))
                .add(item, poisoned_at);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(ScanStats {
        scopes: by.into_values().collect(),
        skipped,
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
