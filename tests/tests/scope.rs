//! The default scope: `concat!(module_path!(), "::", fn name)` for every kind of handler,
//! pinned string by string because it is stored in every record key; and the guard that
//! refuses a second handler with the same default scope before anything is claimed.
//!
//! This file is the crate `scope`, so `module_path!()` at its root is `scope`. Each test
//! uses handlers of its own: the guard is process-wide, and tests run in parallel.

#![deny(warnings, clippy::all, clippy::pedantic)]

use idempotent_runtime::store::RecordState;
use idempotent_runtime::{
    Error, KeyPart, MemoryStore, RecordKey, Store, current_claim, idempotent,
};
use std::sync::LazyLock;
use std::sync::atomic::Ordering;

static STORE: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

struct Msg {
    id: String,
}

fn msg(id: &str) -> Msg {
    Msg { id: id.into() }
}

/// The scope the running body was claimed under.
fn claimed_scope() -> String {
    current_claim()
        .expect("runs under a claim")
        .scope
        .into_owned()
}

/// The state of the record `(scope, id)` in [`STORE`], if there is one.
async fn record(scope: &str, id: &str) -> Option<RecordState> {
    let key = RecordKey::new(scope, id).expect("key");
    STORE.inspect(&key).await.expect("inspect").map(|r| r.state)
}

/// The reason of an `InvalidSettings`.
fn refused<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::InvalidSettings { reason }) => reason,
        other => panic!("expected InvalidSettings, got {other:?}"),
    }
}

// ---- the default scope of each kind of handler ----

#[idempotent(key = "msg.id", store = STORE)]
async fn free(msg: &Msg) -> Result<String, Error> {
    Ok(claimed_scope())
}

#[idempotent(key = "id", store = STORE)]
async fn generic_free<K: KeyPart + Sync>(id: &K) -> Result<String, Error> {
    Ok(claimed_scope())
}

/// A raw identifier: the scope has the name without `r#`.
#[idempotent(key = "msg.id", store = STORE)]
async fn r#match(msg: &Msg) -> Result<String, Error> {
    Ok(claimed_scope())
}

struct Orders;

impl Orders {
    #[idempotent(key = "msg.id", store = STORE)]
    async fn on_order(&self, msg: &Msg) -> Result<String, Error> {
        Ok(claimed_scope())
    }

    #[idempotent(key = "msg.id", store = STORE)]
    async fn associated(msg: &Msg) -> Result<String, Error> {
        Ok(claimed_scope())
    }
}

trait Notify {
    async fn notify(&self, msg: &Msg) -> Result<String, Error>;
}

impl Notify for Orders {
    #[idempotent(key = "msg.id", store = STORE)]
    async fn notify(&self, msg: &Msg) -> Result<String, Error> {
        Ok(claimed_scope())
    }
}

trait Audit {
    #[idempotent(key = "msg.id", store = STORE)]
    async fn audit(&self, msg: &Msg) -> Result<String, Error> {
        Ok(claimed_scope())
    }
}

impl Audit for Orders {}

struct Queue<T>(T);

impl<T: Sync> Queue<T> {
    #[idempotent(key = "msg.id", store = STORE)]
    async fn on_queued(&self, msg: &Msg) -> Result<String, Error> {
        Ok(claimed_scope())
    }
}

mod nested {
    pub(super) mod deeper {
        use super::super::{Error, Msg, STORE, claimed_scope, idempotent};

        #[idempotent(key = "msg.id", store = STORE)]
        pub(crate) async fn handle(msg: &Msg) -> Result<String, Error> {
            Ok(claimed_scope())
        }
    }
}

