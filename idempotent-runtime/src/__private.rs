//! Items used by the code `#[idempotent]` generates. Not public API: no stability
//! guarantees.

use crate::error::Error;
use crate::key::KeyPart;
use crate::protocol::{self, Settings, StoreSource};
use crate::store::Store;
use futures_util::future::{Either, ready};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;

pub use crate::protocol::{OnInProgress, OnStoreError};
pub use crate::store::Store as StoreTrait;
pub use core;
pub use std::time::Duration;

/// One handler's configuration, built by the attribute as a `static`.
#[derive(Debug)]
pub struct Config {
    /// Explicit `scope = "…"`, or `None` for the default scope ([`DefaultScope`]).
    pub scope: Option<&'static str>,
    /// The protocol settings.
    pub settings: Settings,
}

pub use crate::key::KeyBuilder;
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

pub use crate::protocol::tx::{
    OutboxTx, TxCall, TxClaim, TxConfig, outbox_param, outbox_tx_conn, tx_conn,
};
pub use crate::store::DedupTransaction;
pub use tracing::Instrument;
