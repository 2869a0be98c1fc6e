//! Operator views of a store: records read page by page
//! ([`StoreAdmin::scan`](super::admin::StoreAdmin::scan)), counted per scope and state
//! ([`StoreAdmin::stats`](super::admin::StoreAdmin::stats)), and the two fixes an operator applies to
//! one record ([`StoreAdmin::force_release`](super::admin::StoreAdmin::force_release),
//! [`StoreAdmin::reset_attempts`](super::admin::StoreAdmin::reset_attempts)).

use super::types::{RecordState, Token};
use crate::key::RecordKey;
use std::fmt::Write as _;
use std::time::Duration;

/// Which records a [`StoreAdmin::scan`](super::admin::StoreAdmin::scan) returns; every condition set
/// must hold.
///
/// ```
/// use idempotent_runtime::store::{RecordState, ScanFilter};
/// use std::time::Duration;
///
/// // claims of `orders` whose holder stopped renewing more than five minutes ago
/// let stuck = ScanFilter::new()
///     .scope("orders")
///     .lease_expired()
///     .older_than(Duration::from_secs(300));
/// assert_eq!(stuck.state_filter(), Some(RecordState::InProgress));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanFilter {
    /// Only records of this scope.
    pub scope: Option<String>,
    /// Only records in this state.
    pub state: Option<RecordState>,
    /// Only records with at least this many attempts.
    pub min_attempts: Option<u32>,
    /// Only In progress records whose lease has run out (a crashed or stalled holder).
    pub lease_expired: bool,
    /// Only records whose latest claim is at least this old (see
    /// [`ScanItem::claimed_ago`]).
    pub older_than: Option<Duration>,
}

impl ScanFilter {
    /// A filter that lets every record through.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only records of `scope`.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Only records in `state`.
    pub fn state(mut self, state: RecordState) -> Self {
        self.state = Some(state);
        self
    }

    /// Only records with at least `n` attempts.
    pub fn min_attempts(mut self, n: u32) -> Self {
        self.min_attempts = Some(n);
        self
    }

    /// Only In progress records whose lease has run out.
    pub fn lease_expired(mut self) -> Self {
        self.lease_expired = true;
        self
    }

    /// Only records whose latest claim is at least `age` old.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// The state every matching record is in, if the filter implies one
    /// (`lease_expired` implies In progress).
    pub fn state_filter(&self) -> Option<RecordState> {
        match (self.state, self.lease_expired) {
            (Some(s), _) => Some(s),
            (None, true) => Some(RecordState::InProgress),
            (None, false) => None,
        }
    }

    /// Whether `item` passes the filter; for stores that filter on the client side.
    pub fn matches(&self, item: &ScanItem) -> bool {
        if self.scope.as_deref().is_some_and(|s| s != item.key.scope()) {
            return false;
        }
        if self.state.is_some_and(|s| s != item.state) {
            return false;
        }
        if self.min_attempts.is_some_and(|n| item.attempts < n) {
            return false;
        }
        if self.lease_expired && !item.is_stuck() {
            return false;
        }
        if self.older_than.is_some_and(|age| item.claimed_ago < age) {
            return false;
        }
        true
    }
}

/// One record as a scan sees it: its key, its state and the figures an operator needs,
/// without the cached output itself.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanItem {
    /// Scope and encoded key; [`RecordKey::readable_key`] prints the key.
    pub key: RecordKey,
    /// The state.
    pub state: RecordState,
    /// Attempts claimed so far.
    pub attempts: u32,
    /// Token of the latest claim.
    pub token: Token,
    /// Time left on the lease when In progress; `None` otherwise or when it ran out.
    pub lease_remaining: Option<Duration>,
    /// Time until the record expires, if it expires.
    pub expires_in: Option<Duration>,
    /// Time since the latest claim by the store's clock. Tokens are the store's clock in
    /// microseconds at the claim (or one more than the previous token when that is
    /// larger), so this is the store's time minus the token.
    pub claimed_ago: Duration,
    /// Size in bytes of the cached output, when there is one.
    pub output_size: Option<u64>,
}

impl ScanItem {
    /// A scanned record with no lease, no expiry, no output and `claimed_ago` zero; for
    /// [`Store`](super::Store) implementations outside this crate.
    pub fn new(key: RecordKey, state: RecordState, attempts: u32, token: Token) -> Self {
        ScanItem {
            key,
            state,
            attempts,
            token,
            lease_remaining: None,
            expires_in: None,
            claimed_ago: Duration::ZERO,
            output_size: None,
        }
    }

