//! The types of the protocol steps: the requests a store answers, its answers and the
//! records it keeps.

use crate::key::RecordKey;
use std::fmt;
use std::time::Duration;

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
    /// A token, for [`Store`](super::Store) implementations outside this crate: the
    /// store issues them, strictly growing per record.
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
    /// A record snapshot; for [`Store`](super::Store) implementations outside this crate.
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
