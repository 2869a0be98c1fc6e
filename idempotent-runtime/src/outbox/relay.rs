//! The relay: publishes the rows of an outbox table ([`OutboxStore`]) through a
//! [`Publisher`], marks them sent once the broker confirmed them, backs failures off
//! per row and purges sent rows; and the fast path a consumer takes right after its
//! commit ([`Relay::dispatch`]).

use super::message::Outbox;
use super::publisher::{PublishError, Publisher};
use super::store::{ClaimedRow, OutboxStats, OutboxStore, Retry, RowLease};
use crate::error::StoreError;
use crate::store::Fence;
use futures_util::future::join_all;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;
use uuid::Uuid;

/// The relay's settings; see the builder methods of [`Relay`] for each.
#[derive(Debug, Clone)]
struct Options {
    batch_size: usize,
    poll_interval: Duration,
    lease: Duration,
    max_attempts: u32,
    max_unavailable_attempts: Option<u32>,
    backoff_base: Duration,
    backoff_max: Duration,
    retention: Duration,
    purge_interval: Duration,
    purge_batch: usize,
    stats_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_size: 100,
            poll_interval: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            max_attempts: 10,
            max_unavailable_attempts: None,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 3600),
            purge_interval: Duration::from_secs(60),
            purge_batch: 1000,
            stats_interval: Duration::from_secs(15),
        }
    }
}

/// Publishes the rows of an outbox table: claims a batch of due rows (a lease and a
/// fencing token per row), publishes each through the [`Publisher`], marks it sent
/// only once the broker confirmed it, and backs failures off per row; purges the rows
/// sent longer ago than the retention, in batches, so the table does not grow with
/// throughput.
///
/// - **Order.** A claim answers at most one row per ordering key, the earliest
///   pending one ([`OutboxStore`]'s rules), so the rows of one key are published one
///   at a time in emission order, while rows of other keys (and rows without one) are
///   published in parallel, a batch at a time.
/// - **Failures.** A failed publish counts one attempt and makes the row due again
///   after a backoff (the base delay doubled per attempt, up to the maximum), or
///   dead. A [`Rejected`](super::PublishErrorKind::Rejected) failure (the broker
///   refused this message) makes the row dead once its attempts reach
///   [`max_attempts`](Self::max_attempts) (default 10). An
///   [`Unavailable`](super::PublishErrorKind::Unavailable) failure (the broker is
///   down or timed out) never makes it dead, unless
///   [`max_unavailable_attempts`](Self::max_unavailable_attempts) is set: an outage
///   delays messages, it does not kill them. Attempts count both kinds, so a row that
///   failed for an outage many times is dead at its first rejection past the limit.
///   One row that cannot be published does not hold back the others; its key's later
///   rows wait behind it until it is sent or dead.
/// - **Several relays** (one per process) share a table without double work: each
///   claims other rows. A relay killed mid-batch leaves its rows leased until the
///   lease runs out (default 30 s); another relay then claims them again, and the
///   fencing token keeps the first one's late marks out. A message published by a
///   relay that died before marking it sent is published again: each message is
///   published at least once, with its stable id in the broker's dedup field.
///
/// ```no_run
/// # async fn demo(store: idempotent_runtime::PostgresStore) -> Result<(), Box<dyn std::error::Error>> {
/// use idempotent_runtime::outbox::{DEFAULT_OUTBOX_TABLE, MemoryPublisher, Relay};
///
/// let outbox = store.outbox(DEFAULT_OUTBOX_TABLE).await?;
/// let relay = Relay::new(outbox, MemoryPublisher::new()).batch_size(200);
/// let running = relay.clone().spawn()?;
/// // … on shutdown: finishes the batch in flight, then stops
/// running.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Relay {
    store: Arc<dyn OutboxStore>,
    publisher: Arc<dyn Publisher>,
    name: Arc<str>,
    options: Options,
    #[cfg(feature = "metrics")]
    gauges: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.name)
            .field("store", &self.store)
            .field("publisher", &self.publisher)
            .field("options", &self.options)
            .finish()
    }
}