    /// In progress with a lease that ran out: the holder crashed or stalled, and the
    /// next delivery takes the key over.
    pub fn is_stuck(&self) -> bool {
        self.state == RecordState::InProgress && self.lease_remaining.is_none()
    }

    /// Whether a claim with `max_attempts` would be refused with
    /// [`ClaimOutcome::Exhausted`](crate::store::ClaimOutcome::Exhausted): not Completed, not
    /// held by a live lease, and at least `max_attempts` attempts.
    pub fn is_poisoned(&self, max_attempts: u32) -> bool {
        self.state != RecordState::Completed
            && self.lease_remaining.is_none()
            && self.attempts >= max_attempts
    }
}

/// Where a scan goes on: opaque bytes each store defines (a Redis `SCAN` cursor, the
/// last primary key of a page).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScanCursor(Vec<u8>);

impl ScanCursor {
    /// A cursor from the bytes a store defines.
    pub fn new(bytes: Vec<u8>) -> Self {
        ScanCursor(bytes)
    }

    /// The cursor's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One page of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanPage {
    /// The records of this page that pass the filter.
    pub items: Vec<ScanItem>,
    /// Where the next page starts; `None` when the scan is complete. A page may be
    /// empty and still have a next one.
    pub next: Option<ScanCursor>,
    /// Keys this page read under the store's prefix and left out of
    /// [`items`](Self::items) because they hold no record of the store (written by
    /// another program, or by a store whose prefix starts with this one's). Only the
    /// Redis store shares its keyspace with others, so only its scans count them; the
    /// other stores of this crate report 0 (the SQL stores leave out rows holding
    /// values they never write without counting them). A key counts each time a page
    /// reads it, and Redis may return a key twice during a scan.
    pub skipped: u64,
}

impl ScanPage {
    /// A page that skipped nothing; for [`Store`](super::Store) implementations outside
    /// this crate.
    pub fn new(items: Vec<ScanItem>, next: Option<ScanCursor>) -> Self {
        ScanPage {
            items,
            next,
            skipped: 0,
        }
    }

    /// The page with `skipped` keys left out as not records (see
    /// [`skipped`](Self::skipped)).
    pub fn with_skipped(mut self, skipped: u64) -> Self {
        self.skipped = skipped;
        self
    }
}

/// The records of one scope in one state, as [`StoreAdmin::stats`](super::admin::StoreAdmin::stats)
/// counts them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScopeStats {
    /// The scope.
    pub scope: String,
    /// The state.
    pub state: RecordState,
    /// Live records of the scope in that state.
    pub count: u64,
    /// Time since the oldest latest-claim among them (see [`ScanItem::claimed_ago`]).
    pub oldest_claim: Option<Duration>,
    /// In progress records whose lease ran out ([`ScanItem::is_stuck`]).
    pub past_lease: u64,
    /// Records that a claim with the `poisoned_at` given to
    /// [`StoreAdmin::stats`](super::admin::StoreAdmin::stats) would refuse ([`ScanItem::is_poisoned`]);
    /// 0 without one.
    pub poisoned: u64,
}

impl ScopeStats {
    /// Empty figures for a scope and state; for [`Store`](super::Store) implementations
    /// outside this crate.
    pub fn new(scope: impl Into<String>, state: RecordState) -> Self {
        ScopeStats {
            scope: scope.into(),
            state,
            count: 0,
            oldest_claim: None,
            past_lease: 0,
            poisoned: 0,
        }
    }

    /// Counts one more record.
    pub fn add(&mut self, item: &ScanItem, poisoned_at: Option<u32>) {
        self.count += 1;
        self.oldest_claim = Some(
            self.oldest_claim
                .map_or(item.claimed_ago, |o| o.max(item.claimed_ago)),
        );
        self.past_lease += u64::from(item.is_stuck());
        self.poisoned += u64::from(poisoned_at.is_some_and(|n| item.is_poisoned(n)));
    }
}

/// The result of an operator's change to one record
/// ([`StoreAdmin::force_release`](super::admin::StoreAdmin::force_release),
/// [`StoreAdmin::reset_attempts`](super::admin::StoreAdmin::reset_attempts)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminOutcome {
    /// The change was applied.
    Applied,
    /// No live record under the key.
    NotFound,
    /// The record's state does not allow the change; nothing changed.
    Unchanged {
        /// The record's state.
        state: RecordState,
    },
}

/// Rows or keys read per page when a caller does not say: small enough for a bounded
/// round trip, large enough to stream a million records quickly.
pub const DEFAULT_PAGE: usize = 1000;

