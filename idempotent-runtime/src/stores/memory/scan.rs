//! Scans and operator changes of the [`MemoryStore`].

use super::{Entry, MemoryStore, lock};
use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanItem, ScanPage};
use crate::store::{RecordState, Token};
use std::collections::BinaryHeap;
use std::time::Duration;

impl MemoryStore {
    /// One page of a scan: the `limit` smallest record keys after the cursor that pass
    /// the filter, in key order (the cursor is the last key of the previous page). Each
    /// page visits every shard, one at a time, and holds at most `limit` records.
    pub(super) fn scan_page(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let limit = limit.max(1);
        let after = cursor.map(ScanCursor::as_bytes);
        let now = self.now();
        let mut best: BinaryHeap<(Vec<u8>, OrdItem)> = BinaryHeap::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for e in shard.map.iter() {
                let bytes = e.key.as_slice();
                if e.expires_at <= now || after.is_some_and(|a| bytes <= a) {
                    continue;
                }
                if best.len() == limit && best.peek().is_some_and(|(k, _)| bytes >= k.as_slice()) {
                    continue;
                }
                let item = item(e, now);
                if !filter.matches(&item) {
                    continue;
                }
                best.push((bytes.to_vec(), OrdItem(item)));
                if best.len() > limit {
                    best.pop();
                }
            }
        }
        let full = best.len() == limit;
        let sorted = best.into_sorted_vec();
        let next = if full {
            sorted.last().map(|(k, _)| ScanCursor::new(k.clone()))
        } else {
            None
        };
        Ok(ScanPage::new(
            sorted.into_iter().map(|(_, i)| i.0).collect(),
            next,
        ))
    }

    /// Applies `change` to the live record of `key` if `allowed` says its state and
    /// lease permit it, under the shard's lock.
    pub(super) fn admin_change(
        &self,
        key: &RecordKey,
        allowed: impl Fn(RecordState, bool) -> bool,
        change: impl FnOnce(&mut Entry, u64),
    ) -> AdminOutcome {
        let now = self.now();
        let bytes = key.as_bytes();
        let (hash, mut shard) = self.shard(bytes);
        match shard.map.find_mut(hash, |e| e.key.as_slice() == bytes) {
            Some(e) if e.expires_at > now => {
                let leased = e.state == RecordState::InProgress && e.lease_until > now;
                if !allowed(e.state, leased) {
                    return AdminOutcome::Unchanged { state: e.state };
                }
                let token = self.next_token(now, e.token);
                e.token = token;
                e.state = RecordState::Released;
                e.lease_until = 0;
                change(e, now);
                AdminOutcome::Applied
            }
            _ => AdminOutcome::NotFound,
        }
    }
}

/// What a scan shows of an entry at `now`.
fn item(e: &Entry, now: u64) -> ScanItem {
    let bytes = e.key.as_slice();
    let n = usize::from(bytes[0]);
    let scope = String::from_utf8_lossy(&bytes[1..1 + n]);
    let key = RecordKey::from_encoded(&scope, &bytes[1 + n..]);
    let mut item = ScanItem::new(key, e.state, e.attempts, Token(e.token));
    item.lease_remaining = (e.state == RecordState::InProgress && e.lease_until > now)
        .then(|| Duration::from_micros(e.lease_until - now));
    item.expires_in = Some(Duration::from_micros(e.expires_at - now));
    item.claimed_ago = Duration::from_micros(now.saturating_sub(e.token));
    item.output_size = e.output.as_ref().map(|o| o.as_slice().len() as u64);
    item
}

/// A scan item in a heap ordered by key only (the key comes first in the tuple and is
/// unique, so the item never decides an ordering).
struct OrdItem(ScanItem);

impl PartialEq for OrdItem {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for OrdItem {}
impl PartialOrd for OrdItem {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdItem {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}
