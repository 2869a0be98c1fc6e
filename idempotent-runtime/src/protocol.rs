//! The claim → run → complete/release protocol shared by the attribute and the
//! manual API.
//!
//! ```text
//! claim ──Acquired──▶ run body (lease renewed every lease/3) ──Ok──▶ complete(output) ──▶ Ok(t)
//!   │                                      │ Err / panic / cancel
//!   │                                      └──────────────────────▶ release ──▶ Err(e) / unwind
//!   ├─Completed──▶ Ok(cached t)            (no body run)
//!   ├─InProgress──▶ Err(InProgress) or wait with backoff, then claim again
//!   ├─Exhausted──▶ Err(AttemptsExhausted)
//!   └─FingerprintMismatch──▶ Err(FingerprintMismatch)
//! ```

use crate::output::Output;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Release, Store, Token};
use crate::{Error, KeyBuilder, NotReplayable, RecordKey, StoreError, registered_store};
use futures_util::FutureExt;
use futures_util::future::{Either, Ready, ready};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::Instrument;

/// Default cap on a cached output's serialized size: 64 KiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;

static MAX_OUTPUT_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_OUTPUT_BYTES);

/// Sets the process-wide cap on a cached output's serialized (JSON) size, for handlers
/// declared with the attribute. An output over the cap is still returned to the caller,
/// but the record is Completed without it, and later duplicates get
/// [`Error::OutputNotReplayable`] instead of a value.
pub fn set_max_output_bytes(bytes: usize) {
    MAX_OUTPUT_BYTES.store(bytes, Ordering::Relaxed);
}

/// What to do when the store cannot be reached (`on_store_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Fail closed: return [`Error::Store`], do not run the handler (guarantee G4).
    #[default]
    Fail,
    /// Fail open: run the handler without deduplication, logging a warning.
    Process,
}

/// What to do when another execution holds the claim (`on_in_progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnInProgress {
    /// Return [`Error::InProgress`] at once.
    #[default]
    Reject,
    /// Wait, with backoff, for at most one lease; return the winner's output if it
    /// completes, run the handler if the winner fails or its lease expires.
    Wait,
}

/// The shortest lease the protocol accepts: 100 ms.
///
/// A running handler's lease is renewed every third of it, and a store round trip
/// under load can take tens of milliseconds; a shorter lease would lapse under running
/// handlers and let duplicates run them again. The attribute rejects a shorter `lease`
/// at compile time; [`Idempotency::lease`](crate::Idempotency::lease) at run time
/// ([`Error::InvalidSettings`]).
pub const MIN_LEASE: Duration = Duration::from_millis(100);

impl Settings {
    /// Checks what the compiler cannot check for the manual API: the lease is at least
    /// [`MIN_LEASE`].
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.lease < MIN_LEASE {
            return Err(Error::InvalidSettings {
                reason: format!(
                    "a lease of {:?} is shorter than the minimum of 100ms: renewals (every third of \
                     the lease) could not keep up with the store, and duplicates would run the \
                     handler again; use a lease of at least 100ms",
                    self.lease
                ),
            });
        }
        Ok(())
    }
}

/// Protocol settings of one handler. The attribute builds it from its arguments;
/// the manual API from [`Idempotency`](crate::Idempotency)'s builder methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long a completed key is remembered.
    pub ttl: Duration,
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// Poison the key after this many failed attempts.
    pub max_attempts: Option<u32>,
    /// Store unreachable: fail closed or run unprotected.
    pub on_store_error: OnStoreError,
    /// Claim held elsewhere: reject or wait.
    pub on_in_progress: OnInProgress,
    /// Cap on the cached output's size; `None` uses the process-wide cap
    /// ([`set_max_output_bytes`]).
    pub max_output_bytes: Option<usize>,
}

