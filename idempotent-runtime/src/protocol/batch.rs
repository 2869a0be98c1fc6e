//! The batch form of the protocol: one round trip to claim a whole batch, one to
//! complete it and one to release its failures, for consumers that receive messages in
//! lists (RocketMQ and Kafka listeners, SQS `ReceiveMessage`, NATS fetch).

use super::decide::{Decision, Finished, decide};
use super::{
    self as protocol, CancelGuard, Claim, OnInProgress, OnStoreError, Outcome, output_cap, record,
    run_body,
};
use crate::output::encode_output;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Release};
use crate::{Error, Idempotency, KeyPart, RecordKey, StoreError};
use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
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

impl Idempotency {
    /// Runs `handler` once per distinct key of a batch of messages, in three round
    /// trips to the store however large the batch: one claim for every key, then,
    /// after the handlers ran (concurrently), one completion for the successes and
    /// one release for the failures.
    ///
    /// The results come back in the order of `messages`, each as
    /// [`run`](Self::run) would have returned it: the handler's output, a cached
    /// output for a key completed before, or an [`Error`]. A key that appears twice in
    /// the batch runs once; the later copies get the first one's output (or
    /// [`Error::InProgress`] if it failed, so they are redelivered and retried).
    ///
    /// If a handler panics, every claim of the batch is settled first, then the panic
    /// resumes. If the returned future is dropped, the claims of the handlers that did
    /// not finish are released.
    ///
    /// ```
    /// use idempotent_runtime::{Error, Idempotency};
    ///
    /// struct Msg { id: String, amount: u64 }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let ledger = Idempotency::new("ledger");
    /// let batch = vec![
    ///     Msg { id: "a".into(), amount: 1 },
    ///     Msg { id: "b".into(), amount: 2 },
    ///     Msg { id: "a".into(), amount: 1 }, // a send retry inside the same batch
    /// ];
    /// let results: Vec<Result<u64, Error>> = ledger
    ///     .run_batch(&batch, |m| m.id.clone(), |m| async move { Ok(m.amount * 100) })
    ///     .await;
    /// let amounts: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    /// assert_eq!(amounts, [100, 200, 100]);
    /// # });
    /// ```
    pub async fn run_batch<'m, M, K, T, E, KF, HF, Fut>(
        &self,
        messages: &'m [M],
        key_of: KF,
        handler: HF,
    ) -> Vec<Result<T, E>>
    where
        K: KeyPart,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        KF: Fn(&'m M) -> K,
        HF: Fn(&'m M) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_batch_inner(messages, key_of, None, handler).await
    }

    /// Like [`run_batch`](Self::run_batch), with a fingerprint per message, as
    /// [`run_with_fingerprint`](Self::run_with_fingerprint) takes for one: a message
    /// whose key was claimed before with a different fingerprint (by an earlier batch,
    /// or by an earlier message of the same batch) gets [`Error::FingerprintMismatch`]
    /// instead of a cached output, and its handler does not run.
    ///
    /// ```
    /// use idempotent_runtime::{Error, Idempotency};
    ///
    /// struct Msg { id: &'static str, amount: u64 }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let ledger = Idempotency::new("ledger-fp");
    /// let batch = [Msg { id: "a", amount: 1 }, Msg { id: "a", amount: 2 }];
    /// let results: Vec<Result<u64, Error>> = ledger
    ///     .run_batch_with_fingerprint(&batch, |m| m.id, |m| m.amount, |m| async move { Ok(m.amount) })
    ///     .await;
    /// assert_eq!(*results[0].as_ref().unwrap(), 1);
    /// assert!(matches!(results[1], Err(Error::FingerprintMismatch)));
    /// # });
    /// ```
    pub async fn run_batch_with_fingerprint<'m, M, K, F, T, E, KF, FF, HF, Fut>(
        &self,
        messages: &'m [M],
        key_of: KF,
        fingerprint_of: FF,
        handler: HF,
    ) -> Vec<Result<T, E>>
    where
        K: KeyPart,
        F: Serialize,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        KF: Fn(&'m M) -> K,
        FF: Fn(&'m M) -> F,
        HF: Fn(&'m M) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let fingerprint_of = |m: &'m M| crate::fingerprint::fingerprint(&fingerprint_of(m));
        self.run_batch_inner(messages, key_of, Some(&fingerprint_of), handler)
            .await
    }

    #[allow(clippy::type_complexity)]
    async fn run_batch_inner<'m, M, K, T, E, KF, HF, Fut>(
        &self,
        messages: &'m [M],
        key_of: KF,
        fingerprint_of: Option<&dyn Fn(&'m M) -> Result<[u8; 32], Error>>,
        handler: HF,
    ) -> Vec<Result<T, E>>
    where
        K: KeyPart,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        KF: Fn(&'m M) -> K,
        HF: Fn(&'m M) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if protocol::disabled() {
            protocol::note_disabled();
            return join_all(messages.iter().map(&handler)).await;
        }
        let store = match self.resolve_store() {
            Ok(s) => s,
            Err(e) => {
                let name = match e {
                    Error::UnknownStore { name } => name,
                    _ => String::new(),
                };
                return messages
                    .iter()
                    .map(|_| Err(Error::UnknownStore { name: name.clone() }.into()))
                    .collect();
            }
        };
        let settings = *self.settings();
        if let Err(Error::InvalidSettings { reason }) = settings.check() {
            return messages
                .iter()
                .map(|_| {
                    Err(Error::InvalidSettings {
                        reason: reason.clone(),
                    }
                    .into())
                })
                .collect();
        }
        let scope = self.scope_cow().clone();

        // keys and fingerprints, with repeats inside the batch folded onto their first
        // message (a repeat with another fingerprint runs alone after the batch)
        let mut slots: Vec<Slot<T, E>> = Vec::with_capacity(messages.len());
        let mut keys: Vec<Option<RecordKey>> = Vec::with_capacity(messages.len());
        let mut fingerprints: Vec<Option<[u8; 32]>> = Vec::with_capacity(messages.len());
        let mut first: HashMap<RecordKey, usize> = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            let key = RecordKey::new(&scope, &key_of(m));
            let fingerprint = fingerprint_of.map(|f| f(m)).transpose();
            let (key, fingerprint) = match (key, fingerprint) {
                (Ok(k), Ok(f)) => (k, f),
                (Err(e), _) | (_, Err(e)) => {
                    slots.push(Slot::Done(Err(e.into())));
                    keys.push(None);
                    fingerprints.push(None);
                    continue;
                }
            };
            match first.get(&key) {
                // the same key with another fingerprint: decided by the store after the
                // batch, against the record the first message leaves
                Some(&f) if fingerprints[f] != fingerprint => {
                    slots.push(Slot::Later);
                    keys.push(Some(key));
                }
                Some(&f) => {
                    slots.push(Slot::SameAs(f));
                    keys.push(None);
                }
                None => {
                    first.insert(key.clone(), i);
                    slots.push(Slot::Open);
                    keys.push(Some(key));
                }
            }
            fingerprints.push(fingerprint);
        }
        drop(first);

        // one round trip: claim every distinct key
        let claimed: Vec<usize> = (0..messages.len())
            .filter(|&i| matches!(slots[i], Slot::Open))
            .collect();
        let reqs: Vec<ClaimRequest<'_>> = claimed
            .iter()
            .map(|&i| ClaimRequest {
                key: keys[i].as_ref().expect("claimed keys exist"),
                lease: settings.lease,
                ttl: settings.ttl,
                fingerprint: fingerprints[i].as_ref().map(|f| &f[..]),
                max_attempts: settings.max_attempts,
            })
            .collect();
        let outcomes = if reqs.is_empty() {
            Ok(Vec::new())
        } else {
            store.get().claim_batch(&reqs).await
        };
        drop(reqs);
        let outcomes = match outcomes {
            Ok(o) if o.len() == claimed.len() => o,
            Ok(o) => {
                let e = StoreError::new(
                    crate::StoreErrorKind::Corrupt,
                    format!(
                        "the store answered {} outcomes for a batch of {} claims",
                        o.len(),
                        claimed.len()
                    ),
                );
                self.fail_all(&claimed, &mut slots, e);
                Vec::new()
            }
            Err(e) => {
                if settings.on_store_error == OnStoreError::Process {
                    tracing::warn!(error = %e, "store unavailable; running the batch without deduplication (on_store_error = \"process\")");
                    record(Outcome::Unprotected, &scope);
                    return join_all(messages.iter().map(&handler)).await;
                }
                self.fail_all(&claimed, &mut slots, e);
                Vec::new()
            }
        };

        // the output bytes of each decided message, for its repeats in the batch
        let mut outputs: HashMap<usize, Option<Vec<u8>>> = HashMap::new();
        let mut run: Vec<(usize, Claim)> = Vec::new();
        for (&i, outcome) in claimed.iter().zip(outcomes) {
            if let ClaimOutcome::Completed { output } = &outcome {
                outputs.insert(i, output.clone());
            }
            let done = match decide::<T>(outcome) {
                Decision::Run { token, attempt } => {
                    let scope = scope.clone();
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
                Decision::InProgress { .. } if settings.on_in_progress == OnInProgress::Wait => {
                    slots[i] = Slot::Wait;
                    continue;
                }
                Decision::InProgress { retry_after } => Finished::in_progress(retry_after),
                Decision::Done(done) => done,
            };
            slots[i] = Slot::Done(done.finish(&scope));
        }

        // run the claimed handlers concurrently; a drop releases the unfinished ones
        let mut guards: Vec<CancelGuard<'_>> = run
            .iter()
            .map(|(i, c)| {
                CancelGuard::new(
                    store.at(),
                    keys[*i].as_ref().expect("key"),
                    (&scope).into(),
                    c.token,
                )
            })
            .collect();
        let results = join_all(run.iter().map(|(i, claim)| {
            run_body(
                store.get(),
                keys[*i].as_ref().expect("key"),
                claim.clone(),
                settings.lease,
                handler(&messages[*i]),
            )
        }))
        .await;

        // one round trip for the successes, one for the failures
        let cap = output_cap(&settings);
        let mut completions = Vec::new();
        let mut releases = Vec::new();
        let mut panic = None;
        for ((i, claim), (result, guard)) in run.iter().zip(results.into_iter().zip(&mut guards)) {
            let key = keys[*i].as_ref().expect("key");
            match result {
                Ok(Ok(value)) => {
                    let output = encode_output(&value, cap);
                    guard.completing(output.clone(), settings.ttl);
                    outputs.insert(*i, output);
                    completions.push(*i);
                    slots[*i] = Slot::Done(Ok(value));
                }
                Ok(Err(e)) => {
                    releases.push(Release {
                        key,
                        token: claim.token,
                    });
                    record(Outcome::Failed, &scope);
                    slots[*i] = Slot::Done(Err(e));
                }
                Err(p) => {
                    releases.push(Release {
                        key,
                        token: claim.token,
                    });
                    record(Outcome::Panicked, &scope);
                    slots[*i] = Slot::Done(Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    }
                    .into()));
                    panic.get_or_insert(p);
                }
            }
        }
        let tokens: HashMap<usize, _> = run.iter().map(|(i, c)| (*i, c.token)).collect();
        let completion_items: Vec<Completion<'_>> = completions
            .iter()
            .map(|i| Completion {
                key: keys[*i].as_ref().expect("key"),
                token: tokens[i],
                output: outputs[i].as_deref(),
                ttl: settings.ttl,
            })
            .collect();
        if !completion_items.is_empty() {
            let r = store.get().complete_batch(&completion_items).await;
            // executed, or (the handler's value is returned all the same) fenced out or
            // not recorded
            for n in 0..completion_items.len() {
                let outcome = match &r {
                    Ok(fences) => match fences.get(n) {
                        Some(Fence::Held) => Outcome::Executed,
                        Some(Fence::Lost) => Outcome::LeaseLost,
                        None => Outcome::Unrecorded,
                    },
                    Err(_) => Outcome::Unrecorded,
                };
                record(outcome, &scope);
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

        // keys claimed elsewhere (with on_in_progress = wait: the single-key protocol
        // waits), and repeats with another fingerprint
        for i in 0..messages.len() {
            if matches!(slots[i], Slot::Wait | Slot::Later) {
                let key = protocol::CallKey::Finished(keys[i].clone().expect("key"));
                let call = protocol::Call {
                    scope: (&scope).into(),
                    store: store.at(),
                    key,
                    fingerprint: fingerprints[i],
                };
                let r = protocol::execute(&settings, call, handler(&messages[i])).await;
                slots[i] = Slot::Done(r);
            }
        }

        // repeats inside the batch get their first message's output
        let mut out = Vec::with_capacity(messages.len());
        for slot in slots.into_iter() {
            out.push(match slot {
                Slot::Done(r) => r,
                Slot::SameAs(f) => match outputs.get(&f) {
                    Some(output) => {
                        let output = output.clone();
                        match decide::<T>(ClaimOutcome::Completed { output }) {
                            Decision::Done(done) => done.finish(&scope),
                            _ => Err(Error::InProgress {
                                retry_after: Duration::ZERO,
                            }
                            .into()),
                        }
                    }
                    None => Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    }
                    .into()),
                },
                Slot::Open | Slot::Wait | Slot::Later => Err(Error::InProgress {
                    retry_after: Duration::ZERO,
                }
                .into()),
            });
        }
        out
    }

    fn fail_all<T, E: From<Error>>(
        &self,
        claimed: &[usize],
        slots: &mut [Slot<T, E>],
        e: StoreError,
    ) {
        record(Outcome::StoreError, self.scope_cow());
        let e = Arc::new(e);
        for &i in claimed {
            slots[i] = Slot::Done(Err(shared_store_error(&e).into()));
        }
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
