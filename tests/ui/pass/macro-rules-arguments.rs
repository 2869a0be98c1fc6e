// Arguments from `macro_rules!` fragments: `$scope:literal`, `$scope:expr`, `$ttl:literal`.
use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

pub struct Msg {
    id: String,
}

macro_rules! literal_handler {
    ($name:ident, $scope:literal, $ttl:literal) => {
        #[idempotent(key = "msg.id", scope = $scope, ttl = $ttl)]
        async fn $name(msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    };
}

macro_rules! expr_handler {
    ($name:ident, $scope:expr, $attempts:expr) => {
        #[idempotent(key = "msg.id", scope = $scope, max_attempts = $attempts)]
        async fn $name(msg: &Msg) -> Result<(), Error> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    };
}

literal_handler!(orders, "orders", "1h");
literal_handler!(orders_again, "orders", "2h");
expr_handler!(payments, "payments", 3);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let msg = Msg { id: "m-1".into() };
    orders(&msg).await.unwrap();
    // the same explicit scope: the same records
    orders_again(&msg).await.unwrap();
    payments(&msg).await.unwrap();
    payments(&msg).await.unwrap();
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
}
