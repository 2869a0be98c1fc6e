//! The message's span and metrics, and the `IDEMPOTENT_DISABLED` switch.

use super::handle::Scope;
use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// `IDEMPOTENT_DISABLED=1` (read once, at the first handled message).
pub(crate) fn disabled() -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    *DISABLED.get_or_init(|| {
        let on = std::env::var("IDEMPOTENT_DISABLED")
            .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"))
            .unwrap_or(false);
        if on {
            tracing::warn!(
                "IDEMPOTENT_DISABLED is set: #[idempotent] handlers run without deduplication"
            );
        }
        on
    })
}

fn warn_once(flag: &AtomicBool, msg: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!("{msg}");
    }
}

/// How one handled message ended: the `outcome` field of its span, the `outcome`
/// label of the `idempotent_messages_total` counter, and what [`observe`] tells the
/// caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The body ran and succeeded.
    Executed,
    /// A duplicate of a completed key: the cached output was returned.
    Replayed,
    /// Another execution holds the claim.
    InProgress,
    /// The body returned an error; the claim was released.
    Failed,
    /// The body panicked; the claim was released.
    Panicked,
    /// The handler's future was dropped mid-run.
    Cancelled,
    /// `max_attempts` reached.
    Exhausted,
    /// Same key, other fingerprint.
    FingerprintMismatch,
    /// The completed output could not be replayed.
    NotReplayable,
    /// The store failed; nothing ran.
    StoreError,
    /// The store failed and the body ran without deduplication.
    Unprotected,
    /// The body ran and succeeded, but its completion could not be stored (the store
    /// failed for a third of the lease): the handler returned its value, the key is
    /// not Completed, and a later duplicate runs the body again.
    Unrecorded,
    /// The body ran and succeeded, but its lease had expired and another execution had
    /// taken the key over: the completion was refused (fenced out).
    LeaseLost,
}

impl Outcome {
    /// The name in spans and metrics: `executed`, `replayed`, `in_progress`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::InProgress => "in_progress",
            Outcome::Failed => "failed",
            Outcome::Panicked => "panicked",
            Outcome::Cancelled => "cancelled",
            Outcome::Exhausted => "exhausted",
            Outcome::FingerprintMismatch => "fingerprint_mismatch",
            Outcome::NotReplayable => "not_replayable",
            Outcome::StoreError => "store_error",
            Outcome::Unprotected => "unprotected",
            Outcome::Unrecorded => "unrecorded",
            Outcome::LeaseLost => "lease_lost",
        }
    }
}

/// Sets a field of the current span; free when nothing collects traces.
pub(crate) fn record_span<V: tracing::Value>(field: &str, value: V) {
    if tracing::dispatcher::has_been_set() {
        tracing::Span::current().record(field, value);
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

tokio::task_local! {
    /// The outcome [`observe`] reports: the last one recorded in its scope.
    static OBSERVED: Cell<Option<Outcome>>;
}

/// Runs `handler` (a call of an `#[idempotent]` handler, or of
/// [`Idempotency::run`](crate::Idempotency::run)) and returns its result together with
/// how the message ended: [`Outcome::Replayed`] when the output came from the store
/// and the body did not run, [`Outcome::Executed`] when the body ran and its completion
/// was recorded, and so on. The handler's signature does not change; callers that do
/// not care do not call this.
///
/// `None` when the handler ended before the protocol decided anything (a key that
/// cannot be encoded, an unknown store, invalid settings) or ran with deduplication
/// disabled (`IDEMPOTENT_DISABLED`). For a handler that calls other handlers, the
/// outcome is the outer one's, which is recorded last. For a batch, use the
/// per-message results.
///
/// ```
/// use idempotent_runtime::{Error, Outcome, idempotent, observe};
///
/// #[idempotent(key = "id")]
/// async fn charge(id: &str) -> Result<u64, Error> {
///     Ok(100)
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let (first, outcome) = observe(charge("order-7")).await;
/// assert_eq!((first.unwrap(), outcome), (100, Some(Outcome::Executed)));
/// let (again, outcome) = observe(charge("order-7")).await;
/// assert_eq!((again.unwrap(), outcome), (100, Some(Outcome::Replayed)));
/// # });
/// ```
pub async fn observe<F: Future>(handler: F) -> (F::Output, Option<Outcome>) {
    OBSERVED
        .scope(Cell::new(None), async {
            let output = handler.await;
            (output, OBSERVED.with(Cell::get))
        })
        .await
}

/// Records an outcome on the current span, for [`observe`] and, with the `metrics`
/// feature, in the `idempotent_messages_total{scope, outcome}` counter. (The handler's
/// run time goes to the `idempotent_handler_seconds{scope}` histogram.)
pub(crate) fn record<'a>(outcome: Outcome, scope: impl Into<Scope<'a>>) {
    record_span("outcome", outcome.as_str());
    let _ = OBSERVED.try_with(|o| o.set(Some(outcome)));
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "idempotent_messages_total",
        "scope" => scope.into().to_cow(),
        "outcome" => outcome.as_str()
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = scope;
}

pub(crate) static DISABLED_WARNED: AtomicBool = AtomicBool::new(false);

pub(crate) fn note_disabled() {
    warn_once(
        &DISABLED_WARNED,
        "idempotency disabled by IDEMPOTENT_DISABLED; running handler without deduplication",
    );
}