/// What one pass of the relay did: [`Relay::run_once`], [`Relay::dispatch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayPass {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published and marked sent.
    pub sent: usize,
    /// Rows whose publish failed (due again later, or dead).
    pub failed: usize,
    /// Of those, rows marked dead.
    pub dead: usize,
    /// Rows whose marks were fenced out: another relay claimed them after this one's
    /// lease ran out.
    pub fenced: usize,
    /// The ids published and marked sent.
    pub sent_ids: Vec<Uuid>,
}

impl RelayPass {
    fn add(&mut self, other: RelayPass) {
        self.claimed += other.claimed;
        self.sent += other.sent;
        self.failed += other.failed;
        self.dead += other.dead;
        self.fenced += other.fenced;
        self.sent_ids.extend(other.sent_ids);
    }
}

/// A relay loop spawned by [`Relay::spawn`].
#[derive(Debug)]
pub struct RelayHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// Stops the loop once the batch in flight is published and marked, and waits for
    /// it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the loop at once, as a crash would: its claimed rows wait for their
    /// leases to run out.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// A name for a relay no other process uses.
fn default_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("relay-{}-{:08x}", std::process::id(), h.finish() as u32)
}

impl Relay {
    /// A relay publishing the rows of `store` through `publisher`, with the default
    /// settings.
    pub fn new(store: impl OutboxStore + 'static, publisher: impl Publisher + 'static) -> Self {
        Self::shared(Arc::new(store), Arc::new(publisher))
    }

    /// [`new`](Self::new) with a store and a publisher shared with other code.
    pub fn shared(store: Arc<dyn OutboxStore>, publisher: Arc<dyn Publisher>) -> Self {
        Relay {
            store,
            publisher,
            name: default_name().into(),
            options: Options::default(),
            #[cfg(feature = "metrics")]
            gauges: Arc::default(),
        }
    }

