//! The transactional driver (`#[idempotent(tx = "…")]`): the claim and the completion
//! are written through the caller's SQL transaction, around the body, which uses the
//! same transaction in between; the caller's commit makes the business writes and the
//! dedup mark visible at once, and a rollback removes both.
//!
//! The driver knows transactions only through [`DedupTransaction`]; the SQL stores
//! implement it for `sqlx::Transaction` and keep their statements per table.

use super::claim::{CURRENT_CLAIM, Claim};
use super::decide::{Decision, Finished, decide};
use super::settings::{Settings, output_cap};
use super::telemetry::{Outcome, disabled, note_disabled, record, record_span};
use crate::error::{Error, StoreError, StoreErrorKind};
use crate::key::{KeyBuilder, RecordKey};
use crate::outbox::message::Outbox;
use crate::outbox::tx::OutboxTransaction;
use crate::output::encode_output;
use crate::store::{ClaimRequest, Completion, DedupTransaction, Fence};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

/// One transactional handler's configuration.
#[derive(Debug)]
pub struct TxConfig {
    /// Explicit `scope = "…"`, or `None` for the handler's default scope.
    pub scope: Option<&'static str>,
    /// How long a completed key is remembered.
    pub ttl: Duration,
    /// The dedup table.
    pub table: &'static str,
    /// The outbox table, when the handler has `outbox = "…"`.
    pub outbox_table: Option<&'static str>,
}

/// The transaction a [`TxCall`] writes in: the `tx = "…"` parameter, spanned at its
/// type so that a parameter that is not a transaction reports [`DedupTransaction`]
/// there.
#[inline]
pub fn tx_conn<X: DedupTransaction>(tx: &mut X) -> &mut dyn DedupTransaction {
    tx
}

/// A transaction the dedup row and the outbox rows are both written in.
pub trait OutboxTx: DedupTransaction + OutboxTransaction {}

impl<X: DedupTransaction + OutboxTransaction> OutboxTx for X {}

/// The transaction of a handler with `outbox = "…"`, spanned at the `tx` parameter's
/// type so that a transaction the outbox cannot be written in is reported there.
#[inline]
pub fn outbox_tx_conn<X: DedupTransaction + OutboxTransaction>(tx: &mut X) -> &mut dyn OutboxTx {
    tx
}

/// The `outbox = "…"` parameter, spanned at its type so that a parameter that is not
/// an `&mut Outbox` is reported there.
#[inline]
pub fn outbox_param(outbox: &mut Outbox) -> &mut Outbox {
    outbox
}

/// One message handled in transactional mode, before its claim.
///
/// The attribute emits three steps around the handler's body, which borrows the same
/// transaction in between (one runtime call taking the body as a closure of the
/// transaction would make the handler's future `Send` only for one lifetime, so a
/// spawned handler would not compile):
///
/// ```text
/// let (call, span) = TxCall::new(&CONFIG, scope, key, fingerprint);
/// async move {
///     let claim = match call.claim(tx_conn(&mut *tx)).await {
///         ControlFlow::Continue(claim) => claim,   // claimed: run the body
///         ControlFlow::Break(done) => return done, // replayed output or error
///     };
///     let ret = claim.scoped(async move { body }).await;
///     claim.finish(tx_conn(&mut *tx), ret).await  // completion in the same transaction
/// }.instrument(span).await
/// ```
#[derive(Debug)]
pub struct TxCall {
    config: &'static TxConfig,
    scope: &'static str,
    key: Result<RecordKey, Error>,
    fingerprint: Option<Result<[u8; 32], Error>>,
}

/// A transactional claim: the body runs, then [`finish`](Self::finish) records its
/// output in the same transaction.
#[derive(Debug)]
pub struct TxClaim {
    config: &'static TxConfig,
    scope: &'static str,
    /// The message's key; `None` when deduplication is disabled and the key could not
    /// be built.
    key: Option<RecordKey>,
    /// `None` when deduplication is disabled.
    claim: Option<Claim>,
}

impl TxCall {
    /// Binds `outbox` to the message's key and empties it, before the claim: a
    /// duplicate leaves it empty, and the body emits into it with ids of this key. (A
    /// key that could not be built is returned by [`claim`](Self::claim) before the
    /// body runs.)
    pub fn bind(&self, outbox: &mut Outbox) {
        match &self.key {
            Ok(key) => outbox.bind(key),
            Err(_) => outbox.clear(),
        }
    }

