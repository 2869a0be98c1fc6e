//! Items used by the code `#[idempotent]` generates. Not public API: no stability
//! guarantees.

use crate::protocol::{self, Settings, StoreSource};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Token};
use crate::{Error, KeyPart, RecordKey, Store, StoreError, StoreErrorKind};
use futures_util::future::{Either, ready};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::future::Future;
use std::ops::ControlFlow;

pub use crate::protocol::{OnInProgress, OnStoreError};
pub use crate::store::Store as StoreTrait;
pub use core;
pub use std::time::Duration;
pub use tracing::Instrument;

/// One handler's configuration, built by the attribute as a `static`.
#[derive(Debug)]
pub struct Config {
    /// Explicit `scope = "…"`, or `None` for the default scope ([`DefaultScope`]).
    pub scope: Option<&'static str>,
    /// The protocol settings.
    pub settings: Settings,
}

impl Config {
    /// A configuration with the default settings; the attribute replaces fields.
    pub const fn new(scope: Option<&'static str>) -> Self {
        Config {
            scope,
            settings: Settings::DEFAULT,
        }
    }
}

pub use crate::KeyBuilder;
pub use crate::protocol::Settings as ConfigSettings;
pub use crate::scope::DefaultScope;

/// Where the handler's store comes from.
#[derive(Debug, Clone, Copy)]
pub enum StoreArg {
    /// `store = "name"`: looked up in the registry on each call.
    Named(&'static str),
    /// `store = PATH`: evaluated on each call.
    Typed(&'static dyn Store),
}

/// Appends one key part; spanned at the key expression so a type that is not a key
/// reports `KeyPart` there.
#[inline]
pub fn key_part<K: KeyPart + ?Sized>(builder: &mut KeyBuilder, part: &K) {
    part.write_key(builder)
}

/// The fingerprint of the declared expression.
#[inline]
pub fn fingerprint<F: Serialize + ?Sized>(value: &F) -> Result<[u8; 32], Error> {
    crate::fingerprint::fingerprint(value)
}

/// The wrapper the attribute emits around the handler's body. A `scope` refused by the
/// default-scope guard ([`DefaultScope`]) is the handler's error, before anything is
/// claimed or run, unless deduplication is disabled (no record is written then).
#[inline]
pub fn execute<T, E, Fut>(
    config: &'static Config,
    key: KeyBuilder,
    scope: Result<&'static str, Error>,
    store: StoreArg,
    fingerprint: Option<Result<[u8; 32], Error>>,
    body: Fut,
) -> impl Future<Output = Result<T, E>>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    let store = match store {
        StoreArg::Typed(s) => StoreSource::Static(s),
        StoreArg::Named(name) => StoreSource::Named(name),
    };
    let scope = match scope {
        Ok(scope) => scope,
        Err(e) if !protocol::disabled() => return Either::Right(ready(Err(e.into()))),
        Err(_) => "",
    };
    Either::Left(protocol::run(
        &config.settings,
        scope.into(),
        key,
        fingerprint,
        store,
        body,
    ))
}

// ---- transactional mode (`tx = "…"`) ----

/// One tx-mode handler's configuration, built by the attribute as a `static`.
#[derive(Debug)]
pub struct TxConfig {
    /// Explicit `scope = "…"`, or `None` for the default scope ([`DefaultScope`]).
    pub scope: Option<&'static str>,
    /// How long a completed key is remembered.
    pub ttl: Duration,
    /// The dedup table.
    pub table: TxTable,
}

/// The dedup table of a tx-mode handler, with its statements for each database,
/// built on first use.
pub struct TxTable {
    name: &'static str,
    #[cfg(feature = "mysql")]
    pub(crate) mysql: crate::sql::tx::Prepared<crate::sql::tx::MySqlTx>,
    #[cfg(feature = "postgres")]
    pub(crate) postgres: crate::sql::tx::Prepared<crate::sql::tx::PostgresTx>,
    #[cfg(feature = "sqlite")]
    pub(crate) sqlite: crate::sql::tx::Prepared<crate::sql::tx::SqliteTx>,
}

impl TxTable {
    /// The table `name` (validated by the attribute; checked again on first use).
    pub const fn new(name: &'static str) -> Self {
        TxTable {
            name,
            #[cfg(feature = "mysql")]
            mysql: std::sync::OnceLock::new(),
            #[cfg(feature = "postgres")]
            postgres: std::sync::OnceLock::new(),
            #[cfg(feature = "sqlite")]
            sqlite: std::sync::OnceLock::new(),
        }
    }

    /// The table name as given.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for TxTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TxTable").field(&self.name).finish()
    }
}

/// The boxed future of a [`DedupTransaction`] step.
pub type TxFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A SQL transaction the dedup row of `#[idempotent(tx = "…")]` can be written in:
/// `sqlx::Transaction<'_, MySql>`, `<'_, Postgres>` and `<'_, Sqlite>`, with the
/// runtime's `mysql`, `postgres` and `sqlite` features.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a SQL transaction the dedup record can be written in",
    label = "`tx = …` names this parameter",
    note = "`tx = \"PARAM\"` takes a parameter of type `&mut sqlx::Transaction<'_, DB>` that the caller begins and commits, \
            for `DB` = `MySql`, `Postgres` or `Sqlite` (use the driver re-exported as `idempotent_runtime::sqlx`)",
    note = "enable the matching feature of `idempotent-runtime`: `mysql`, `postgres` or `sqlite`"
)]
pub trait DedupTransaction: Send {
    /// Claims the key inside the transaction; see [`ClaimOutcome`]. An acquired claim
    /// holds the row's lock until the transaction ends.
    fn claim_in_tx<'a>(
        &'a mut self,
        table: &'a TxTable,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome>;

