//! What the relay and the operator need of an outbox table: [`OutboxStore`], implemented
//! by the SQL stores' outbox handles, and the rows, leases, pages and statistics it
//! answers with.
//!
//! # The rules every implementation keeps
//!
//! - **Claims.** A claim takes a row for one relay until its lease runs out, and
//!   gives it a new fencing token ([`RowLease::fence`]). A row is claimable when it
//!   is pending, due (its backoff has passed), not under a live lease, and, when it
//!   has an ordering key, no earlier row (smaller [`ClaimedRow::seq`]) with the same
//!   key is pending (claimed or not). So rows of one key are claimed one at a time,
//!   in emission order, while rows of other keys and rows without a key go in
//!   parallel; a claim answers at most one row per ordering key. Two claims running at
//!   once never answer the same row.
//! - **Fencing.** [`mark_sent`](OutboxStore::mark_sent) and
//!   [`mark_failed`](OutboxStore::mark_failed) apply only while the row is pending
//!   under the fencing token of the claim that took it: once another relay has
//!   claimed the row again (the first one's lease ran out), the first one's marks are
//!   [`Fence::Lost`] and change nothing. A mark-sent repeated by the claim that made
//!   it (its reply lost) is [`Fence::Held`]. A lease that ran out without anyone
//!   taking the row over does not fence its holder out: the message was published, so
//!   marking it sent is right.
//! - **Dead rows.** A row marked [`Retry::Dead`] is never claimed again until an
//!   operator [retries](OutboxStore::retry_dead) it. It does **not** hold back the
//!   later rows of its ordering key: they are published after it (order is kept among
//!   the rows that are published; a dead row is the operator's to look at, and one
//!   message that cannot be published does not stop its key forever). A retried row
//!   goes back to its place: it holds back the rows of its key that are still
//!   pending behind it.
//! - **Times** come from the database clock.

use super::message::OutgoingMessage;
use crate::error::StoreError;
use crate::store::Fence;
use async_trait::async_trait;
use std::fmt;
use std::time::Duration;
use uuid::Uuid;

/// The fencing token of one claim of one row: pass it back to mark the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowLease {
    /// The row's message id.
    pub id: Uuid,
    /// The row's fencing token, new at every claim (larger than the one before).
    pub fence: u64,
}

/// A row a relay claimed: the message to publish and the lease to mark it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRow {
    /// The message, as the handler emitted it.
    pub message: OutgoingMessage,
    /// The lease of this claim.
    pub lease: RowLease,
    /// The row's place in emission order (increasing across executions).
    pub seq: i64,
    /// Failed publishes so far.
    pub attempts: u32,
}

/// What becomes of a row whose publish failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Pending again, claimable after this delay.
    After(Duration),
    /// Dead: never claimed again until an operator retries it.
    Dead,
}

/// The state of a row, as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowStatus {
    /// Waiting to be published (claimed by a relay or not).
    Pending,
    /// Published and confirmed by the broker.
    Sent,
    /// Failed too often, or rejected for good; waiting for an operator.
    Dead,
}

impl RowStatus {
    /// `pending`, `sent` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Pending => "pending",
            RowStatus::Sent => "sent",
            RowStatus::Dead => "dead",
        }
    }
}

impl fmt::Display for RowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of an outbox table, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The message.
    pub message: OutgoingMessage,
    /// The row's place in emission order.
    pub seq: i64,
    /// The scope of the execution that emitted it.
    pub origin_scope: String,
    /// The encoded key of the incoming message whose execution emitted it.
    pub origin_key: Vec<u8>,
    /// Pending, sent or dead.
    pub status: RowStatus,
    /// Failed publishes so far.
    pub attempts: u32,
    /// The error of the last failed publish.
    pub last_error: Option<String>,
    /// How long ago the row was written.
    pub age: Duration,
    /// For a pending row, how long until it is due (zero when it is due now).
    pub due_in: Duration,
    /// The relay holding a live lease on the row, if any.
    pub leased_by: Option<String>,
}