impl Settings {
    /// The defaults of the attribute: `ttl = "7d"`, `lease = "60s"`, unlimited attempts,
    /// fail closed, reject while in progress.
    pub const DEFAULT: Settings = Settings {
        ttl: Duration::from_secs(7 * 24 * 3600),
        lease: Duration::from_secs(60),
        max_attempts: None,
        on_store_error: OnStoreError::Fail,
        on_in_progress: OnInProgress::Reject,
        max_output_bytes: None,
    };
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The claim under which the current handler runs; see [`current_claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claim {
    /// The handler's scope.
    pub scope: Cow<'static, str>,
    /// The fencing token of this claim: strictly greater than the token of every earlier
    /// claim of the same key, so downstream writes can be fenced with it.
    pub token: Token,
    /// 1 on the first attempt, 2 on the first retry, …
    pub attempt: u32,
}

impl Claim {
    /// Whether an earlier attempt on this key failed, crashed or was cancelled.
    pub fn is_retry(&self) -> bool {
        self.attempt > 1
    }
}

tokio::task_local! {
    static CURRENT_CLAIM: Claim;
}

/// The claim the calling handler runs under, or `None` outside an idempotent handler
/// (and when deduplication is disabled or skipped by `on_store_error = "process"`).
///
/// ```
/// use idempotent_runtime::{current_claim, idempotent, Error};
///
/// #[idempotent(key = "id")]
/// async fn handle(id: &str) -> Result<u32, Error> {
///     let claim = current_claim().expect("runs under a claim");
///     Ok(claim.attempt)
/// }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// assert_eq!(handle("m-1").await.unwrap(), 1);
/// # });
/// ```
pub fn current_claim() -> Option<Claim> {
    CURRENT_CLAIM.try_with(Claim::clone).ok()
}

/// Runs `body` with `claim` visible to [`current_claim`] (as is when `None`).
pub(crate) async fn with_claim<F: Future>(claim: Option<Claim>, body: F) -> F::Output {
    match claim {
        Some(c) => CURRENT_CLAIM.scope(c, body).await,
        None => body.await,
    }
}

/// A store reference that can outlive the call (needed to release a cancelled claim
/// from a spawned task).
#[derive(Clone, Debug)]
pub(crate) enum StoreHandle {
    Static(&'static dyn Store),
    Shared(Arc<dyn Store>),
}

impl StoreHandle {
    pub(crate) fn get(&self) -> &dyn Store {
        match self {
            StoreHandle::Static(s) => *s,
            StoreHandle::Shared(s) => &**s,
        }
    }

    /// The store for one call, without touching the reference count.
    pub(crate) fn at(&self) -> StoreAt<'_> {
        match self {
            StoreHandle::Static(s) => StoreAt::Static(*s),
            StoreHandle::Shared(s) => StoreAt::Shared(s),
        }
    }
}

/// The store of one call: a [`StoreHandle`] borrowed, or a `'static` store.
#[derive(Clone, Copy)]
pub(crate) enum StoreAt<'a> {
    Static(&'static dyn Store),
    Shared(&'a Arc<dyn Store>),
}

impl<'a> StoreAt<'a> {
    pub(crate) fn get(self) -> &'a dyn Store {
        match self {
            StoreAt::Static(s) => s,
            StoreAt::Shared(s) => &**s,
        }
    }

    fn to_handle(self) -> StoreHandle {
        match self {
            StoreAt::Static(s) => StoreHandle::Static(s),
            StoreAt::Shared(s) => StoreHandle::Shared(s.clone()),
        }
    }
}

/// A handler's scope as the protocol passes it around: the attribute's is `'static`,
/// so neither the claim nor a metrics label copies it.
#[derive(Clone, Copy)]
pub(crate) enum Scope<'a> {
    Static(&'static str),
    Shared(&'a Cow<'static, str>),
}

impl Scope<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Scope::Static(s) => s,
            Scope::Shared(s) => s,
        }
    }

    fn to_cow(self) -> Cow<'static, str> {
        match self {
            Scope::Static(s) => Cow::Borrowed(s),
            Scope::Shared(s) => s.clone(),
        }
    }
}

