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
