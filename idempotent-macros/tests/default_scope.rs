//! The default scope is the handler's path, `Self` type included, so two handlers of
//! one module never share records, and a handler reads its own path as its scope.
#![deny(warnings, clippy::all, clippy::pedantic)]

use idempotent_runtime::{Error, current_claim, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Msg {
    id: String,
}

#[derive(Default)]
struct Orders {
    runs: AtomicUsize,
}

#[derive(Default)]
struct Payments {
    runs: AtomicUsize,
}

impl Orders {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<String, Error> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

impl Payments {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<String, Error> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

mod nested {
    use super::{Error, Msg, current_claim, idempotent};

    #[idempotent(key = "msg.id")]
    pub(super) async fn handle(msg: &Msg) -> Result<String, Error> {
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

#[tokio::test]
async fn methods_of_two_types_in_one_module_never_share_records() {
    let orders = Orders::default();
    let payments = Payments::default();
    let msg = Msg {
        id: "same-id".into(),
    };

    let orders_scope = orders.handle(&msg).await.unwrap();
    assert_eq!(orders.handle(&msg).await.unwrap(), orders_scope);
    let payments_scope = payments.handle(&msg).await.unwrap();
    assert_eq!(payments.handle(&msg).await.unwrap(), payments_scope);

    // each body ran once: the duplicates were replays, and the other type's record
    // did not count as a duplicate
    assert_eq!(orders.runs.load(Ordering::SeqCst), 1);
    assert_eq!(payments.runs.load(Ordering::SeqCst), 1);
    assert_eq!(orders_scope, "default_scope::Orders::handle");
    assert_eq!(payments_scope, "default_scope::Payments::handle");
}

#[tokio::test]
async fn free_functions_are_scoped_by_module_path() {
    let msg = Msg {
        id: "same-id".into(),
    };
    assert_eq!(
        nested::handle(&msg).await.unwrap(),
        "default_scope::nested::handle"
    );
}

trait Consume {
    async fn handle(&self, msg: &Msg) -> Result<String, Error>;
}

trait Audit {
    async fn handle(&self, msg: &Msg) -> Result<String, Error>;
}

struct Both;

impl Consume for Both {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<String, Error> {
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

impl Audit for Both {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<String, Error> {
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

struct Generic<T>(T);

impl<T: Sync> Generic<T> {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<String, Error> {
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

#[tokio::test]
async fn trait_impls_are_scoped_by_trait_and_generic_impls_share_one_scope() {
    let msg = Msg {
        id: "same-id".into(),
    };
    let consume = Consume::handle(&Both, &msg).await.unwrap();
    let audit = Audit::handle(&Both, &msg).await.unwrap();
    let g8 = Generic(1u8).handle(&msg).await.unwrap();
    let g16 = Generic(1u16).handle(&msg).await.unwrap();
    // one type implementing two traits with a method of the same name: two scopes
    assert_eq!(
        consume,
        "<default_scope::Both as default_scope::Consume>::handle"
    );
    assert_eq!(
        audit,
        "<default_scope::Both as default_scope::Audit>::handle"
    );
    // every instantiation of a generic impl is the same handler, so one scope
    assert_eq!(g8, "default_scope::Generic<_>::handle");
    assert_eq!(g16, g8);
}

/// A handler written once, as a trait's default method, for several types.
trait Handler {
    fn runs(&self) -> &AtomicUsize;

    #[idempotent(key = "msg.id")]
    async fn on_message(&self, msg: &Msg) -> Result<String, Error> {
        self.runs().fetch_add(1, Ordering::SeqCst);
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

impl Handler for Orders {
    fn runs(&self) -> &AtomicUsize {
        &self.runs
    }
}

impl Handler for Payments {
    fn runs(&self) -> &AtomicUsize {
        &self.runs
    }
}

/// The same trait implemented with the method written out.
trait Notify {
    async fn notify(&self, msg: &Msg) -> Result<String, Error>;
}

impl Notify for Orders {
    #[idempotent(key = "msg.id")]
    async fn notify(&self, msg: &Msg) -> Result<String, Error> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(current_claim()
            .expect("a claim while running")
            .scope
            .into_owned())
    }
}

/// A generic implementor of the trait: its instantiations are one handler, as the
/// methods of a generic impl are.
#[derive(Default)]
struct Queue<T, U> {
    runs: AtomicUsize,
    _t: std::marker::PhantomData<(T, U)>,
}

impl<T: Send + Sync, U: Send + Sync> Handler for Queue<T, U> {
    fn runs(&self) -> &AtomicUsize {
        &self.runs
    }
}

#[tokio::test]
async fn a_trait_default_method_is_scoped_by_the_implementing_type() {
    let orders = Orders::default();
    let payments = Payments::default();
    let msg = Msg {
        id: "trait-default".into(),
    };
    let orders_scope = orders.on_message(&msg).await.unwrap();
    assert_eq!(orders.on_message(&msg).await.unwrap(), orders_scope);
    let payments_scope = payments.on_message(&msg).await.unwrap();
    assert_eq!(payments.on_message(&msg).await.unwrap(), payments_scope);
    // one run each: Payments did not replay the record Orders wrote
    assert_eq!(orders.runs.load(Ordering::SeqCst), 1);
    assert_eq!(payments.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        orders_scope,
        "default_scope::Handler::on_message for default_scope::Orders"
    );
    assert_eq!(
        payments_scope,
        "default_scope::Handler::on_message for default_scope::Payments"
    );
}

#[tokio::test]
async fn a_trait_impl_method_is_scoped_by_its_impl() {
    let orders = Orders::default();
    let msg = Msg {
        id: "trait-impl".into(),
    };
    let scope = orders.notify(&msg).await.unwrap();
    assert_eq!(orders.notify(&msg).await.unwrap(), scope);
    assert_eq!(orders.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        scope,
        "<default_scope::Orders as default_scope::Notify>::notify"
    );
}

#[tokio::test]
async fn a_trait_default_method_of_a_generic_implementor_has_one_scope() {
    let small = Queue::<u8, String>::default();
    let large = Queue::<u64, Vec<Option<u8>>>::default();
    let msg = Msg {
        id: "generic-implementor".into(),
    };
    let small_scope = small.on_message(&msg).await.unwrap();
    let large_scope = large.on_message(&msg).await.unwrap();
    assert_eq!(
        small_scope,
        "default_scope::Handler::on_message for default_scope::Queue<_, _>"
    );
    // the second instantiation replays the first one's record
    assert_eq!(large_scope, small_scope);
    assert_eq!(small.runs.load(Ordering::SeqCst), 1);
    assert_eq!(large.runs.load(Ordering::SeqCst), 0);
}
