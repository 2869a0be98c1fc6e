//! [`StoreAdmin`]: the operator actions of a store (reading, deleting, scanning and
//! counting records, freeing a claim, un-poisoning a key), which the protocol never
//! calls and the `idempotent` command, the sweepers and operators' tools do.

use super::scan::{
    AdminOutcome, DEFAULT_PAGE, ScanCursor, ScanFilter, ScanPage, ScanStats, ScopeStats, state_rank,
};
use super::types::Record;
use crate::error::StoreError;
use crate::key::RecordKey;
use async_trait::async_trait;
use std::collections::BTreeMap;

/// The operator actions of a store, reached from a [`Store`](super::Store) with
/// [`as_admin`](super::Store::as_admin).
///
/// Implement it next to [`Store`](super::Store) and return `Some(self)` from
/// `as_admin` to support the `idempotent` command, record scans and statistics. Like
/// the protocol steps, every method is one atomic operation on the store's side.
///
/// The trait is object safe; tools use it as `&dyn StoreAdmin`.
#[async_trait]
pub trait StoreAdmin: Send + Sync {
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
    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError>;

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
    /// [`Fence::Lost`](super::types::Fence::Lost)). Attempts are kept. Other states are
    /// left [`Unchanged`](AdminOutcome::Unchanged).
    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError>;

    /// An operator un-poisons a key: a Released record, or an In progress one whose
    /// lease ran out, becomes Released with zero attempts and a new, larger token, so
    /// the next delivery runs as attempt 1 whatever its `max_attempts`. A Completed
    /// record or a live claim is left [`Unchanged`](AdminOutcome::Unchanged).
    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError>;
}

/// [`StoreAdmin::stats`] computed from a full [`StoreAdmin::scan`]: constant memory in
/// the number of records (one entry per scope and state).
pub async fn stats_by_scan<S: StoreAdmin + ?Sized>(
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
pub async fn scan_stats<S: StoreAdmin + ?Sized>(
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

/// A store behind a pointer keeps its operator actions.
macro_rules! forward_admin {
    ($($ty:ty),+) => {$(
        #[async_trait]
        impl<S: StoreAdmin + ?Sized> StoreAdmin for $ty {
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
        }
    )+};
}

forward_admin!(std::sync::Arc<S>, Box<S>, &S);