impl From<&'static str> for Scope<'_> {
    fn from(s: &'static str) -> Self {
        Scope::Static(s)
    }
}

impl<'a> From<&'a Cow<'static, str>> for Scope<'a> {
    fn from(s: &'a Cow<'static, str>) -> Self {
        match s {
            Cow::Borrowed(s) => Scope::Static(s),
            Cow::Owned(_) => Scope::Shared(s),
        }
    }
}

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

/// Bytes of a serialized output kept on the stack; most outputs (`()`, ids, small
/// receipts) fit, so caching them does not allocate.
const INLINE_OUTPUT: usize = 64;

/// A serialized output: inline while it fits, on the heap after.
pub(crate) struct OutputBuf {
    len: usize,
    inline: [u8; INLINE_OUTPUT],
    // empty until the output outgrows `inline`; then holds all of it
    heap: Vec<u8>,
}

impl OutputBuf {
    pub(crate) fn new() -> Self {
        OutputBuf {
            len: 0,
            inline: [0; INLINE_OUTPUT],
            heap: Vec::new(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.heap.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }

    fn into_vec(self) -> Vec<u8> {
        if self.heap.is_empty() {
            self.inline[..self.len].to_vec()
        } else {
            self.heap
        }
    }
}

impl std::io::Write for OutputBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.write_all(b)?;
        Ok(b.len())
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        if self.heap.is_empty() && self.len + b.len() <= INLINE_OUTPUT {
            self.inline[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        } else {
            if self.heap.is_empty() {
                self.heap.reserve(2 * (self.len + b.len()));
                self.heap.extend_from_slice(&self.inline[..self.len]);
            }
            self.heap.extend_from_slice(b);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// First byte of a cached output that holds no value but the reason it could not be
/// cached (JSON text never starts with it), followed by that reason in UTF-8.
const NOT_CACHED: u8 = 0x01;

/// Whether a serialized output fits the cache; warns when it does not.
pub(crate) fn fits(size: usize, cap: usize) -> bool {
    if size > cap {
        tracing::warn!(
            size,
            cap,
            "handler output is over the cache cap; duplicates will get OutputNotReplayable"
        );
        return false;
    }
    true
}

/// What is cached for an output that does not serialize: the marker and the reason,
/// so that duplicates are told why they get no value.
pub(crate) fn not_serializable(e: &serde_json::Error) -> Vec<u8> {
    tracing::warn!(error = %e, "handler output does not serialize; it is not cached");
    let mut v = vec![NOT_CACHED];
    v.extend_from_slice(e.to_string().as_bytes());
    v.truncate(1024);
    v
}

/// Serializes an output for the cache; `None` when it is over the cap. An output that
/// cannot be serialized is cached as the reason why (it is still returned to the caller).
pub(crate) fn encode_output<T: Serialize>(value: &T, cap: usize) -> Option<Vec<u8>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => fits(bytes.len(), cap).then_some(bytes),
        Err(e) => Some(not_serializable(&e)),
    }
}

/// The cached form of an output (see [`Output`]), in a buffer that stays on the stack
/// for small outputs; `None` when it is not cached.
fn encode_output_buf<T: Output>(value: &T, cap: usize) -> Option<OutputBuf> {
    let mut buf = OutputBuf::new();
    value.encode(&mut buf, cap).then_some(buf)
}

pub(crate) fn decode_output<T: DeserializeOwned>(output: Option<Vec<u8>>) -> Result<T, Error> {
    match output {
        None => Err(Error::OutputNotReplayable {
            reason: NotReplayable::TooLarge,
        }),
        Some(bytes) if bytes.first() == Some(&NOT_CACHED) => Err(Error::OutputNotReplayable {
            reason: NotReplayable::NotSerializable {
                message: String::from_utf8_lossy(&bytes[1..]).into_owned(),
            },
        }),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::OutputNotReplayable {
            reason: NotReplayable::Decode(e),
        }),
    }
}

/// What a dropped (cancelled) handler future leaves behind, and how to clean it up.
enum Pending {
    /// Nothing: the protocol finished.
    Nothing,
    /// The body was running: release the claim so a redelivery can retry at once.
    Release,
    /// The body succeeded but its completion was not recorded yet: record it, so the
    /// work that happened is not run again.
    Complete {
        output: Option<Vec<u8>>,
        ttl: Duration,
    },
}

/// Cleans up a claim whose handler future is dropped before the protocol finished.
pub(crate) struct CancelGuard<'a> {
    store: StoreAt<'a>,
    key: &'a RecordKey,
    scope: Scope<'a>,
    token: Token,
    pending: Pending,
}

