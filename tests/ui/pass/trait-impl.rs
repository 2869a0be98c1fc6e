// A method of a trait impl (the trait declares a future that is `Send`).
use idempotent_runtime::{Error, idempotent};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Msg {
    id: String,
}

trait Handler {
    fn handle(&self, msg: &Msg) -> impl Future<Output = Result<usize, Error>> + Send;
}

#[derive(Default)]
struct Orders {
    runs: AtomicUsize,
}

impl Handler for Orders {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<usize, Error> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let orders = Orders::default();
    let msg = Msg { id: "o-1".into() };
    assert_eq!(orders.handle(&msg).await.unwrap(), 1);
    assert_eq!(orders.handle(&msg).await.unwrap(), 1);
    assert_eq!(orders.runs.load(Ordering::SeqCst), 1);
}