/// What [`scan_stats`](super::admin::scan_stats) counts: the statistics and the keys the scan
/// left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanStats {
    /// Per scope and state, sorted as [`StoreAdmin::stats`](super::admin::StoreAdmin::stats) sorts them.
    pub scopes: Vec<ScopeStats>,
    /// Keys the scan left out as not records: the sum of its pages'
    /// [`ScanPage::skipped`].
    pub skipped: u64,
}

/// Orders states in statistics: In progress, Released, Completed.
pub(crate) fn state_rank(state: RecordState) -> u8 {
    match state {
        RecordState::InProgress => 0,
        RecordState::Released => 1,
        RecordState::Completed => 2,
    }
}

impl RecordKey {
    /// The key in a form for people: the part as it is when the key has one part (bytes
    /// outside printable ASCII escaped as in a Rust byte string), `("a", "b")` for a
    /// composite key, and `sha256:<hex>` for a key that was hashed because it was too
    /// long (the original key cannot be recovered from it).
    ///
    /// ```
    /// use idempotent_runtime::RecordKey;
    ///
    /// assert_eq!(RecordKey::new("s", "order-17").unwrap().readable_key(), "order-17");
    /// assert_eq!(RecordKey::new("s", &("eu", 17)).unwrap().readable_key(), r#"("eu", "17")"#);
    /// ```
    pub fn readable_key(&self) -> String {
        readable(self.key())
    }
}

fn readable(key: &[u8]) -> String {
    match key {
        [0, 2, digest @ ..] if digest.len() == 32 => {
            let mut s = String::from("sha256:");
            for b in digest {
                let _ = write!(s, "{b:02x}");
            }
            s
        }
        [0, 0, rest @ ..] => rest.escape_ascii().to_string(),
        [0, 1, rest @ ..] => match split_parts(rest) {
            Some(parts) => {
                let shown: Vec<String> = parts
                    .iter()
                    .map(|p| format!("\"{}\"", p.escape_ascii()))
                    .collect();
                format!("({})", shown.join(", "))
            }
            None => key.escape_ascii().to_string(),
        },
        _ => key.escape_ascii().to_string(),
    }
}

/// The parts of a composite key's body (`len:bytes` repeated); `None` if malformed.
fn split_parts(mut body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut parts = Vec::new();
    while !body.is_empty() {
        let colon = body.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&body[..colon]).ok()?.parse().ok()?;
        let rest = &body[colon + 1..];
        if rest.len() < len {
            return None;
        }
        parts.push(&rest[..len]);
        body = &rest[len..];
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_keys() {
        let k = |p: &dyn Fn(&mut crate::key::KeyBuilder)| {
            let mut b = crate::key::KeyBuilder::new();
            p(&mut b);
            b.finish("s").unwrap().readable_key()
        };
        assert_eq!(k(&|b| b.push(b"a\nb")), "a\\nb");
        assert_eq!(k(&|b| b.push(b"\0x")), "\\x00x");
        assert_eq!(k(&|b| b.push(&[b'y'; 200])).len(), 7 + 64);
        assert!(k(&|b| b.push(&[b'y'; 200])).starts_with("sha256:"));
        assert_eq!(
            k(&|b| {
                b.push(b"a:b");
                b.push(b"c\"");
            }),
            "(\"a:b\", \"c\\\"\")"
        );
        assert_eq!(readable(b"\x00\x01zz"), "\\x00\\x01zz");
    }

    #[test]
    fn filters_match() {
        let key = RecordKey::new("orders", "1").unwrap();
        let mut item = ScanItem::new(key, RecordState::InProgress, 3, Token(5));
        item.claimed_ago = Duration::from_secs(10);
        assert!(ScanFilter::new().matches(&item));
        assert!(
            ScanFilter::new()
                .scope("orders")
                .lease_expired()
                .matches(&item)
        );
        assert!(!ScanFilter::new().scope("order").matches(&item));
        assert!(!ScanFilter::new().min_attempts(4).matches(&item));
        assert!(
            ScanFilter::new()
                .older_than(Duration::from_secs(9))
                .matches(&item)
        );
        assert!(
            !ScanFilter::new()
                .older_than(Duration::from_secs(11))
                .matches(&item)
        );
        item.lease_remaining = Some(Duration::from_secs(1));
        assert!(!ScanFilter::new().lease_expired().matches(&item));
        assert!(!item.is_poisoned(1));
        assert!(
            !ScanFilter::new()
                .state(RecordState::Released)
                .matches(&item)
        );
    }
}