impl<'a> CancelGuard<'a> {
    /// A guard that releases the claim if dropped before [`disarm`](Self::disarm).
    pub(crate) fn new(
        store: StoreAt<'a>,
        key: &'a RecordKey,
        scope: Scope<'a>,
        token: Token,
    ) -> Self {
        CancelGuard {
            store,
            key,
            scope,
            token,
            pending: Pending::Release,
        }
    }

    /// From now on a drop records this completion instead of releasing.
    pub(crate) fn completing(&mut self, output: Option<Vec<u8>>, ttl: Duration) {
        self.pending = Pending::Complete { output, ttl };
    }

    /// The protocol finished; nothing to clean up.
    pub(crate) fn disarm(&mut self) {
        self.pending = Pending::Nothing;
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        let pending = std::mem::replace(&mut self.pending, Pending::Nothing);
        if matches!(pending, Pending::Nothing) {
            return;
        }
        record(Outcome::Cancelled, self.scope);
        // Without a runtime to run the cleanup on, the lease expires on its own.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.to_handle();
        let key = self.key.clone();
        let token = self.token;
        rt.spawn(async move {
            let store = store.get();
            let r = match pending {
                Pending::Complete { output, ttl } => {
                    let c = Completion {
                        key: &key,
                        token,
                        output: output.as_deref(),
                        ttl,
                    };
                    match store.complete_now(&c) {
                        Some(r) => r,
                        None => store.complete(&c).await,
                    }
                }
                _ => {
                    let r = Release { key: &key, token };
                    match store.release_now(&r) {
                        Some(f) => f,
                        None => store.release(&r).await,
                    }
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not clean up a cancelled claim; it frees when its lease expires");
            }
        });
    }
}

/// How one handled message ended; the `outcome` of its span and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
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
    pub(crate) fn as_str(self) -> &'static str {
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
fn record_span<V: tracing::Value>(field: &str, value: V) {
    if tracing::dispatcher::has_been_set() {
        tracing::Span::current().record(field, value);
    }
}

/// Records an outcome on the current span and, with the `metrics` feature, in the
/// `idempotent_messages_total{scope, outcome}` counter. (The handler's run time goes
/// to the `idempotent_handler_seconds{scope}` histogram.)
pub(crate) fn record<'a>(outcome: Outcome, scope: impl Into<Scope<'a>>) {
    record_span("outcome", outcome.as_str());
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

async fn renew_loop(store: &dyn Store, key: &RecordKey, token: Token, lease: Duration) {
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        match store.renew(key, token, lease).await {
            Ok(Fence::Held) => {}
            Ok(Fence::Lost) => {
                tracing::error!(
                    scope = key.scope(),
                    "lease lost while the handler runs: another execution may have taken the key over"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed; retrying at the next tick");
            }
        }
    }
}

/// Where a message's store comes from.
pub(crate) enum StoreSource<'a> {
    /// A store the caller holds.
    Handle(&'a StoreHandle),
    /// `store = PATH` of the attribute.
    Static(&'static dyn Store),
    /// A store registered under this name, looked up now.
    Named(&'a str),
}

/// The store registered under `name`, or [`Error::UnknownStore`].
pub(crate) fn lookup_store(name: &str) -> Result<&'static dyn Store, Error> {
    registered_store(name).ok_or_else(|| Error::UnknownStore {
        name: name.to_owned(),
    })
}

/// Runs one message under the protocol: what the attribute and the manual API share.
/// With `IDEMPOTENT_DISABLED` the body runs as is; otherwise the key is finished under
/// `scope`, the fingerprint checked and the store resolved (in that order, the first
/// failure returned without running anything), and [`execute`] takes over.
#[inline]
pub(crate) fn run<'a, T, E, Fut>(
    settings: &'a Settings,
    scope: Scope<'a>,
    key: KeyBuilder,
    fingerprint: Option<Result<[u8; 32], Error>>,
    store: StoreSource<'a>,
    body: Fut,
) -> impl Future<Output = Result<T, E>>
where
    T: Output,
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    if disabled() {
        note_disabled();
        return Either::Left(body);
    }
    let call = (|| {
        settings.check()?;
        key.check()?;
        let fingerprint = fingerprint.transpose()?;
        let store = match store {
            StoreSource::Handle(h) => h.at(),
            StoreSource::Static(s) => StoreAt::Static(s),
            StoreSource::Named(name) => StoreAt::Static(lookup_store(name)?),
        };
        Ok::<_, Error>(Call {
            scope,
            store,
            key: CallKey::Builder(key),
            fingerprint,
        })
    })();
    Either::Right(match call {
        Ok(call) => Either::Left(execute(settings, call, body)),
        Err(e) => Either::Right(ready(Err(e.into()))),
    })
}

