//! The default scope: `concat!(module_path!(), "::", fn name)` for a fn, and the module
//! path, the `Self` type's name and the fn name for a method with a `self` receiver;
//! pinned string by string because it is stored in every record key. And the guard that
//! refuses a second handler with the same default scope before anything is claimed.
//!
//! This file is the crate `scope`, so `module_path!()` at its root is `scope`. Each test
//! uses handlers of its own: the guard is process-wide, and tests run in parallel.

#![deny(warnings, clippy::all, clippy::pedantic)]

use idempotent_runtime::store::RecordState;
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::{Error, KeyPart, MemoryStore, RecordKey, current_claim, idempotent};
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

/// Every kind of handler is scoped by its module path and its fn name, and a method with
/// a `self` receiver by its `Self` type's name too (generic arguments left out): these
/// strings are in the keys of stored records, so they are pinned here.
#[tokio::test]
async fn the_default_scope_is_the_module_path_the_self_type_and_the_fn_name() {
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
    assert_eq!(
        Orders.on_order(&m).await.unwrap(),
        "scope::Orders::on_order"
    );
    // no receiver: the attribute cannot name `Self` (it may be a free fn)
    assert_eq!(Orders::associated(&m).await.unwrap(), "scope::associated");
    assert_eq!(Orders.notify(&m).await.unwrap(), "scope::Orders::notify");
    // a trait's default method: the trait's module, the implementing type
    assert_eq!(Orders.audit(&m).await.unwrap(), "scope::Orders::audit");
    assert_eq!(
        Queue(1u8).on_queued(&m).await.unwrap(),
        "scope::Queue::on_queued"
    );
    assert_eq!(
        nested::deeper::handle(&m).await.unwrap(),
        "scope::nested::deeper::handle"
    );
    // the records are stored under those scopes
    for scope in [
        "scope::free",
        "scope::generic_free",
        "scope::match",
        "scope::Orders::on_order",
        "scope::associated",
        "scope::Orders::notify",
        "scope::Orders::audit",
        "scope::Queue::on_queued",
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
    assert_eq!(
        Queue(1u8).on_queued(&m).await.unwrap(),
        "scope::Queue::on_queued"
    );
    assert_eq!(
        Queue(String::new()).on_queued(&m).await.unwrap(),
        "scope::Queue::on_queued"
    );
    assert_eq!(
        Queue(vec![1u64])
            .on_queued(&msg("generic-2"))
            .await
            .unwrap(),
        "scope::Queue::on_queued"
    );
    assert_eq!(generic_free(&7u64).await.unwrap(), "scope::generic_free");
    assert_eq!(generic_free(&"seven").await.unwrap(), "scope::generic_free");
}

// ---- methods named alike of several types ----

mod consumers {
    use super::{Error, Msg, STORE, claimed_scope, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static ORDER_RUNS: AtomicU32 = AtomicU32::new(0);
    pub(super) static PAYMENT_RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct Orders;
    pub(super) struct Payments;

    impl Orders {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<String, Error> {
            ORDER_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }

    impl Payments {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<String, Error> {
            PAYMENT_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }
}

/// One consumer type per topic, each with a `handle` method, in one module: each type
/// has its own default scope, so both run on the same message id, each keeps its own
/// records, and the duplicates of each are replayed.
#[tokio::test]
async fn methods_named_alike_of_two_types_have_their_own_records() {
    use consumers::{ORDER_RUNS, Orders, PAYMENT_RUNS, Payments};
    let orders = "scope::consumers::Orders::handle";
    let payments = "scope::consumers::Payments::handle";
    let m = msg("consumer-1");
    for _ in 0..2 {
        assert_eq!(Orders.handle(&m).await.unwrap(), orders);
        assert_eq!(Payments.handle(&m).await.unwrap(), payments);
    }
    let m = msg("consumer-2");
    for _ in 0..2 {
        assert_eq!(Payments.handle(&m).await.unwrap(), payments);
        assert_eq!(Orders.handle(&m).await.unwrap(), orders);
    }
    assert_eq!(ORDER_RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(PAYMENT_RUNS.load(Ordering::SeqCst), 2);
    for scope in [orders, payments] {
        for id in ["consumer-1", "consumer-2"] {
            assert_eq!(record(scope, id).await, Some(RecordState::Completed));
        }
    }
    assert_eq!(record("scope::consumers::handle", "consumer-1").await, None);
}

mod trait_impls {
    use super::{Error, Msg, STORE, claimed_scope, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) trait Handler {
        async fn handle(&self, msg: &Msg) -> Result<String, Error>;
    }

    pub(super) struct Orders;
    pub(super) struct Payments;

    impl Handler for Orders {
        #[idempotent(key = "msg.id", store = STORE)]
        async fn handle(&self, msg: &Msg) -> Result<String, Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }

    impl Handler for Payments {
        #[idempotent(key = "msg.id", store = STORE)]
        async fn handle(&self, msg: &Msg) -> Result<String, Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }
}

/// The same with one trait implemented for each type.
#[tokio::test]
async fn trait_impls_for_two_types_have_their_own_records() {
    use trait_impls::{Handler, Orders, Payments, RUNS};
    let m = msg("trait-impl");
    for _ in 0..2 {
        assert_eq!(
            Orders.handle(&m).await.unwrap(),
            "scope::trait_impls::Orders::handle"
        );
        assert_eq!(
            Payments.handle(&m).await.unwrap(),
            "scope::trait_impls::Payments::handle"
        );
    }
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
}

mod generic_impls {
    use super::{Error, Msg, STORE, claimed_scope, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct Queue<T>(pub(super) T);
    pub(super) struct Stack<T>(pub(super) T);

    impl<T: Sync> Queue<T> {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<String, Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }

    impl<T: Sync> Stack<T> {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn handle(&self, msg: &Msg) -> Result<String, Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }
}

/// Generic impls: a scope per type, without its arguments; the instantiations of one
/// impl are one handler and replay each other's records.
#[tokio::test]
async fn generic_impls_for_two_types_have_their_own_records() {
    use generic_impls::{Queue, RUNS, Stack};
    let queue = "scope::generic_impls::Queue::handle";
    let stack = "scope::generic_impls::Stack::handle";
    let m = msg("generic-impl");
    assert_eq!(Queue(1u8).handle(&m).await.unwrap(), queue);
    assert_eq!(Stack(1u8).handle(&m).await.unwrap(), stack);
    assert_eq!(Queue("other").handle(&m).await.unwrap(), queue);
    assert_eq!(Stack(vec![2u64]).handle(&m).await.unwrap(), stack);
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
}

mod default_method {
    use super::{Error, Msg, STORE, claimed_scope, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) trait Consume {
        #[idempotent(key = "msg.id", store = STORE)]
        async fn consume(&self, msg: &Msg) -> Result<String, Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(claimed_scope())
        }
    }

    pub(super) struct Orders;
    pub(super) struct Payments;

    impl Consume for Orders {}
    impl Consume for Payments {}
}

/// A trait's default method is one fn for every implementor, scoped by the trait's
/// module and each implementing type: each type has its own records.
#[tokio::test]
async fn a_trait_default_method_has_a_scope_per_implementing_type() {
    use default_method::{Consume, Orders, Payments, RUNS};
    let m = msg("default");
    for _ in 0..2 {
        assert_eq!(
            Orders.consume(&m).await.unwrap(),
            "scope::default_method::Orders::consume"
        );
        assert_eq!(
            Payments.consume(&m).await.unwrap(),
            "scope::default_method::Payments::consume"
        );
    }
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
}

// ---- the guard: handlers the default scope does not tell apart ----

mod clash {
    use super::{Error, Msg, STORE, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static BUILD_RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) struct A;
    pub(super) struct B;

    impl A {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn build(msg: &Msg) -> Result<(), Error> {
            BUILD_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl B {
        #[idempotent(key = "msg.id", store = STORE)]
        pub(super) async fn build(msg: &Msg) -> Result<(), Error> {
            BUILD_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Associated fns without a receiver named alike in two impls of one module have one
/// default scope, `scope::clash::build` (the attribute cannot name `Self` there). The
/// first one called keeps it; the other is refused at every call, before its body runs
/// and before anything is claimed, so no record is shared.
#[tokio::test]
async fn two_associated_fns_with_one_default_scope_refuse_the_second() {
    use clash::{A, B, BUILD_RUNS};
    A::build(&msg("build-a")).await.unwrap();
    A::build(&msg("build-a")).await.unwrap();
    let why = refused(B::build(&msg("build-b")).await);
    assert!(why.contains("`scope::clash::build`"), "{why}");
    assert!(why.contains("`scope::clash::A::build`"), "{why}");
    assert!(why.contains("`scope::clash::B::build`"), "{why}");
    assert!(why.contains("explicit `scope = \"…\"`"), "{why}");
    // a message A handled already is no duplicate for B: still refused
    refused(B::build(&msg("build-a")).await);
    // A's run only
    assert_eq!(BUILD_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(
        record("scope::clash::build", "build-a").await,
        Some(RecordState::Completed)
    );
    assert_eq!(record("scope::clash::build", "build-b").await, None);
}

mod two_traits {
    use super::{Error, Msg, STORE, idempotent};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(super) static RUNS: AtomicU32 = AtomicU32::new(0);

    pub(super) trait Notify {
        async fn handle(&self, msg: &Msg) -> Result<(), Error>;
    }

    pub(super) trait Audit {
        async fn handle(&self, msg: &Msg) -> Result<(), Error>;
    }

    pub(super) struct Both;

    impl Notify for Both {
        #[idempotent(key = "msg.id", store = STORE)]
        async fn handle(&self, msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl Audit for Both {
        #[idempotent(key = "msg.id", store = STORE)]
        async fn handle(&self, msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Two traits' methods of one name implemented for one type in one module: one default
/// scope, `scope::two_traits::Both::handle` (the attribute cannot see the trait); the
/// second one called is refused.
#[tokio::test]
async fn two_traits_methods_of_one_name_for_one_type_refuse_the_second() {
    use two_traits::{Audit, Both, Notify, RUNS};
    Notify::handle(&Both, &msg("traits-1")).await.unwrap();
    let why = refused(Audit::handle(&Both, &msg("traits-2")).await);
    assert!(why.contains("`scope::two_traits::Both::handle`"), "{why}");
    assert!(
        why.contains("Notify>::handle` for `scope::two_traits::Both`"),
        "{why}"
    );
    assert!(
        why.contains("Audit>::handle` for `scope::two_traits::Both`"),
        "{why}"
    );
    assert!(why.contains("explicit `scope = \"…\"`"), "{why}");
    Notify::handle(&Both, &msg("traits-3")).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(
        record("scope::two_traits::Both::handle", "traits-2").await,
        None
    );
}

mod same_name {
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

    pub(super) mod a {
        pub(crate) struct Orders;
    }

    pub(super) mod b {
        pub(crate) struct Orders;
    }

    impl Consume for a::Orders {}
    impl Consume for b::Orders {}
}

/// A trait's default method called for two types of one name (from two modules): one
/// default scope, `scope::same_name::Orders::consume`; the second type is refused.
#[tokio::test]
async fn a_trait_default_method_for_two_types_of_one_name_refuses_the_second() {
    use same_name::{Consume, RUNS, a, b};
    a::Orders.consume(&msg("same-1")).await.unwrap();
    let why = refused(b::Orders.consume(&msg("same-2")).await);
    assert!(why.contains("`scope::same_name::Orders::consume`"), "{why}");
    assert!(why.contains("for `scope::same_name::a::Orders`"), "{why}");
    assert!(why.contains("for `scope::same_name::b::Orders`"), "{why}");
    assert!(why.contains("default method"), "{why}");
    a::Orders.consume(&msg("same-3")).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    assert_eq!(
        record("scope::same_name::Orders::consume", "same-2").await,
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

        #[idempotent(key = "id", tx = "tx")]
        pub(super) async fn refund(
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

        #[idempotent(key = "id", tx = "tx")]
        pub(super) async fn refund(
            id: &str,
            tx: &mut Transaction<'_, Sqlite>,
        ) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// In tx mode the default scope is the same: the methods of two types have their own
/// records, and of two associated fns with one default scope the second one gets
/// `InvalidSettings` before its claim, with the caller's transaction left as it was,
/// still usable.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn tx_mode_scopes_methods_by_type_and_refuses_the_second_associated_fn() {
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
    for _ in 0..2 {
        tx::A.pay("tx-1", &mut tx).await.unwrap();
        tx::B.pay("tx-1", &mut tx).await.unwrap();
    }
    tx::A::refund("tx-a", &mut tx).await.unwrap();
    let why = refused(tx::B::refund("tx-b", &mut tx).await);
    assert!(why.contains("`scope::tx::refund`"), "{why}");
    assert!(why.contains("`scope::tx::B::refund`"), "{why}");
    tx.commit().await.expect("commit");

    assert_eq!(tx::RUNS.load(Ordering::SeqCst), 3);
    let state = |scope: &str, id: &str| {
        let key = RecordKey::new(scope, id).expect("key");
        let store = &store;
        async move { store.inspect(&key).await.expect("inspect").map(|r| r.state) }
    };
    for scope in ["scope::tx::A::pay", "scope::tx::B::pay"] {
        assert_eq!(state(scope, "tx-1").await, Some(RecordState::Completed));
    }
    assert_eq!(
        state("scope::tx::refund", "tx-a").await,
        Some(RecordState::Completed)
    );
    assert_eq!(state("scope::tx::refund", "tx-b").await, None);
}