    /// Finishes the key under `scope` and opens the message's span. A `scope` refused by
    /// the default-scope guard is returned by [`claim`](Self::claim) as a key error is,
    /// before the transaction is used.
    pub fn new(
        config: &'static TxConfig,
        scope: Result<&'static str, Error>,
        key: KeyBuilder,
        fingerprint: Option<Result<[u8; 32], Error>>,
    ) -> (Self, tracing::Span) {
        let (scope, key) = match scope {
            Ok(scope) => (scope, key.finish(scope)),
            Err(e) => ("", Err(e)),
        };
        let span = tracing::info_span!(
            "idempotent",
            scope = %scope,
            attempt = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let call = TxCall {
            config,
            scope,
            key,
            fingerprint,
        };
        (call, span)
    }

    /// Claims the key in `tx`: `Continue` to run the body, `Break` with what the
    /// handler returns without running it (a replayed output or an error).
    pub async fn claim<T, E>(
        self,
        tx: &mut dyn DedupTransaction,
    ) -> ControlFlow<Result<T, E>, TxClaim>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
    {
        let (config, scope) = (self.config, self.scope);
        if disabled() {
            note_disabled();
            return ControlFlow::Continue(TxClaim {
                config,
                scope,
                key: self.key.ok(),
                claim: None,
            });
        }
        let prepared = self
            .key
            .and_then(|key| Ok((key, self.fingerprint.transpose()?)));
        let (key, fingerprint) = match prepared {
            Ok(p) => p,
            Err(e) => return ControlFlow::Break(Err(e.into())),
        };
        let req = ClaimRequest {
            key: &key,
            // the row lock is the claim; a claim committed without a completion (the
            // caller committed after a handler error) is claimable again at once
            lease: Duration::ZERO,
            ttl: config.ttl,
            fingerprint: fingerprint.as_ref().map(|f| &f[..]),
            max_attempts: None,
        };
        let outcome = match tx.claim_in_tx(config.table, &req).await {
            Ok(outcome) => outcome,
            Err(e) => {
                record(Outcome::StoreError, scope);
                return ControlFlow::Break(Err(Error::Store(e).into()));
            }
        };
        let done = match decide::<T>(outcome) {
            Decision::Run { token, attempt } => {
                record_span("attempt", attempt);
                let claim = Claim {
                    scope: Cow::Borrowed(scope),
                    token,
                    attempt,
                };
                return ControlFlow::Continue(TxClaim {
                    config,
                    scope,
                    key: Some(key),
                    claim: Some(claim),
                });
            }
            Decision::Done(done) => done,
            // a live claim of the same key by a store (not a transaction) in this table
            Decision::InProgress { retry_after } => Finished::in_progress(retry_after),
        };
        ControlFlow::Break(done.finish(scope))
    }
}

impl TxClaim {
    /// Runs the body with its claim visible to [`current_claim`](crate::current_claim).
    pub async fn scoped<F: Future>(&self, body: F) -> F::Output {
        match &self.claim {
            Some(claim) => CURRENT_CLAIM.scope(claim.clone(), body).await,
            None => body.await,
        }
    }

    /// [`finish`](Self::finish) for a handler with an outbox: on success, the messages
    /// the body emitted are written in `tx` (one statement) before the completion; on
    /// error, they are dropped and nothing is written.
    pub async fn finish_with_outbox<T, E>(
        self,
        tx: &mut dyn OutboxTx,
        outbox: &mut Outbox,
        result: Result<T, E>,
    ) -> Result<T, E>
    where
        T: Serialize,
        E: From<Error>,
    {
        if result.is_err() {
            outbox.clear();
        } else if let Err(e) = self.enqueue(tx, outbox).await {
            outbox.clear();
            return Err(e.into());
        }
        self.finish(tx, result).await
    }

    /// Writes the outbox's messages in `tx`, or the error that stops the handler.
    async fn enqueue(&self, tx: &mut dyn OutboxTx, outbox: &Outbox) -> Result<(), Error> {
        let table = self
            .config
            .outbox_table
            .unwrap_or(crate::outbox::tx::DEFAULT_OUTBOX_TABLE);
        let written = match outbox.check() {
            Err(e) => Err(e),
            Ok(()) if outbox.is_empty() => return Ok(()),
            Ok(()) => tx.enqueue_in_tx(table, outbox).await.map_err(Error::Store),
        };
        written.inspect_err(|e| {
            let outcome = match e {
                Error::Store(_) => Outcome::StoreError,
                _ => Outcome::Failed,
            };
            record(outcome, self.scope);
        })
    }

    /// After the body: on success, marks the key Completed with the output in `tx`
    /// (the caller's commit makes both visible at once); on error, returns it and
    /// writes nothing (the caller's rollback removes the claim).
    pub async fn finish<T, E>(
        self,
        tx: &mut dyn DedupTransaction,
        result: Result<T, E>,
    ) -> Result<T, E>
    where
        T: Serialize,
        E: From<Error>,
    {
        let (Some(key), Some(claim)) = (self.key, self.claim) else {
            return result;
        };
        let scope = self.scope;
        let value = match result {
            Ok(value) => value,
            Err(e) => {
                record(Outcome::Failed, scope);
                return Err(e);
            }
        };
        let output = encode_output(&value, output_cap(&Settings::DEFAULT));
        let completion = Completion {
            key: &key,
            token: claim.token,
            output: output.as_deref(),
            ttl: self.config.ttl,
        };
        match tx.complete_in_tx(self.config.table, &completion).await {
            Ok(Fence::Held) => {
                record(Outcome::Executed, scope);
                Ok(value)
            }
            Ok(Fence::Lost) => {
                record(Outcome::StoreError, scope);
                Err(Error::Store(StoreError::new(
                    StoreErrorKind::Other,
                    "the dedup row claimed in this transaction was deleted or expired before \
                     its completion; roll the transaction back",
                ))
                .into())
            }
            Err(e) => {
                record(Outcome::StoreError, scope);
                Err(Error::Store(e).into())
            }
        }
    }
}