/// One message to run under the protocol: where, under which key, with which
/// fingerprint (the hash of the declared fingerprint expression).
pub(crate) struct Call<'a> {
    pub(crate) scope: Scope<'a>,
    pub(crate) store: StoreAt<'a>,
    pub(crate) key: CallKey,
    pub(crate) fingerprint: Option<[u8; 32]>,
}

/// The key of a [`Call`]: finished by the protocol's future, in place.
pub(crate) enum CallKey {
    /// Checked: it finishes.
    Builder(KeyBuilder),
    Finished(RecordKey),
}

/// Runs `body` under the protocol, in the message's span.
#[inline]
pub(crate) fn execute<'a, T, E, Fut>(
    settings: &'a Settings,
    call: Call<'a>,
    body: Fut,
) -> impl Future<Output = Result<T, E>>
where
    T: Output,
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    // one span per handled message: the scope and the outcome, never the key
    let span = tracing::info_span!(
        "idempotent",
        scope = %call.scope.as_str(),
        attempt = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let fut = execute_in_span(settings, call, body);
    if span.is_disabled() {
        // nothing collects it: no enter and exit on every poll
        Either::Left(fut)
    } else {
        Either::Right(fut.instrument(span))
    }
}

// Not an `async fn`: that would keep a second copy of its arguments in the future
// (rustc moves them into locals); an `async move` block uses its captures in place.
// Everything a store answering at once does not need (awaited claims, waiting on
// another execution, completion retries) is boxed, so the future stays small: it is
// moved into every caller's future.
#[inline]
#[allow(clippy::manual_async_fn)]
fn execute_in_span<'a, T, E, Fut>(
    settings: &'a Settings,
    call: Call<'a>,
    body: Fut,
) -> impl Future<Output = Result<T, E>>
where
    T: Output,
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    async move {
        let (scope, store) = (call.scope, call.store);
        // written in place: moving a finished key costs more
        let mut key = RecordKey::EMPTY;
        match call.key {
            CallKey::Builder(b) => {
                if let Err(e) = b.finish_into(scope.as_str(), &mut key) {
                    return Err(e.into());
                }
            }
            CallKey::Finished(k) => key = k,
        }
        let key = &key;
        let fingerprint = call.fingerprint.as_ref();
        let (token, attempt) =
            match store
                .get()
                .claim_now(&claim_request(settings, key, fingerprint))
            {
                Some(Ok(ClaimOutcome::Acquired { token, attempt })) => (token, attempt),
                Some(Ok(ClaimOutcome::Completed { output })) => return replay(output, scope),
                first => match Box::pin(claim_slowly(
                    settings,
                    store,
                    scope,
                    key,
                    fingerprint,
                    first,
                ))
                .await
                {
                    Claimed::Acquired { token, attempt } => (token, attempt),
                    Claimed::Done(r) => return r.map_err(E::from),
                    Claimed::Unavailable(e) => {
                        return Box::pin(store_unavailable(settings, scope, e, body)).await;
                    }
                },
            };

        // claimed: run the body, then complete or release
        record_span("attempt", attempt);
        let mut guard = CancelGuard::new(store, key, scope, token);
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let claim = Claim {
            scope: scope.to_cow(),
            token,
            attempt,
        };
        let mut body = pin!(CURRENT_CLAIM.scope(claim, AssertUnwindSafe(body).catch_unwind()));
        let mut renewal = Renewal::new(store.get(), key, token, settings.lease);
        let result = poll_fn(|cx| match body.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => {
                renewal.poll(cx);
                Poll::Pending
            }
        })
        .await;
        // The renewal ends before the completion or release starts: a renewal waiting
        // for (or holding) a store's lock must not keep it from its own next step.
        drop(renewal);
        #[cfg(feature = "metrics")]
        metrics::histogram!("idempotent_handler_seconds", "scope" => scope.to_cow())
            .record(started.elapsed().as_secs_f64());
        let store = store.get();
        match result {
            Ok(Ok(value)) => {
                // stores that answer at once complete here, with the output on the stack
                let slow = {
                    let output = encode_output_buf(&value, output_cap(settings));
                    let completion = Completion {
                        key,
                        token,
                        output: output.as_ref().map(OutputBuf::as_slice),
                        ttl: settings.ttl,
                    };
                    match store.complete_now(&completion) {
                        Some(Ok(Fence::Held)) => None,
                        first => Some((first, output.map(OutputBuf::into_vec))),
                    }
                };
                if let Some((first, output)) = slow {
                    // if this future is dropped while completing, the guard records the
                    // completion from a spawned task instead of releasing: the work
                    // happened
                    guard.completing(output, settings.ttl);
                    if let Pending::Complete { output, ttl } = &guard.pending {
                        let completion = Completion {
                            key,
                            token,
                            output: output.as_deref(),
                            ttl: *ttl,
                        };
                        let outcome = Box::pin(complete_with_retry(
                            store,
                            completion,
                            settings.lease,
                            first,
                        ))
                        .await;
                        guard.disarm();
                        record(outcome, scope);
                        return Ok(value);
                    }
                }
                guard.disarm();
                record(Outcome::Executed, scope);
                Ok(value)
            }
            Ok(Err(e)) => {
                release_soon(store, key, token).await;
                guard.disarm();
                record(Outcome::Failed, scope);
                Err(e)
            }
            Err(panic) => {
                release_soon(store, key, token).await;
                guard.disarm();
                record(Outcome::Panicked, scope);
                std::panic::resume_unwind(panic)
            }
        }
    }
}

