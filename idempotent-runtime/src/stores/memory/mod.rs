//! The in-process store, [`MemoryStore`], and the clocks it can run on: the system
//! clock, or a [`ManualClock`] that tests advance by hand.
//!
//! Sharded maps under short critical sections.

pub use crate::clock::{Clock, ManualClock, SystemClock};

use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::admin::StoreAdmin;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage};
use crate::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, ImmediateStore, Record, RecordState, Release,
    Store, Token,
};
use async_trait::async_trait;
use foldhash::fast::RandomState;
use hashbrown::{HashTable, hash_table};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod scan;

const SHARDS: usize = 64;

/// An in-process store: fast, exact, and gone when the process exits.
///
/// It is the default store (`"memory"` is registered at start-up). It guards only the
/// consumers of one process: use it for tests, demos and single-instance consumers,
/// and a shared store (Redis, SQL) when several processes consume the same queue.
///
/// Expired records are freed as the store is used (each shard sweeps itself after
/// as many operations as it holds records, so the cost per operation stays constant)
/// and by [`purge_expired`](StoreAdmin::purge_expired): under a stream of unique keys,
/// memory stays proportional to the keys live within one `ttl`.
///
/// Lease and expiry decisions use the store's [`Clock`]; [`MemoryStore::with_clock`]
/// takes a [`ManualClock`] for tests.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
    last_token: AtomicU64,
}

#[derive(Default)]
struct Shard {
    map: HashTable<Entry>,
    ops_since_sweep: usize,
    /// No record of the shard expires before this (a lower bound, made exact by each
    /// sweep): until then sweeping cannot free anything and is skipped.
    earliest_expiry: u64,
}

struct Entry {
    /// `RecordKey::as_bytes()`: scope and key
    key: Bytes,
    /// the key's hash, kept so growing the table never hashes keys again
    hash: u64,
    state: RecordState,
    attempts: u32,
    token: u64,
    // microseconds on the store clock
    lease_until: u64,
    expires_at: u64,
    fingerprint: Option<Box<[u8]>>,
    output: Option<Bytes>,
}

/// Bytes inline up to [`INLINE_BYTES`] of them (short keys, small outputs such as `()`
/// or an id), so recording them does not allocate; boxed beyond. The same size as a
/// `Box<[u8]>` plus one word.
enum Bytes {
    Inline { len: u8, data: [u8; INLINE_BYTES] },
    Boxed(Box<[u8]>),
}

const INLINE_BYTES: usize = 22;

impl Bytes {
    fn new(b: &[u8]) -> Self {
        if b.len() <= INLINE_BYTES {
            let mut data = [0; INLINE_BYTES];
            data[..b.len()].copy_from_slice(b);
            Bytes::Inline {
                len: b.len() as u8,
                data,
            }
        } else {
            Bytes::Boxed(b.into())
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Inline { len, data } => &data[..usize::from(*len)],
            Bytes::Boxed(b) => b,
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.len())
            .field("clock", &self.clock)
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl MemoryStore {
    /// A store on the process clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock::new())
    }

    /// A store on the given clock.
    pub fn with_clock(clock: impl Clock + 'static) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::default(),
            clock: Arc::new(clock),
            last_token: AtomicU64::new(0),
        }
    }