    /// The relay's name, recorded as the owner of the rows it leases (default
    /// `relay-<pid>-<random>`; at most 100 bytes).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into().into();
        self
    }

    /// The rows one pass claims at the most (default 100; at least 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.options.batch_size = n.max(1);
        self
    }

    /// How long the loop waits when a pass found less than a full batch (default
    /// 200 ms).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.options.poll_interval = d;
        self
    }

    /// How long a claimed row stays with this relay (default 30 s): longer than a
    /// publish takes, since another relay claims the row again after it.
    pub fn lease(mut self, d: Duration) -> Self {
        self.options.lease = d.max(Duration::from_millis(1));
        self
    }

    /// The attempts after which a rejected row is dead (default 10; at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.options.max_attempts = n.max(1);
        self
    }

    /// The attempts after which a row the broker could not take is dead (default
    /// `None`: never, an outage only delays messages).
    pub fn max_unavailable_attempts(mut self, n: Option<u32>) -> Self {
        self.options.max_unavailable_attempts = n.map(|n| n.max(1));
        self
    }

    /// The backoff of a failed row: `base` after the first failure, doubled at each
    /// one after, at most `max` (defaults 200 ms and 60 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.options.backoff_base = base;
        self.options.backoff_max = max.max(base);
        self
    }

    /// How long sent rows are kept before the loop purges them (default 24 h).
    pub fn retention(mut self, d: Duration) -> Self {
        self.options.retention = d;
        self
    }

    /// How often the loop purges sent rows (default every 60 s), and how many rows
    /// one `DELETE` takes at the most (default 1000).
    pub fn purge_every(mut self, every: Duration, batch: usize) -> Self {
        self.options.purge_interval = every;
        self.options.purge_batch = batch.max(1);
        self
    }

    /// How often the loop reads the table's statistics for the metrics (default every
    /// 15 s; with the `metrics` feature).
    pub fn stats_every(mut self, every: Duration) -> Self {
        self.options.stats_interval = every;
        self
    }

    /// The table this relay publishes from.
    pub fn store(&self) -> &Arc<dyn OutboxStore> {
        &self.store
    }

    /// One pass: claims a batch of due rows, publishes them and marks them.
    pub async fn run_once(&self) -> Result<RelayPass, StoreError> {
        let span = tracing::debug_span!(
            "outbox_relay_pass",
            relay = %self.name,
            claimed = tracing::field::Empty,
            sent = tracing::field::Empty,
            failed = tracing::field::Empty
        );
        async {
            let claimed = self
                .store
                .claim_due(&self.name, self.options.batch_size, self.options.lease)
                .await?;
            let pass = self.publish_claimed(claimed).await?;
            let span = tracing::Span::current();
            span.record("claimed", pass.claimed);
            span.record("sent", pass.sent);
            span.record("failed", pass.failed);
            Ok(pass)
        }
        .instrument(span)
        .await
    }

    /// Runs passes until one claims nothing: what it did in all. For tests and for a
    /// drain before shutdown; rows whose backoff has not passed stay pending.
    pub async fn drain(&self) -> Result<RelayPass, StoreError> {
        let mut total = RelayPass::default();
        loop {
            let pass = self.run_once().await?;
            let done = pass.claimed == 0;
            total.add(pass);
            if done {
                return Ok(total);
            }
        }
    }

    /// The fast path after a commit: publishes the messages of `outbox` (the
    /// execution that just committed) at once, in their order per ordering key, and
    /// marks them sent. What cannot be published now (a failure, a row another relay
    /// holds, a row behind an earlier pending one of its key) is left to the loop.
    pub async fn dispatch(&self, outbox: &Outbox) -> Result<RelayPass, StoreError> {
        let ids: Vec<Uuid> = outbox.messages().iter().map(|m| m.id()).collect();
        self.dispatch_ids(&ids).await
    }

    /// [`dispatch`](Self::dispatch) of the rows `ids`.
    pub async fn dispatch_ids(&self, ids: &[Uuid]) -> Result<RelayPass, StoreError> {
        let mut left: Vec<Uuid> = ids.to_vec();
        let mut total = RelayPass::default();
        let span =
            tracing::debug_span!("outbox_dispatch", relay = %self.name, messages = ids.len());
        async {
            while !left.is_empty() {
                let claimed = self
                    .store
                    .claim_ids(&self.name, &left, self.options.lease)
                    .await?;
                if claimed.is_empty() {
                    break;
                }
                let taken: Vec<Uuid> = claimed.iter().map(|r| r.lease.id).collect();
                let pass = self.publish_claimed(claimed).await?;
                // rows of a key whose earlier row was just sent are claimable now;
                // failed and fenced rows are the loop's
                let progress = pass.sent > 0;
                left.retain(|id| !taken.contains(id));
                total.add(pass);
                if !progress {
                    break;
                }
            }
            Ok(total)
        }
        .instrument(span)
        .await
    }

    /// Publishes claimed rows (at most one per ordering key, so all at once) and marks
    /// them.
    async fn publish_claimed(&self, claimed: Vec<ClaimedRow>) -> Result<RelayPass, StoreError> {
        let mut pass = RelayPass {
            claimed: claimed.len(),
            ..RelayPass::default()
        };
        if claimed.is_empty() {
            return Ok(pass);
        }
        let results = join_all(claimed.iter().map(|row| self.publish(row))).await;
        // the confirmed rows are marked first: a store error after that leaves only
        // failed rows to their leases
        let (confirmed, failed): (Vec<_>, Vec<_>) = claimed
            .iter()
            .zip(results)
            .partition(|(_, result)| result.is_ok());
        let sent: Vec<RowLease> = confirmed.iter().map(|(row, _)| row.lease).collect();
        let fences = self.store.mark_sent(&sent).await?;
        for (lease, fence) in sent.iter().zip(fences) {
            match fence {
                Fence::Held => {
                    pass.sent += 1;
                    pass.sent_ids.push(lease.id);
                }
                Fence::Lost => {
                    pass.fenced += 1;
                    tracing::debug!(
                        id = %lease.id,
                        "outbox row was claimed again by another relay after this relay's \
                         lease ran out"
                    );
                }
            }
        }
        for (row, result) in failed {
            let Err(e) = result else { continue };
            pass.failed += 1;
            let retry = retry_for(&self.options, row.attempts, &e);
            let fence = self
                .store
                .mark_failed(&row.lease, &e.to_string(), retry)
                .await?;
            match (fence, retry) {
                (Fence::Lost, _) => pass.fenced += 1,
                (Fence::Held, Retry::Dead) => {
                    pass.dead += 1;
                    tracing::warn!(
                        id = %row.lease.id,
                        destination = row.message.destination(),
                        attempts = row.attempts + 1,
                        error = %e,
                        "outbox message is dead: it will not be published again until an \
                         operator retries it"
                    );
                    #[cfg(feature = "metrics")]
                    metrics::counter!(
                        "idempotent_outbox_dead_total",
                        "destination" => row.message.destination().to_owned()
                    )
                    .increment(1);
                }
                (Fence::Held, Retry::After(d)) => tracing::debug!(
                    id = %row.lease.id,
                    retry_in = ?d,
                    error = %e,
                    "outbox publish failed"
                ),
            }
        }
        Ok(pass)
    }

    /// Publishes one row, timed.
    async fn publish(&self, row: &ClaimedRow) -> Result<(), PublishError> {
        let started = Instant::now();
        let result = self
            .publisher
            .publish(&row.message)
            .instrument(tracing::debug_span!(
                "outbox_publish",
                id = %row.lease.id,
                destination = row.message.destination(),
                attempt = row.attempts + 1
            ))
            .await;
        #[cfg(feature = "metrics")]
        {
            let outcome = match &result {
                Ok(()) => "ok",
                Err(e) if e.is_retryable() => "unavailable",
                Err(_) => "rejected",
            };
            metrics::histogram!(
                "idempotent_outbox_publish_seconds",
                "destination" => row.message.destination().to_owned(),
                "outcome" => outcome
            )
            .record(started.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = started;
        result
    }

    /// Deletes the rows sent longer ago than the retention, in batches: how many.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        self.store
            .purge_sent(self.options.retention, self.options.purge_batch)
            .await
    }

    /// Reads the table's statistics and, with the `metrics` feature, sets the gauges
    /// `idempotent_outbox_pending`, `idempotent_outbox_dead` and
    /// `idempotent_outbox_oldest_pending_seconds`, each per `destination` (a
    /// destination whose rows are all gone is set to 0).
    pub async fn report_stats(&self) -> Result<OutboxStats, StoreError> {
        let stats = self.store.stats().await?;
        #[cfg(feature = "metrics")]
        {
            let mut known = self
                .gauges
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now: std::collections::BTreeSet<String> = stats
                .destinations
                .iter()
                .map(|d| d.destination.clone())
                .collect();
            for gone in known.difference(&now) {
                set_gauges(gone, 0, 0, 0.0);
            }
            for d in &stats.destinations {
                let age = d.oldest_pending.map_or(0.0, |a| a.as_secs_f64());
                set_gauges(&d.destination, d.pending, d.dead, age);
            }
            *known = now;
        }
        tracing::debug!(
            pending = stats.pending(),
            dead = stats.dead(),
            oldest_pending = ?stats.oldest_pending(),
            "outbox statistics"
        );
        Ok(stats)
    }

    /// Runs the loop until `shutdown` completes: passes (back to back while they
    /// find full batches, else every poll interval), the purge of sent rows and the
    /// statistics at their intervals. A pass in flight when `shutdown` completes is
    /// finished (its rows published and marked) first. Store errors are logged and the
    /// loop goes on after the poll interval.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_purge = Instant::now();
        let mut last_stats: Option<Instant> = None;
        loop {
            let wait = match self.run_once().await {
                Ok(p) if p.claimed >= self.options.batch_size => Duration::ZERO,
                Ok(_) => self.options.poll_interval,
                Err(e) => {
                    tracing::warn!(relay = %self.name, error = %e, "outbox relay pass failed");
                    self.options.poll_interval
                }
            };
            if last_purge.elapsed() >= self.options.purge_interval {
                last_purge = Instant::now();
                match self.purge().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(purged = n, "purged sent outbox rows"),
                    Err(e) => tracing::warn!(error = %e, "purging sent outbox rows failed"),
                }
            }
            if cfg!(feature = "metrics")
                && last_stats.is_none_or(|t| t.elapsed() >= self.options.stats_interval)
            {
                last_stats = Some(Instant::now());
                if let Err(e) = self.report_stats().await {
                    tracing::warn!(error = %e, "reading outbox statistics failed");
                }
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Spawns the loop ([`run_until`](Self::run_until)) on the current Tokio runtime;
    /// fails outside one.
    pub fn spawn(self) -> Result<RelayHandle, StoreError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            StoreError::with_source(
                crate::error::StoreErrorKind::Rejected,
                "the relay must be spawned from within a Tokio runtime",
                e,
            )
        })?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = rt.spawn(async move {
            self.run_until(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        });
        Ok(RelayHandle { stop, task })
    }
}