fn claim_request<'a>(
    settings: &Settings,
    key: &'a RecordKey,
    fingerprint: Option<&'a [u8; 32]>,
) -> ClaimRequest<'a> {
    ClaimRequest {
        key,
        lease: settings.lease,
        ttl: settings.ttl,
        fingerprint: fingerprint.map(|f| &f[..]),
        max_attempts: settings.max_attempts,
    }
}

/// A duplicate of a completed key: the cached output.
fn replay<T: Output, E: From<Error>>(output: Option<Vec<u8>>, scope: Scope<'_>) -> Result<T, E> {
    let r = T::decode(output);
    let outcome = match r {
        Ok(_) => Outcome::Replayed,
        Err(_) => Outcome::NotReplayable,
    };
    record(outcome, scope);
    r.map_err(E::from)
}

/// How a claim that was not acquired at once ended.
enum Claimed<T> {
    Acquired {
        token: Token,
        attempt: u32,
    },
    /// What the handler returns without running.
    Done(Result<T, Error>),
    Unavailable(StoreError),
}

/// The claim, from the store's first answer (`None`: the store must be awaited) on:
/// awaiting the store, and waiting on another execution (`on_in_progress = "wait"`).
async fn claim_slowly<T: Output>(
    settings: &Settings,
    store: StoreAt<'_>,
    scope: Scope<'_>,
    key: &RecordKey,
    fingerprint: Option<&[u8; 32]>,
    mut first: Option<Result<ClaimOutcome, StoreError>>,
) -> Claimed<T> {
    let req = claim_request(settings, key, fingerprint);
    let mut waited = Duration::ZERO;
    let mut backoff = Duration::from_millis(5);
    loop {
        let outcome = match first.take() {
            Some(r) => r,
            None => match store.get().claim_now(&req) {
                Some(r) => r,
                None => store.get().claim(&req).await,
            },
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => return Claimed::Unavailable(e),
        };
        match outcome {
            ClaimOutcome::Acquired { token, attempt } => {
                return Claimed::Acquired { token, attempt };
            }
            ClaimOutcome::Completed { output } => return Claimed::Done(replay(output, scope)),
            ClaimOutcome::InProgress { retry_after } => {
                if settings.on_in_progress == OnInProgress::Reject || waited >= settings.lease {
                    record(Outcome::InProgress, scope);
                    return Claimed::Done(Err(Error::InProgress { retry_after }));
                }
                let pause = backoff
                    .min(retry_after + Duration::from_millis(1))
                    .min(settings.lease - waited);
                tokio::time::sleep(pause).await;
                waited += pause;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            ClaimOutcome::Exhausted { attempts } => {
                record(Outcome::Exhausted, scope);
                return Claimed::Done(Err(Error::AttemptsExhausted { attempts }));
            }
            ClaimOutcome::FingerprintMismatch => {
                record(Outcome::FingerprintMismatch, scope);
                return Claimed::Done(Err(Error::FingerprintMismatch));
            }
        }
    }
}

async fn store_unavailable<T, E, Fut>(
    settings: &Settings,
    scope: Scope<'_>,
    e: StoreError,
    body: Fut,
) -> Result<T, E>
where
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    match settings.on_store_error {
        OnStoreError::Fail => {
            record(Outcome::StoreError, scope);
            Err(Error::Store(e).into())
        }
        OnStoreError::Process => {
            record(Outcome::Unprotected, scope);
            tracing::warn!(error = %e, "store unavailable; running the handler without deduplication (on_store_error = \"process\")");
            body.await
        }
    }
}

