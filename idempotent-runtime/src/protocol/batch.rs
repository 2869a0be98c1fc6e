//! The batch form of the protocol: one round trip to claim a whole batch, one to
//! complete it and one to release its failures, for consumers that receive messages in
//! lists (RocketMQ and Kafka listeners, SQS `ReceiveMessage`, NATS fetch).
//!
//! [`Idempotency::run_batch`](crate::Idempotency::run_batch) and
//! [`run_batch_with_fingerprint`](crate::Idempotency::run_batch_with_fingerprint)
//! (`manual/batch.rs`) prepare a [`Batch`] and drive it.

use super::cancel::CancelGuard;
use super::claim::Claim;
use super::decide::{Decision, Finished, decide};
use super::handle::StoreHandle;
use super::renewal::run_body;
use super::settings::{OnInProgress, OnStoreError, Settings, output_cap};
use super::single::{Call, CallKey, execute};
use super::telemetry::{Outcome, disabled, note_disabled, record};
use crate::error::{Error, StoreError};
use crate::key::{KeyPart, RecordKey};
use crate::output::encode_output;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Release};
use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What happened to one message before its handler could run.
enum Slot<T, E> {
    /// Not decided yet.
    Open,
    /// Decided: the handler's result, a replay, or a protocol error.
    Done(Result<T, E>),
    /// Same key as an earlier message of the batch: gets that message's outcome.
    SameAs(usize),
    /// Claimed elsewhere with `on_in_progress = wait`: handled one by one afterwards.
    Wait,
    /// Same key as an earlier message of the batch, another fingerprint: handled one by
    /// one afterwards, against the record the earlier message left.
    Later,
}

fn shared_store_error(e: &Arc<StoreError>) -> Error {
    Error::Store(StoreError::with_source(
        e.kind(),
        "idempotency store failed for the whole batch",
        e.clone(),
    ))
}

/// Every message of a batch refused before any claim: the store is unknown or the
/// settings are invalid.
fn refuse_all<T, E: From<Error>>(n: usize, e: &Error) -> Vec<Result<T, E>> {
    let again = || match e {
        Error::UnknownStore { name } => Error::UnknownStore { name: name.clone() },
        Error::InvalidSettings { reason } => Error::InvalidSettings {
            reason: reason.clone(),
        },
        other => Error::InvalidSettings {
            reason: other.to_string(),
        },
    };
    (0..n).map(|_| Err(again().into())).collect()
}

/// One batch in flight: per message its slot, key and fingerprint, and the cached
/// output of each decided message, for its repeats in the batch.
pub(crate) struct Batch<T, E> {
    scope: Cow<'static, str>,
    settings: Settings,
    store: StoreHandle,
    slots: Vec<Slot<T, E>>,
    keys: Vec<Option<RecordKey>>,
    fingerprints: Vec<Option<[u8; 32]>>,
    outputs: HashMap<usize, Option<Vec<u8>>>,
}

/// Why a batch runs no claim: what its messages get instead.
pub(crate) enum NotClaimed {
    /// `IDEMPOTENT_DISABLED`: the handlers run as they are.
    Disabled,
    /// An unknown store or invalid settings: every message gets the error.
    Refused(Error),
}

