//! Items used by the code `#[idempotent]` generates. Not public API: no stability
//! guarantees.

use crate::protocol::{self, Settings, StoreSource};
use crate::{Error, KeyPart, Store};
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

/// A handler's scope, worked out at its first call: a `static` of its own beside the
/// [`Config`], which stays immutable so the compiler can fold its settings. A `static`
/// in a generic fn is one for all its instantiations, so a method's scope is kept for
/// the first `Self` type seen; other types look theirs up in [`method_scope`].
#[derive(Debug)]
pub struct DefaultScope {
    path: std::sync::OnceLock<&'static str>,
    first_self: std::sync::OnceLock<(&'static str, &'static str)>,
}

impl DefaultScope {
    /// Not worked out yet.
    pub const fn new() -> Self {
        DefaultScope {
            path: std::sync::OnceLock::new(),
            first_self: std::sync::OnceLock::new(),
        }
    }

    /// The explicit scope, or the handler's path: the type name of a marker fn
    /// declared in the handler, which the attribute passes without its own name and
    /// the async body's `::{{closure}}` segment (`crate::module::Type::handler`).
    #[inline]
    pub fn get(
        &'static self,
        explicit: Option<&'static str>,
        path: fn() -> &'static str,
    ) -> &'static str {
        match explicit {
            Some(s) => s,
            None => self.path.get_or_init(path),
        }
    }

    /// As [`get`](Self::get), for a method: the default scope names `Self` (see
    /// [`method_scope`]).
    #[inline]
    pub fn get_for(
        &'static self,
        explicit: Option<&'static str>,
        path: fn() -> &'static str,
        self_ty: &'static str,
    ) -> &'static str {
        if let Some(s) = explicit {
            return s;
        }
        let &(first_ty, scope) = self
            .first_self
            .get_or_init(|| (self_ty, method_scope(self.get(None, path), self_ty)));
        if first_ty == self_ty {
            scope
        } else {
            method_scope(self.get(None, path), self_ty)
        }
    }
}

impl Default for DefaultScope {
    fn default() -> Self {
        Self::new()
    }
}

/// The default scope of a method with a `self` receiver, from its path and the type
/// name of `Self`. The path names `Self` already for a method of an inherent or trait
/// impl (`app::Orders::handle`, `<app::Orders as app::Handler>::handle`, and for a
/// generic type `app::Queue<_>::handle`: every instantiation of a generic impl is one
/// handler). For a trait's default method (`app::Handler::handle`) it does not, and the
/// scope becomes `app::Handler::handle for app::Orders`, so that two implementing
/// types never share records. Each pair is worked out once and kept for the life of
/// the process.
pub fn method_scope(path: &'static str, self_ty: &'static str) -> &'static str {
    type Interned = std::collections::HashMap<(&'static str, &'static str), &'static str>;
    static SCOPES: std::sync::Mutex<Option<Interned>> = std::sync::Mutex::new(None);
    let mut scopes = SCOPES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    scopes
        .get_or_insert_with(Interned::new)
        .entry((path, self_ty))
        .or_insert_with(|| {
            let erased = erase_type_args(self_ty);
            let inherent = path
                .strip_prefix(erased.as_str())
                .and_then(|rest| rest.strip_prefix("::"))
                .is_some_and(|name| !name.contains(':'));
            let trait_impl = path
                .strip_prefix('<')
                .and_then(|rest| rest.strip_prefix(erased.as_str()))
                .is_some_and(|rest| rest.starts_with(" as "));
            if inherent || trait_impl {
                path
            } else {
                Box::leak(format!("{path} for {erased}").into_boxed_str())
            }
        })
}

/// A type name with its generic arguments shown as in the path of a generic item:
/// `app::Queue<alloc::string::String, u8>` → `app::Queue<_, _>`.
fn erase_type_args(ty: &str) -> String {
    let mut out = String::with_capacity(ty.len());
    let mut depth = 0usize;
    for c in ty.chars() {
        match c {
            '<' => {
                if depth == 0 {
                    out.push_str("<_");
                }
                depth += 1;
            }
            '>' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push('>');
                }
            }
            ',' if depth == 1 => out.push_str(", _"),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
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

/// The wrapper the attribute emits around the handler's body.
#[inline]
pub fn execute<T, E, Fut>(
    config: &'static Config,
    key: KeyBuilder,
    scope: &'static str,
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
    protocol::run(
        &config.settings,
        scope.into(),
        key,
        fingerprint,
        store,
        body,
    )
}

// ---- transactional mode (`tx = "…"`) ----

pub use crate::protocol::tx::{DedupTransaction, TxCall, TxClaim, TxConfig, tx_conn};
pub use tracing::Instrument;

#[cfg(test)]
mod tests {
    use super::{erase_type_args, method_scope};

    #[test]
    fn type_arguments_are_erased_as_in_item_paths() {
        assert_eq!(erase_type_args("app::Orders"), "app::Orders");
        assert_eq!(erase_type_args("app::Queue<u8>"), "app::Queue<_>");
        assert_eq!(
            erase_type_args("app::Queue<alloc::vec::Vec<u8>, core::option::Option<(u8, u16)>>"),
            "app::Queue<_, _>"
        );
        assert_eq!(erase_type_args("&app::Orders"), "&app::Orders");
    }

    #[test]
    fn a_method_scope_names_self_once() {
        // the path names Self: kept as is
        assert_eq!(
            method_scope("app::Orders::handle", "app::Orders"),
            "app::Orders::handle"
        );
        assert_eq!(
            method_scope("app::Queue<_>::handle", "app::Queue<u8>"),
            "app::Queue<_>::handle"
        );
        assert_eq!(
            method_scope("<app::Queue<_> as app::H>::handle", "app::Queue<u8>"),
            "<app::Queue<_> as app::H>::handle"
        );
        // a trait's default method: Self added, the same string on every call
        let a = method_scope("app::H::handle", "app::Orders");
        assert_eq!(a, "app::H::handle for app::Orders");
        assert!(std::ptr::eq(
            a,
            method_scope("app::H::handle", "app::Orders")
        ));
        assert_eq!(
            method_scope("app::H::handle", "app::Queue<u8>"),
            "app::H::handle for app::Queue<_>"
        );
        // a method of another type's path (a nested module named like the type) is not
        // taken for the type's own
        assert_eq!(
            method_scope("app::Orders::inner::handle", "app::Orders"),
            "app::Orders::inner::handle for app::Orders"
        );
    }
}