/// The lease renewal of a running body, every third of the lease. It starts when the
/// body first yields: a handler that finishes at once never arms a timer, and its
/// future does not carry one.
struct Renewal<'a> {
    store: &'a dyn Store,
    key: &'a RecordKey,
    token: Token,
    lease: Duration,
    state: RenewalState<'a>,
}

enum RenewalState<'a> {
    NotStarted,
    Running(Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
    /// The lease was lost: nothing more to renew.
    Stopped,
}

impl<'a> Renewal<'a> {
    fn new(store: &'a dyn Store, key: &'a RecordKey, token: Token, lease: Duration) -> Self {
        Renewal {
            store,
            key,
            token,
            lease,
            state: RenewalState::NotStarted,
        }
    }

    /// Drives the renewal while the body is pending.
    fn poll(&mut self, cx: &mut Context<'_>) {
        if let RenewalState::NotStarted = self.state {
            self.state = RenewalState::Running(Box::pin(renew_loop(
                self.store, self.key, self.token, self.lease,
            )));
        }
        if let RenewalState::Running(f) = &mut self.state
            && f.as_mut().poll(cx).is_ready()
        {
            self.state = RenewalState::Stopped;
        }
    }
}

/// Runs the body under `claim`: visible to [`current_claim`], with the lease renewed
/// every third of it, and panics caught.
pub(crate) async fn run_body<T, E, Fut>(
    store: &dyn Store,
    key: &RecordKey,
    claim: Claim,
    lease: Duration,
    body: Fut,
) -> std::thread::Result<Result<T, E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut renewal = Renewal::new(store, key, claim.token, lease);
    let mut body = pin!(CURRENT_CLAIM.scope(claim, AssertUnwindSafe(body).catch_unwind()));
    poll_fn(|cx| match body.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => {
            renewal.poll(cx);
            Poll::Pending
        }
    })
    .await
}