#[cfg(feature = "metrics")]
fn set_gauges(destination: &str, pending: u64, dead: u64, oldest: f64) {
    let d = destination.to_owned();
    metrics::gauge!("idempotent_outbox_pending", "destination" => d.clone()).set(pending as f64);
    metrics::gauge!("idempotent_outbox_dead", "destination" => d.clone()).set(dead as f64);
    metrics::gauge!("idempotent_outbox_oldest_pending_seconds", "destination" => d).set(oldest);
}

/// `base` doubled `attempts - 1` times, at most `max`.
fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let mut d = base.min(max);
    for _ in 1..attempts.min(64) {
        d = d.saturating_mul(2).min(max);
    }
    d
}

/// What becomes of a row that failed its publish with `error` after `attempts` failed
/// publishes before this one, under `options`.
fn retry_for(options: &Options, attempts: u32, error: &PublishError) -> Retry {
    let attempts = attempts.saturating_add(1);
    let limit = if error.is_retryable() {
        options.max_unavailable_attempts
    } else {
        Some(options.max_attempts)
    };
    if limit.is_some_and(|max| attempts >= max) {
        return Retry::Dead;
    }
    Retry::After(backoff(options.backoff_base, options.backoff_max, attempts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::publisher::PublishErrorKind;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let (b, m) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff(b, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(b, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(b, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(b, m, 10), m);
        assert_eq!(backoff(b, m, u32::MAX), m);
    }

    #[test]
    fn rejections_kill_after_max_attempts_and_outages_never_by_default() {
        let mut options = Options {
            max_attempts: 3,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            ..Options::default()
        };
        let rejected = PublishError::new(PublishErrorKind::Rejected, "too large");
        let down = PublishError::new(PublishErrorKind::Unavailable, "timeout");
        assert_eq!(
            retry_for(&options, 0, &rejected),
            Retry::After(Duration::from_millis(10))
        );
        assert_eq!(
            retry_for(&options, 1, &rejected),
            Retry::After(Duration::from_millis(20))
        );
        assert_eq!(retry_for(&options, 2, &rejected), Retry::Dead);
        assert_eq!(
            retry_for(&options, 1000, &down),
            Retry::After(Duration::from_secs(1))
        );
        options.max_unavailable_attempts = Some(5);
        assert_eq!(
            retry_for(&options, 3, &down),
            Retry::After(Duration::from_millis(80))
        );
        assert_eq!(retry_for(&options, 4, &down), Retry::Dead);
    }
}