/// A page of [`OutboxStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxPage {
    /// The rows, in emission order.
    pub rows: Vec<OutboxRow>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<i64>,
}

/// The rows of one destination, for [`OutboxStore::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationStats {
    /// The destination.
    pub destination: String,
    /// Pending rows (claimed or not).
    pub pending: u64,
    /// Dead rows.
    pub dead: u64,
    /// Sent rows not yet purged.
    pub sent: u64,
    /// How long ago the oldest pending row was written.
    pub oldest_pending: Option<Duration>,
}

/// The statistics of an outbox table: one entry per destination with rows, sorted by
/// destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Per destination.
    pub destinations: Vec<DestinationStats>,
}

impl OutboxStats {
    /// Pending rows in all destinations.
    pub fn pending(&self) -> u64 {
        self.destinations.iter().map(|d| d.pending).sum()
    }

    /// Dead rows in all destinations.
    pub fn dead(&self) -> u64 {
        self.destinations.iter().map(|d| d.dead).sum()
    }

    /// Sent rows not yet purged, in all destinations.
    pub fn sent(&self) -> u64 {
        self.destinations.iter().map(|d| d.sent).sum()
    }

    /// The age of the oldest pending row of any destination.
    pub fn oldest_pending(&self) -> Option<Duration> {
        self.destinations
            .iter()
            .filter_map(|d| d.oldest_pending)
            .max()
    }
}

/// An outbox table, as the relay ([`Relay`](super::Relay)) and the operator use it.
/// See the [module docs](self) for the rules every implementation keeps.
///
/// With the runtime's `mysql`, `postgres` and `sqlite` features, `MySqlOutbox`,
/// `PostgresOutbox` and `SqliteOutbox` implement it (made with
/// `MySqlStore::outbox`, `PostgresStore::outbox` and `SqliteStore::outbox`).
#[async_trait]
pub trait OutboxStore: Send + Sync + fmt::Debug {
    /// Claims up to `limit` claimable rows, oldest first, for `owner` (a relay's name,
    /// for the operator) until `lease` runs out.
    async fn claim_due(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedRow>, StoreError>;

    /// Claims the rows among `ids` that are claimable (the fast path after a commit:
    /// the messages one execution emitted), oldest first. Ids of rows that are not
    /// claimable (sent, dead, leased, not due, behind an earlier row of their key,
    /// absent) are left out.
    async fn claim_ids(
        &self,
        owner: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<ClaimedRow>, StoreError>;

    /// Marks the claimed rows sent, each fenced on its lease: one [`Fence`] per lease,
    /// in order.
    async fn mark_sent(&self, leases: &[RowLease]) -> Result<Vec<Fence>, StoreError>;

    /// Records a failed publish of the claimed row (fenced on its lease): one more
    /// attempt, `error` as its last error, and then pending again after the delay of
    /// `retry`, or dead.
    async fn mark_failed(
        &self,
        lease: &RowLease,
        error: &str,
        retry: Retry,
    ) -> Result<Fence, StoreError>;

    /// Deletes sent rows sent more than `older_than` ago, in statements of at most
    /// `batch` rows, until none is left: how many it deleted.
    async fn purge_sent(&self, older_than: Duration, batch: usize) -> Result<u64, StoreError>;

    /// The rows per destination.
    async fn stats(&self) -> Result<OutboxStats, StoreError>;

    /// Up to `limit` rows of `status`, in emission order, after the row `after` (a
    /// [`OutboxPage::next`]).
    async fn list(
        &self,
        status: RowStatus,
        after: Option<i64>,
        limit: usize,
    ) -> Result<OutboxPage, StoreError>;

    /// Puts a dead row back to pending, due at once, its attempts counted from zero:
    /// `false` when `id` is not a dead row.
    async fn retry_dead(&self, id: Uuid) -> Result<bool, StoreError>;
}