pub(crate) fn output_cap(settings: &Settings) -> usize {
    settings
        .max_output_bytes
        .unwrap_or_else(|| MAX_OUTPUT_BYTES.load(Ordering::Relaxed))
}

/// Records the completion, retrying transient store errors for up to a third of the
/// lease. If it still fails the handler's value is returned anyway (its effects
/// happened); the claim then frees when its lease expires. `first` is the answer of
/// [`Store::complete_now`], if the store gave one. Returns the message's outcome:
/// executed, unrecorded or lease lost.
async fn complete_with_retry(
    store: &dyn Store,
    completion: Completion<'_>,
    lease: Duration,
    mut first: Option<Result<Fence, StoreError>>,
) -> Outcome {
    let deadline = lease / 3;
    let mut spent = Duration::ZERO;
    let mut pause = Duration::from_millis(10);
    loop {
        let r = match first.take() {
            Some(r) => r,
            None => match store.complete_now(&completion) {
                Some(r) => r,
                None => store.complete(&completion).await,
            },
        };
        match r {
            Ok(Fence::Held) => return Outcome::Executed,
            Ok(Fence::Lost) => {
                tracing::error!(
                    scope = completion.key.scope(),
                    "completion refused: the lease expired and another execution took the key over"
                );
                return Outcome::LeaseLost;
            }
            Err(e) if e.is_retryable() && spent + pause <= deadline => {
                tracing::warn!(error = %e, "completion failed; retrying");
                tokio::time::sleep(pause).await;
                spent += pause;
                pause *= 2;
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    scope = completion.key.scope(),
                    "could not record the completion; the key frees when its lease expires and a redelivery would run again"
                );
                return Outcome::Unrecorded;
            }
        }
    }
}

/// Releases a claim after a failed attempt; a refusal or a failure is logged (the key
/// frees when its lease expires). Done when this returns if the store answers at once,
/// else when the returned future (boxed: it is rare) completes.
fn release_soon<'a>(
    store: &'a dyn Store,
    key: &'a RecordKey,
    token: Token,
) -> Either<Ready<()>, Pin<Box<dyn Future<Output = ()> + Send + 'a>>> {
    let r = Release { key, token };
    match store.release_now(&r) {
        Some(r) => {
            released(key, r);
            Either::Left(ready(()))
        }
        None => Either::Right(Box::pin(async move {
            let r = Release { key, token };
            released(key, store.release(&r).await);
        })),
    }
}

fn released(key: &RecordKey, r: Result<Fence, StoreError>) {
    match r {
        Ok(Fence::Held) => {}
        Ok(Fence::Lost) => tracing::warn!(
            scope = key.scope(),
            "release refused: the lease had expired and another execution took the key over"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            scope = key.scope(),
            "could not release the claim; the key frees when its lease expires"
        ),
    }
}

pub(crate) static DISABLED_WARNED: AtomicBool = AtomicBool::new(false);

pub(crate) fn note_disabled() {
    warn_once(
        &DISABLED_WARNED,
        "idempotency disabled by IDEMPOTENT_DISABLED; running handler without deduplication",
    );
}