/// Every kind of handler is scoped by its module path and its fn name, nothing else:
/// these strings are in the keys of stored records, so they are pinned here.
#[tokio::test]
async fn the_default_scope_is_the_module_path_and_the_fn_name() {
    /// A fn declared in another fn's body: the module it is written in, not the
    /// enclosing fn.
    #[idempotent(key = "msg.id", store = STORE)]
    async fn declared_in_a_body(msg: &Msg) -> Result<String, Error> {
        Ok(claimed_scope())
    }

    let m = msg("pinned");
    assert_eq!(
        declared_in_a_body(&m).await.unwrap(),
        "scope::declared_in_a_body"
    );
    assert_eq!(free(&m).await.unwrap(), "scope::free");
    assert_eq!(
        generic_free(&"pinned").await.unwrap(),
        "scope::generic_free"
    );
    assert_eq!(r#match(&m).await.unwrap(), "scope::match");
    assert_eq!(Orders.on_order(&m).await.unwrap(), "scope::on_order");
    assert_eq!(Orders::associated(&m).await.unwrap(), "scope::associated");
    assert_eq!(Orders.notify(&m).await.unwrap(), "scope::notify");
    assert_eq!(Orders.audit(&m).await.unwrap(), "scope::audit");
    assert_eq!(Queue(1u8).on_queued(&m).await.unwrap(), "scope::on_queued");
    assert_eq!(
        nested::deeper::handle(&m).await.unwrap(),
        "scope::nested::deeper::handle"
    );
    // the records are stored under those scopes
    for scope in [
        "scope::free",
        "scope::generic_free",
        "scope::match",
        "scope::on_order",
        "scope::associated",
        "scope::notify",
        "scope::audit",
        "scope::on_queued",
        "scope::nested::deeper::handle",
        "scope::declared_in_a_body",
    ] {
        assert_eq!(
            record(scope, "pinned").await,
            Some(RecordState::Completed),
            "{scope}"
        );
    }
}

/// Another instantiation of a generic fn or a generic impl is the same handler: same
/// scope, no refusal, and a duplicate is replayed across instantiations.
#[tokio::test]
async fn the_instantiations_of_a_generic_handler_are_one_handler() {
    let m = msg("generic");
    assert_eq!(Queue(1u8).on_queued(&m).await.unwrap(), "scope::on_queued");
    assert_eq!(
        Queue(String::new()).on_queued(&m).await.unwrap(),
        "scope::on_queued"
    );
    assert_eq!(
        Queue(vec![1u64])
            .on_queued(&msg("generic-2"))
            .await
            .unwrap(),
        "scope::on_queued"
    );
    assert_eq!(generic_free(&7u64).await.unwrap(), "scope::generic_free");
    assert_eq!(generic_free(&"seven").await.unwrap(), "scope::generic_free");
}

// ---- the guard ----

mod clash {
    use super::{Error, Msg, STORE, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static A_RUNS: AtomicU32 = AtomicU32::new(0);
    pub(super) static B_RUNS: AtomicU32 = AtomicU32::new(0);
    pub(super) static BUILD_RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct A;
    pub(super) struct B;

    impl A {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<(), Error> {
            A_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn build(msg: &Msg) -> Result<(), Error> {
            BUILD_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl B {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<(), Error> {
            B_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn build(msg: &Msg) -> Result<(), Error> {
            BUILD_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Two types of one module with a `handle` method have the same default scope,
/// `scope::clash::handle`. The first one called keeps it; the other is refused at every
/// call, before its body runs and before anything is claimed, so no record is shared.
#[tokio::test]
async fn two_methods_with_one_default_scope_refuse_the_second() {
    use clash::{A, A_RUNS, B, B_RUNS};
    A.handle(&msg("clash-a")).await.unwrap();
    A.handle(&msg("clash-a")).await.unwrap();

    let why = refused(B.handle(&msg("clash-b")).await);
    assert!(why.contains("`scope::clash::handle`"), "{why}");
    assert!(why.contains("for `scope::clash::A`"), "{why}");
    assert!(why.contains("for `scope::clash::B`"), "{why}");
    assert!(why.contains("explicit `scope = \"…\"`"), "{why}");
    // a message A handled already is no duplicate for B: still refused
    refused(B.handle(&msg("clash-a")).await);
    // the owner goes on
    A.handle(&msg("clash-a2")).await.unwrap();

    assert_eq!(A_RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(B_RUNS.load(Ordering::SeqCst), 0);
    assert_eq!(
        record("scope::clash::handle", "clash-a").await,
        Some(RecordState::Completed)
    );
    assert_eq!(record("scope::clash::handle", "clash-b").await, None);
}

/// The same for associated fns without a receiver: the handlers' own statics tell
/// them apart.
#[tokio::test]
async fn two_associated_fns_with_one_default_scope_refuse_the_second() {
    use clash::{A, B, BUILD_RUNS};
    A::build(&msg("build-a")).await.unwrap();
    let why = refused(B::build(&msg("build-b")).await);
    assert!(why.contains("`scope::clash::build`"), "{why}");
    assert!(why.contains("`scope::clash::A::build`"), "{why}");
    assert!(why.contains("`scope::clash::B::build`"), "{why}");
    // A's run only
    assert_eq!(BUILD_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(record("scope::clash::build", "build-b").await, None);
}

mod default_method {
    use super::{Error, Msg, STORE, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) trait Consume {
        #[idempotent(key = "msg.id", store = STORE)]
        async fn consume(&self, msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    pub(super) struct Orders;
    pub(super) struct Payments;

    impl Consume for Orders {}
    impl Consume for Payments {}
}

/// A trait's default method is one fn for every implementor: called for a second
/// `Self` type it is refused, where it would otherwise share the first type's records.
#[tokio::test]
async fn a_trait_default_method_called_for_two_types_refuses_the_second() {
    use default_method::{Consume, Orders, Payments, RUNS};
    Orders.consume(&msg("default-1")).await.unwrap();
    let why = refused(Payments.consume(&msg("default-2")).await);
    assert!(why.contains("`scope::default_method::consume`"), "{why}");
    assert!(why.contains("for `scope::default_method::Orders`"), "{why}");
    assert!(
        why.contains("for `scope::default_method::Payments`"),
        "{why}"
    );
    assert!(why.contains("default method"), "{why}");
    Orders.consume(&msg("default-3")).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(
        record("scope::default_method::consume", "default-2").await,
        None
    );
}

mod explicit {
    use super::{Error, Msg, STORE, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct A;
    pub(super) struct B;

    impl A {
        #[idempotent(key = "msg.id", store = STORE, scope = "explicit-a")]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl B {
        #[idempotent(key = "msg.id", store = STORE, scope = "explicit-b")]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    pub(super) trait Shared {
        #[idempotent(key = "msg.id", store = STORE, scope = "explicit-shared")]
        async fn shared(&self, msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl Shared for A {}
    impl Shared for B {}
}

/// Explicit scopes do not go through the guard: two methods named alike keep their
/// own scopes, and a trait's default method with an explicit scope shares that scope,
/// and so its records, across implementors.
#[tokio::test]
async fn explicit_scopes_bypass_the_guard() {
    use explicit::{A, B, RUNS, Shared};
    let m = msg("explicit");
    A.handle(&m).await.unwrap();
    B.handle(&m).await.unwrap();
    assert_eq!(
        record("explicit-a", "explicit").await,
        Some(RecordState::Completed)
    );
    assert_eq!(
        record("explicit-b", "explicit").await,
        Some(RecordState::Completed)
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);

    A.shared(&m).await.unwrap();
    // B's call is a duplicate of A's: one record, one run
    B.shared(&m).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 3);
    assert_eq!(
        record("explicit-shared", "explicit").await,
        Some(RecordState::Completed)
    );
}

#[cfg(feature = "sqlite")]
mod tx {
    use idempotent_runtime::sqlx::{Sqlite, Transaction};
    use idempotent_runtime::{Error, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct A;
    pub(super) struct B;

    impl A {
        #[idempotent(key = "id", tx = "tx")]
        pub(super) async fn pay(
            &self,
            id: &str,
            tx: &mut Transaction<'_, Sqlite>,
        ) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl B {
        #[idempotent(key = "id", tx = "tx")]
        pub(super) async fn pay(
            &self,
            id: &str,
            tx: &mut Transaction<'_, Sqlite>,
        ) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// In tx mode the guard is the same: the second handler gets `InvalidSettings` before
/// its claim, and the caller's transaction is left as it was, still usable.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn tx_mode_refuses_the_second_handler_without_touching_the_transaction() {
    use idempotent_runtime::SqliteStore;
    use idempotent_runtime::sqlx::sqlite::SqlitePoolOptions;

    // one connection: an in-memory database is per connection
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .expect("open an in-memory database");
    let store = SqliteStore::from_pool(pool.clone());
    store.migrate().await.expect("create the dedup table");

    let mut tx = pool.begin().await.expect("begin");
    tx::A.pay("tx-a", &mut tx).await.unwrap();
    let why = refused(tx::B.pay("tx-b", &mut tx).await);
    assert!(why.contains("`scope::tx::pay`"), "{why}");
    assert!(why.contains("for `scope::tx::B`"), "{why}");
    tx.commit().await.expect("commit");

    assert_eq!(tx::RUNS.load(Ordering::SeqCst), 1);
    let state = |id: &str| {
        let key = RecordKey::new("scope::tx::pay", id).expect("key");
        let store = &store;
        async move { store.inspect(&key).await.expect("inspect").map(|r| r.state) }
    };
    assert_eq!(state("tx-a").await, Some(RecordState::Completed));
    assert_eq!(state("tx-b").await, None);
}