    /// Records held, expired ones not yet freed included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn now(&self) -> u64 {
        micros(self.clock.now())
    }

    /// The key's hash and its shard, locked. The shard index comes from bits the
    /// table itself does not use for bucket selection or its control bytes.
    fn shard(&self, key: &[u8]) -> (u64, MutexGuard<'_, Shard>) {
        let h = self.hasher.hash_one(key);
        (h, lock(&self.shards[((h >> 40) as usize) % SHARDS]))
    }

    fn next_token(&self, now: u64, prev: u64) -> u64 {
        // strictly increasing across the whole store, and at least the clock in µs
        let floor = now.max(prev + 1);
        let mut cur = self.last_token.load(Ordering::Relaxed);
        loop {
            let next = floor.max(cur + 1);
            match self.last_token.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    fn claim_sync(&self, req: &ClaimRequest<'_>) -> ClaimOutcome {
        let now = self.now();
        let lease = micros(req.lease);
        let keep = micros(req.ttl).max(lease);
        let key = req.key.as_bytes();
        let (hash, mut shard) = self.shard(key);
        let shard = &mut *shard;
        shard.tick(now);
        let fresh = |token| Entry {
            key: Bytes::new(key),
            hash,
            state: RecordState::InProgress,
            attempts: 1,
            token,
            lease_until: now.saturating_add(lease),
            expires_at: now.saturating_add(keep),
            fingerprint: req.fingerprint.map(Into::into),
            output: None,
        };
        // one probe finds the record or the slot for a new one
        let token = match shard
            .map
            .entry(hash, |e| e.key.as_slice() == key, |e| e.hash)
        {
            hash_table::Entry::Occupied(e) => {
                let e = e.into_mut();
                if e.expires_at > now {
                    return self.claim_live(e, req, now, lease, keep);
                }
                // an expired record starts over, its token floor kept
                let token = self.next_token(now, e.token);
                *e = fresh(token);
                token
            }
            hash_table::Entry::Vacant(slot) => {
                let token = self.next_token(now, 0);
                slot.insert(fresh(token));
                token
            }
        };
        shard.note_expiry(now.saturating_add(keep));
        ClaimOutcome::Acquired {
            token: Token(token),
            attempt: 1,
        }
    }

    /// A claim on a record that has not expired: rules 2–5 of [`ClaimOutcome`].
    fn claim_live(
        &self,
        e: &mut Entry,
        req: &ClaimRequest<'_>,
        now: u64,
        lease: u64,
        keep: u64,
    ) -> ClaimOutcome {
        if let (Some(have), Some(want)) = (&e.fingerprint, req.fingerprint)
            && **have != *want
        {
            return ClaimOutcome::FingerprintMismatch;
        }
        match e.state {
            RecordState::Completed => {
                return ClaimOutcome::Completed {
                    output: e.output.as_ref().map(|o| o.as_slice().to_vec()),
                };
            }
            RecordState::InProgress if e.lease_until > now => {
                return ClaimOutcome::InProgress {
                    retry_after: Duration::from_micros(e.lease_until - now),
                };
            }
            _ => {}
        }
        if let Some(max) = req.max_attempts
            && e.attempts >= max
        {
            return ClaimOutcome::Exhausted {
                attempts: e.attempts,
            };
        }
        let token = self.next_token(now, e.token);
        e.state = RecordState::InProgress;
        e.attempts = e.attempts.saturating_add(1);
        e.token = token;
        e.lease_until = now.saturating_add(lease);
        e.expires_at = e.expires_at.max(now.saturating_add(keep));
        if e.fingerprint.is_none() {
            e.fingerprint = req.fingerprint.map(Into::into);
        }
        ClaimOutcome::Acquired {
            token: Token(token),
            attempt: e.attempts,
        }
    }

    fn with_owned<R>(
        &self,
        key: &RecordKey,
        token: Token,
        f: impl FnOnce(&mut Entry, u64) -> R,
    ) -> Option<R> {
        let now = self.now();
        let bytes = key.as_bytes();
        let (hash, mut shard) = self.shard(bytes);
        shard.tick(now);
        let shard = &mut *shard;
        match shard.map.find_mut(hash, |e| e.key.as_slice() == bytes) {
            Some(e)
                if e.token == token.0
                    && e.state == RecordState::InProgress
                    && e.expires_at > now =>
            {
                let r = f(e, now);
                let expiry = e.expires_at;
                shard.note_expiry(expiry);
                Some(r)
            }
            _ => None,
        }
    }

    fn complete_sync(&self, c: &Completion<'_>) -> Fence {
        let ttl = micros(c.ttl);
        let applied = self.with_owned(c.key, c.token, |e, now| {
            e.state = RecordState::Completed;
            e.output = c.output.map(Bytes::new);
            e.expires_at = now.saturating_add(ttl);
            e.lease_until = 0;
        });
        self.leave_fence(applied, c.key, c.token, RecordState::Completed)
    }

    /// The fence of a completion or release by the claim of `token`, which leaves the
    /// record in `state`: Held when it was `applied`, or when the record already is in
    /// `state` under that claim (a retry of a step whose reply was lost: already done).
    fn leave_fence(
        &self,
        applied: Option<()>,
        key: &RecordKey,
        token: Token,
        state: RecordState,
    ) -> Fence {
        match applied {
            Some(()) => Fence::Held,
            None if self.left_by(key, token, state) => Fence::Held,
            None => Fence::Lost,
        }
    }

    /// Whether `key` is in `state` (and not expired) under the claim of `token`.
    fn left_by(&self, key: &RecordKey, token: Token, state: RecordState) -> bool {
        let now = self.now();
        let bytes = key.as_bytes();
        let (hash, shard) = self.shard(bytes);
        shard
            .map
            .find(hash, |e| e.key.as_slice() == bytes)
            .is_some_and(|e| e.token == token.0 && e.state == state && e.expires_at > now)
    }

    fn release_sync(&self, r: &Release<'_>) -> Fence {
        let applied = self.with_owned(r.key, r.token, |e, _| {
            e.state = RecordState::Released;
            e.lease_until = 0;
        });
        self.leave_fence(applied, r.key, r.token, RecordState::Released)
    }
}

fn fence(applied: Option<()>) -> Fence {
    match applied {
        Some(()) => Fence::Held,
        None => Fence::Lost,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic while holding a shard lock cannot leave an entry half-written (every
    // critical section assigns plain fields), so a poisoned lock is safe to reuse
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shard {
    /// Counts an operation and, once the shard has seen as many operations as it holds
    /// records, frees the expired ones: amortised O(1) per operation.
    fn tick(&mut self, now: u64) {
        self.ops_since_sweep += 1;
        if now >= self.earliest_expiry && self.ops_since_sweep > self.map.len().max(64) {
            self.sweep(now);
        }
    }

    fn note_expiry(&mut self, at: u64) {
        self.earliest_expiry = self.earliest_expiry.min(at);
    }

    fn sweep(&mut self, now: u64) -> usize {
        self.ops_since_sweep = 0;
        let before = self.map.len();
        let mut earliest = u64::MAX;
        self.map.retain(|e| {
            let keep = e.expires_at > now;
            if keep {
                earliest = earliest.min(e.expires_at);
            }
            keep
        });
        self.earliest_expiry = earliest;
        if self.map.capacity() > 4 * self.map.len() + 64 {
            self.map.shrink_to(2 * self.map.len(), |e| e.hash);
        }
        before - self.map.len()
    }
}

impl ImmediateStore for MemoryStore {
    fn claim_immediate(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        Ok(self.claim_sync(req))
    }

    fn complete_immediate(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        Ok(self.complete_sync(c))
    }

    fn release_immediate(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        Ok(self.release_sync(r))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        Ok(self.claim_sync(req))
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        Ok(self.complete_sync(c))
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        Ok(self.release_sync(r))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let lease = micros(lease);
        Ok(fence(self.with_owned(key, token, |e, now| {
            e.lease_until = now.saturating_add(lease);
            e.expires_at = e.expires_at.max(e.lease_until);
        })))
    }

    fn as_immediate(&self) -> Option<&dyn ImmediateStore> {
        Some(self)
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        Ok(reqs.iter().map(|r| self.claim_sync(r)).collect())
    }

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        Ok(items.iter().map(|c| self.complete_sync(c)).collect())
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        Ok(items.iter().map(|r| self.release_sync(r)).collect())
    }

    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        Some(self)
    }
}

#[async_trait]
impl StoreAdmin for MemoryStore {
    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let now = self.now();
        let bytes = key.as_bytes();
        let (hash, shard) = self.shard(bytes);
        Ok(shard
            .map
            .find(hash, |e| e.key.as_slice() == bytes)
            .filter(|e| e.expires_at > now)
            .map(|e| {
                let mut r = Record::new(e.state, e.attempts, Token(e.token));
                r.lease_remaining = (e.state == RecordState::InProgress && e.lease_until > now)
                    .then(|| Duration::from_micros(e.lease_until - now));
                r.expires_in = Some(Duration::from_micros(e.expires_at - now));
                r.fingerprint = e.fingerprint.as_deref().map(<[u8]>::to_vec);
                r.output = e.output.as_ref().map(|o| o.as_slice().to_vec());
                r
            }))
    }

    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let bytes = key.as_bytes();
        let (hash, mut shard) = self.shard(bytes);
        Ok(
            match shard.map.find_entry(hash, |e| e.key.as_slice() == bytes) {
                Ok(entry) => {
                    entry.remove();
                    true
                }
                Err(_) => false,
            },
        )
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = self.now();
        Ok(self.shards.iter().map(|s| lock(s).sweep(now) as u64).sum())
    }

    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        self.scan_page(filter, cursor, limit)
    }

    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        Ok(self.admin_change(key, |state, _| state == RecordState::InProgress, |_, _| {}))
    }

    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        Ok(self.admin_change(
            key,
            |state, leased| state != RecordState::Completed && !leased,
            |e, _| e.attempts = 0,
        ))
    }
}
