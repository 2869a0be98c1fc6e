//! Where a message's store and scope come from.

use crate::error::Error;
use crate::registry::registered_store;
use crate::store::Store;
use std::borrow::Cow;
use std::sync::Arc;

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

    pub(crate) fn to_handle(self) -> StoreHandle {
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

    pub(crate) fn to_cow(self) -> Cow<'static, str> {
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
