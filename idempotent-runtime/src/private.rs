//! Items used by the code `#[idempotent]` generates. Not public API: no stability
//! guarantees.

use crate::protocol::{self, Settings, StoreHandle};
use crate::{Error, KeyPart, Store, registered_store};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::future::Future;

pub use crate::protocol::{OnInProgress, OnStoreError};
pub use crate::store::Store as StoreTrait;
pub use core;
pub use std::time::Duration;

/// One handler's configuration, built by the attribute as a `static`.
#[derive(Debug)]
pub struct Config {
    /// Explicit `scope = "…"`, or `None` for the handler's path.
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

/// The default scope from the type name of a marker fn declared inside the handler:
/// `crate::module::Type::handler::{{closure}}::__idempotent_scope` →
/// `crate::module::Type::handler` (the attribute passes it already stripped).
#[inline]
pub fn default_scope(marker: &'static str) -> &'static str {
    let s = marker
        .strip_suffix("::__idempotent_scope")
        .unwrap_or(marker);
    s.strip_suffix("::{{closure}}").unwrap_or(s)
}

/// The wrapper the attribute emits around the handler's body.
#[inline]
pub async fn execute<T, E, Fut>(
    config: &'static Config,
    marker: &'static str,
    store: StoreArg,
    key: KeyBuilder,
    fingerprint: Option<Result<[u8; 32], Error>>,
    body: Fut,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    if protocol::disabled() {
        protocol::note_disabled();
        return body.await;
    }
    let scope = config.scope.unwrap_or_else(|| default_scope(marker));
    let key = key.finish(scope)?;
    let fingerprint = match fingerprint {
        None => None,
        Some(r) => Some(r?),
    };
    let store = match store {
        StoreArg::Typed(s) => StoreHandle::Static(s),
        StoreArg::Named(name) => match registered_store(name) {
            Some(s) => StoreHandle::Static(s),
            None => {
                return Err(Error::UnknownStore {
                    name: name.to_owned(),
                }
                .into());
            }
        },
    };
    let call = protocol::Call {
        scope: Cow::Borrowed(scope),
        store,
        key,
        fingerprint,
    };
    protocol::execute(&config.settings, call, body).await
}
