//! The single-message driver: one message, claimed, run and completed or released in
//! its own span; what the attribute, the manual API and the HTTP layer run.

use super::cancel::{CancelGuard, Pending};
use super::claim::{CURRENT_CLAIM, Claim};
use super::decide::{Decision, Finished, decide, may_wait};
use super::handle::{Scope, StoreAt, StoreSource, lookup_store};
use super::renewal::Renewal;
use super::settings::{OnStoreError, Settings, output_cap};
use super::telemetry::{Outcome, disabled, note_disabled, record, record_span};
use crate::error::{Error, StoreError};
use crate::key::{KeyBuilder, RecordKey};
use crate::output::{Output, OutputBuf, encode_output_buf};
use crate::store::{self, ClaimRequest, Completion, Fence, Release, Store, Token};
use futures_util::FutureExt;
use futures_util::future::{Either, Ready, ready};
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;
use tracing::Instrument;

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
        // a store that answers at once decides here; any other answer goes the slow way
        let first = store
            .get()
            .as_immediate()
            .map(|s| s.claim_immediate(&claim_request(settings, key, fingerprint)))
            .map(|r| r.map(decide::<T>));
        let (token, attempt) = match first {
            Some(Ok(Decision::Run { token, attempt })) => (token, attempt),
            Some(Ok(Decision::Done(done))) => return done.finish(scope),
            first => match Box::pin(claim_slowly(settings, store, key, fingerprint, first)).await {
                Claimed::Acquired { token, attempt } => (token, attempt),
                Claimed::Done(done) => return done.finish(scope),
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
                    match store
                        .as_immediate()
                        .map(|s| s.complete_immediate(&completion))
                    {
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

/// How a claim that was not acquired at once ended.
enum Claimed<T> {
    Acquired {
        token: Token,
        attempt: u32,
    },
    /// The handler returns without running.
    Done(Finished<T>),
    Unavailable(StoreError),
}

/// The claim, from the store's first answer (`None`: the store must be awaited) on:
/// awaiting the store, and waiting on another execution (`on_in_progress = "wait"`).
async fn claim_slowly<T: Output>(
    settings: &Settings,
    store: StoreAt<'_>,
    key: &RecordKey,
    fingerprint: Option<&[u8; 32]>,
    mut first: Option<Result<Decision<T>, StoreError>>,
) -> Claimed<T> {
    let req = claim_request(settings, key, fingerprint);
    let mut waited = Duration::ZERO;
    let mut backoff = Duration::from_millis(5);
    loop {
        let decision = match first.take() {
            Some(r) => r,
            None => store::claim(store.get(), &req).await.map(decide),
        };
        match decision {
            Err(e) => return Claimed::Unavailable(e),
            Ok(Decision::Run { token, attempt }) => return Claimed::Acquired { token, attempt },
            Ok(Decision::Done(done)) => return Claimed::Done(done),
            Ok(Decision::InProgress { retry_after }) => {
                if !may_wait(settings, waited) {
                    return Claimed::Done(Finished::in_progress(retry_after));
                }
                let pause = backoff
                    .min(retry_after + Duration::from_millis(1))
                    .min(settings.lease - waited);
                tokio::time::sleep(pause).await;
                waited += pause;
                backoff = (backoff * 2).min(Duration::from_millis(500));
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

/// Records the completion, retrying transient store errors for up to a third of the
/// lease. If it still fails the handler's value is returned anyway (its effects
/// happened); the claim then frees when its lease expires. `first` is the store's
/// immediate answer, if it gave one. Returns the message's outcome:
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
            None => store::complete(store, &completion).await,
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
    match store.as_immediate().map(|s| s.release_immediate(&r)) {
        Some(r) => {
            released(key, r);
            Either::Left(ready(()))
        }
        None => Either::Right(Box::pin(async move {
            let r = Release { key, token };
            released(key, store::release(store, &r).await);
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