impl<T, E> Batch<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    /// A batch with its keys and fingerprints worked out; nothing awaited yet.
    #[allow(clippy::type_complexity)]
    pub(crate) fn prepared<'m, M, K: KeyPart>(
        scope: Cow<'static, str>,
        settings: &Settings,
        store: impl FnOnce() -> Result<StoreHandle, Error>,
        messages: &'m [M],
        key_of: impl Fn(&'m M) -> K,
        fingerprint_of: Option<&dyn Fn(&'m M) -> Result<[u8; 32], Error>>,
    ) -> Result<Self, NotClaimed> {
        if disabled() {
            note_disabled();
            return Err(NotClaimed::Disabled);
        }
        let mut batch =
            Batch::new(scope, settings, store, messages.len()).map_err(NotClaimed::Refused)?;
        batch.prepare(messages, key_of, fingerprint_of);
        Ok(batch)
    }

    /// Claims, runs and settles a prepared batch; the results in message order.
    pub(crate) async fn drive<'m, M, Fut>(
        batch: Result<Self, NotClaimed>,
        messages: &'m [M],
        handler: impl Fn(&'m M) -> Fut,
    ) -> Vec<Result<T, E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let mut batch = match batch {
            Ok(b) => b,
            Err(NotClaimed::Disabled) => return join_all(messages.iter().map(&handler)).await,
            Err(NotClaimed::Refused(reason)) => return refuse_all(messages.len(), &reason),
        };
        let run = match batch.claim().await {
            Ok(run) => run,
            Err(e) => {
                tracing::warn!(error = %e, "store unavailable; running the batch without deduplication (on_store_error = \"process\")");
                record(Outcome::Unprotected, &batch.scope);
                return join_all(messages.iter().map(&handler)).await;
            }
        };
        batch.run(messages, &handler, run).await;
        batch.run_deferred(messages, &handler).await;
        batch.results()
    }

    fn new(
        scope: Cow<'static, str>,
        settings: &Settings,
        store: impl FnOnce() -> Result<StoreHandle, Error>,
        n: usize,
    ) -> Result<Self, Error> {
        let store = store()?;
        let settings = *settings;
        settings.check()?;
        Ok(Batch {
            scope,
            settings,
            store,
            slots: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            fingerprints: Vec::with_capacity(n),
            outputs: HashMap::new(),
        })
    }

    /// Keys and fingerprints, with repeats inside the batch folded onto their first
    /// message (a repeat with another fingerprint runs alone after the batch).
    #[allow(clippy::type_complexity)]
    fn prepare<'m, M, K: KeyPart>(
        &mut self,
        messages: &'m [M],
        key_of: impl Fn(&'m M) -> K,
        fingerprint_of: Option<&dyn Fn(&'m M) -> Result<[u8; 32], Error>>,
    ) {
        let mut first: HashMap<RecordKey, usize> = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            let key = RecordKey::new(&self.scope, &key_of(m));
            let fingerprint = fingerprint_of.map(|f| f(m)).transpose();
            let (key, fingerprint) = match (key, fingerprint) {
                (Ok(k), Ok(f)) => (k, f),
                (Err(e), _) | (_, Err(e)) => {
                    self.slots.push(Slot::Done(Err(e.into())));
                    self.keys.push(None);
                    self.fingerprints.push(None);
                    continue;
                }
            };
            let slot = match first.get(&key) {
                // the same key with another fingerprint: decided by the store after the
                // batch, against the record the first message leaves
                Some(&f) if self.fingerprints[f] != fingerprint => Slot::Later,
                Some(&f) => Slot::SameAs(f),
                None => {
                    first.insert(key.clone(), i);
                    Slot::Open
                }
            };
            let keep = !matches!(slot, Slot::SameAs(_));
            self.slots.push(slot);
            self.keys.push(keep.then_some(key));
            self.fingerprints.push(fingerprint);
        }
    }

    /// One round trip claims every distinct key; each answer is decided. Returns the
    /// claims to run, or the store's error when the batch is to run unprotected
    /// (`on_store_error = "process"`).
    async fn claim(&mut self) -> Result<Vec<(usize, Claim)>, StoreError> {
        let claimed: Vec<usize> = (0..self.slots.len())
            .filter(|&i| matches!(self.slots[i], Slot::Open))
            .collect();
        let reqs: Vec<ClaimRequest<'_>> = claimed
            .iter()
            .map(|&i| ClaimRequest {
                key: self.keys[i].as_ref().expect("claimed keys exist"),
                lease: self.settings.lease,
                ttl: self.settings.ttl,
                fingerprint: self.fingerprints[i].as_ref().map(|f| &f[..]),
                max_attempts: self.settings.max_attempts,
            })
            .collect();
        let outcomes = if reqs.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.get().claim_batch(&reqs).await
        };
        drop(reqs);
        let outcomes = match outcomes {
            Ok(o) if o.len() == claimed.len() => o,
            Ok(o) => {
                let e = StoreError::new(
                    crate::error::StoreErrorKind::Corrupt,
                    format!(
                        "the store answered {} outcomes for a batch of {} claims",
                        o.len(),
                        claimed.len()
                    ),
                );
                self.fail_all(&claimed, e);
                return Ok(Vec::new());
            }
            Err(e) if self.settings.on_store_error == OnStoreError::Process => return Err(e),
            Err(e) => {
                self.fail_all(&claimed, e);
                return Ok(Vec::new());
            }
        };
        let mut run = Vec::new();
        for (&i, outcome) in claimed.iter().zip(outcomes) {
            if let ClaimOutcome::Completed { output } = &outcome {
                self.outputs.insert(i, output.clone());
            }
            let done = match decide::<T>(outcome) {
                Decision::Run { token, attempt } => {
                    let scope = self.scope.clone();
                    run.push((
                        i,
                        Claim {
                            scope,
                            token,
                            attempt,
                        },
                    ));
                    continue;
                }
                Decision::InProgress { .. }
                    if self.settings.on_in_progress == OnInProgress::Wait =>
                {
                    self.slots[i] = Slot::Wait;
                    continue;
                }
                Decision::InProgress { retry_after } => Finished::in_progress(retry_after),
                Decision::Done(done) => done,
            };
            self.slots[i] = Slot::Done(done.finish(&self.scope));
        }
        Ok(run)
    }

    fn fail_all(&mut self, claimed: &[usize], e: StoreError) {
        record(Outcome::StoreError, &self.scope);
        let e = Arc::new(e);
        for &i in claimed {
            self.slots[i] = Slot::Done(Err(shared_store_error(&e).into()));
        }
    }

    /// Runs the claimed handlers concurrently, then one round trip completes the
    /// successes and one releases the failures. A drop releases the unfinished claims;
    /// a panic resumes once every claim is settled.
    async fn run<'m, M, Fut>(
        &mut self,
        messages: &'m [M],
        handler: impl Fn(&'m M) -> Fut,
        run: Vec<(usize, Claim)>,
    ) where
        Fut: Future<Output = Result<T, E>>,
    {
        let Batch {
            scope,
            settings,
            store,
            slots,
            keys,
            outputs,
            ..
        } = self;
        let key = |i: usize| keys[i].as_ref().expect("claimed keys exist");
        let mut guards: Vec<CancelGuard<'_>> = run
            .iter()
            .map(|(i, c)| CancelGuard::new(store.at(), key(*i), (&*scope).into(), c.token))
            .collect();
        let results = join_all(run.iter().map(|(i, claim)| {
            run_body(
                store.get(),
                key(*i),
                claim.clone(),
                settings.lease,
                handler(&messages[*i]),
            )
        }))
        .await;

        let cap = output_cap(settings);
        let mut completions = Vec::new();
        let mut releases = Vec::new();
        let mut panic = None;
        for ((i, claim), (result, guard)) in run.iter().zip(results.into_iter().zip(&mut guards)) {
            let release = Release {
                key: key(*i),
                token: claim.token,
            };
            slots[*i] = Slot::Done(match result {
                Ok(Ok(value)) => {
                    let output = encode_output(&value, cap);
                    guard.completing(output.clone(), settings.ttl);
                    outputs.insert(*i, output);
                    completions.push((*i, claim.token));
                    Ok(value)
                }
                Ok(Err(e)) => {
                    releases.push(release);
                    record(Outcome::Failed, &*scope);
                    Err(e)
                }
                Err(p) => {
                    releases.push(release);
                    record(Outcome::Panicked, &*scope);
                    panic.get_or_insert(p);
                    Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    }
                    .into())
                }
            });
        }
        let completions: Vec<Completion<'_>> = completions
            .iter()
            .map(|&(i, token)| Completion {
                key: key(i),
                token,
                output: outputs[&i].as_deref(),
                ttl: settings.ttl,
            })
            .collect();
        if !completions.is_empty() {
            let r = store.get().complete_batch(&completions).await;
            // executed, or (the handler's value is returned all the same) fenced out or
            // not recorded
            for n in 0..completions.len() {
                let outcome = match &r {
                    Ok(fences) => match fences.get(n) {
                        Some(Fence::Held) => Outcome::Executed,
                        Some(Fence::Lost) => Outcome::LeaseLost,
                        None => Outcome::Unrecorded,
                    },
                    Err(_) => Outcome::Unrecorded,
                };
                record(outcome, &*scope);
            }
            settle(r, "completion");
        }
        if !releases.is_empty() {
            settle(store.get().release_batch(&releases).await, "release");
        }
        for g in &mut guards {
            g.disarm();
        }
        drop(guards);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Keys claimed elsewhere (with `on_in_progress = "wait"`, the single-message
    /// protocol waits), and repeats with another fingerprint, one by one.
    async fn run_deferred<'m, M, Fut>(&mut self, messages: &'m [M], handler: impl Fn(&'m M) -> Fut)
    where
        Fut: Future<Output = Result<T, E>>,
    {
        for (i, message) in messages.iter().enumerate() {
            if matches!(self.slots[i], Slot::Wait | Slot::Later) {
                let key = CallKey::Finished(self.keys[i].clone().expect("key"));
                let call = Call {
                    scope: (&self.scope).into(),
                    store: self.store.at(),
                    key,
                    fingerprint: self.fingerprints[i],
                };
                let r = execute(&self.settings, call, handler(message)).await;
                self.slots[i] = Slot::Done(r);
            }
        }
    }

    /// The results in the order of the messages; repeats inside the batch get their
    /// first message's output.
    fn results(self) -> Vec<Result<T, E>> {
        let (scope, outputs) = (&self.scope, &self.outputs);
        let not_done = || {
            Err(Error::InProgress {
                retry_after: Duration::ZERO,
            }
            .into())
        };
        self.slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Done(r) => r,
                Slot::SameAs(f) => match outputs.get(&f) {
                    Some(output) => {
                        let output = output.clone();
                        match decide::<T>(ClaimOutcome::Completed { output }) {
                            Decision::Done(done) => done.finish(scope),
                            _ => not_done(),
                        }
                    }
                    None => not_done(),
                },
                Slot::Open | Slot::Wait | Slot::Later => not_done(),
            })
            .collect()
    }
}

fn settle(r: Result<Vec<Fence>, StoreError>, what: &str) {
    match r {
        Ok(fences) => {
            let lost = fences.iter().filter(|f| **f == Fence::Lost).count();
            if lost > 0 {
                tracing::error!(
                    lost,
                    "batch {what} refused for {lost} keys: their leases expired and other executions took them over"
                );
            }
        }
        Err(e) => tracing::error!(
            error = %e,
            "batch {what} failed; the claims free when their leases expire"
        ),
    }
}
