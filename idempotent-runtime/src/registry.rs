//! Stores registered by name, for `store = "name"`.

use crate::store::Store;
use crate::stores::memory::MemoryStore;
use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

/// The name of the store a handler uses when it names none.
pub(crate) const DEFAULT_STORE: &str = idempotent_shared::DEFAULT_STORE;

type Registry = RwLock<HashMap<Box<str>, &'static dyn Store>>;

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let memory: &'static dyn Store = Box::leak(Box::new(MemoryStore::new()));
    let mut map = HashMap::new();
    map.insert(Box::from(DEFAULT_STORE), memory);
    RwLock::new(map)
});

/// Registers `store` under `name`, for handlers declared with `store = "name"`.
///
/// Call it at start-up, before the first message; the name is looked up on each call,
/// so a handler whose store is not registered yet fails with
/// [`Error::UnknownStore`](crate::Error::UnknownStore) (nothing runs). Registering a
/// name again replaces the store for later calls. `"memory"` is registered from the
/// start with a process-wide [`MemoryStore`]; registering `"memory"` replaces it.
///
/// Stores live for the rest of the process. To keep a handle of your own, register a
/// clone (`RedisStore` is a cheap handle) or an `Arc` of the store.
///
/// ```
/// use idempotent_runtime::{register_store, MemoryStore};
/// use std::sync::Arc;
///
/// let orders = Arc::new(MemoryStore::new());
/// register_store("orders", orders.clone());
/// ```
pub fn register_store<S: Store + 'static>(name: &str, store: S) {
    let store: &'static dyn Store = Box::leak(Box::new(store));
    REGISTRY
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(Box::from(name), store);
}

/// The store registered under `name`, if any.
pub fn registered_store(name: &str) -> Option<&'static dyn Store> {
    REGISTRY
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .copied()
}