    /// Marks the claimed key Completed with its output, in the same transaction.
    fn complete_in_tx<'a>(
        &'a mut self,
        table: &'a TxTable,
        completion: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence>;
}

/// The `tx = "…"` parameter as the transaction the dedup row is written in; spanned
/// at the parameter so a parameter of another type reports [`DedupTransaction`] there.
#[inline]
pub fn tx_conn<X: DedupTransaction>(tx: &mut X) -> &mut dyn DedupTransaction {
    tx
}

/// One message handled in tx mode: the key and fingerprint, before the claim.
#[derive(Debug)]
pub struct TxCall {
    config: &'static TxConfig,
    scope: &'static str,
    key: Result<RecordKey, Error>,
    fingerprint: Option<Result<[u8; 32], Error>>,
}

/// A tx-mode claim: the body runs, then [`finish`](Self::finish) records its output in
/// the same transaction.
#[derive(Debug)]
pub struct TxClaim {
    config: &'static TxConfig,
    scope: &'static str,
    /// `None` when deduplication is disabled.
    claimed: Option<(RecordKey, Token)>,
    /// What [`current_claim`](crate::current_claim) shows the body.
    claim: Option<protocol::Claim>,
}

impl TxCall {
    /// Finishes the key under `scope` and opens the message's span. A `scope` refused by
    /// the default-scope guard ([`DefaultScope`]) is returned by [`claim`](Self::claim)
    /// as a key error is, before the transaction is used.
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
        T: DeserializeOwned,
        E: From<Error>,
    {
        let config = self.config;
        if protocol::disabled() {
            protocol::note_disabled();
            return ControlFlow::Continue(TxClaim {
                config,
                scope: self.scope,
                claimed: None,
                claim: None,
            });
        }
        let key = match self.key {
            Ok(k) => k,
            Err(e) => return ControlFlow::Break(Err(e.into())),
        };
        let fingerprint = match self.fingerprint {
            None => None,
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => return ControlFlow::Break(Err(e.into())),
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
        let outcome = match tx.claim_in_tx(&config.table, &req).await {
            Ok(o) => o,
            Err(e) => {
                protocol::record(protocol::Outcome::StoreError, self.scope);
                return ControlFlow::Break(Err(Error::Store(e).into()));
            }
        };
        let (outcome, result) = match outcome {
            ClaimOutcome::Acquired { token, attempt } => {
                tracing::Span::current().record("attempt", attempt);
                return ControlFlow::Continue(TxClaim {
                    config,
                    scope: self.scope,
                    claimed: Some((key, token)),
                    claim: Some(protocol::Claim {
                        scope: Cow::Borrowed(self.scope),
                        token,
                        attempt,
                    }),
                });
            }
            ClaimOutcome::Completed { output } => match protocol::decode_output(output) {
                Ok(t) => (protocol::Outcome::Replayed, Ok(t)),
                Err(e) => (protocol::Outcome::NotReplayable, Err(e)),
            },
            // a live claim of the same key by a store (not a transaction) in this table
            ClaimOutcome::InProgress { retry_after } => (
                protocol::Outcome::InProgress,
                Err(Error::InProgress { retry_after }),
            ),
            ClaimOutcome::Exhausted { attempts } => (
                protocol::Outcome::Exhausted,
                Err(Error::AttemptsExhausted { attempts }),
            ),
            ClaimOutcome::FingerprintMismatch => (
                protocol::Outcome::FingerprintMismatch,
                Err(Error::FingerprintMismatch),
            ),
        };
        protocol::record(outcome, self.scope);
        ControlFlow::Break(result.map_err(E::from))
    }
}

impl TxClaim {
    /// Runs the body with its claim visible to [`current_claim`](crate::current_claim).
    pub async fn scoped<F: Future>(&self, body: F) -> F::Output {
        protocol::with_claim(self.claim.clone(), body).await
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
        let Some((key, token)) = self.claimed else {
            return result;
        };
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                protocol::record(protocol::Outcome::Failed, self.scope);
                return Err(e);
            }
        };
        let output = protocol::encode_output(&value, protocol::output_cap(&Settings::DEFAULT));
        let completion = Completion {
            key: &key,
            token,
            output: output.as_deref(),
            ttl: self.config.ttl,
        };
        match tx.complete_in_tx(&self.config.table, &completion).await {
            Ok(Fence::Held) => {
                protocol::record(protocol::Outcome::Executed, self.scope);
                Ok(value)
            }
            Ok(Fence::Lost) => {
                protocol::record(protocol::Outcome::StoreError, self.scope);
                Err(Error::Store(StoreError::new(
                    StoreErrorKind::Other,
                    "the dedup row claimed in this transaction was deleted or expired before \
                     its completion; roll the transaction back",
                ))
                .into())
            }
            Err(e) => {
                protocol::record(protocol::Outcome::StoreError, self.scope);
                Err(Error::Store(e).into())
            }
        }
    }
}
