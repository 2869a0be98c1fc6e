// `&self`, `self: Arc<Self>` and associated fns without a receiver; the key may read `self`.
use idempotent_runtime::{Error, idempotent};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Msg {
    id: u64,
}

#[derive(Default)]
struct Consumer {
    tenant: String,
    runs: AtomicUsize,
}

impl Consumer {
    #[idempotent(key = "(self.tenant.as_str(), msg.id)")]
    async fn by_ref(&self, msg: &Msg) -> Result<usize, Error> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[idempotent(key = "msg.id")]
    async fn by_arc(self: Arc<Self>, msg: Msg) -> Result<usize, Error> {
        Ok(self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[idempotent(key = "id")]
    async fn associated(id: u64) -> Result<u64, Error> {
        Ok(id * 2)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let c = Arc::new(Consumer { tenant: "t1".into(), ..Consumer::default() });
    assert_eq!(c.by_ref(&Msg { id: 1 }).await.unwrap(), 1);
    assert_eq!(c.by_ref(&Msg { id: 1 }).await.unwrap(), 1);
    // `by_arc` is another handler: its own scope, so the same id runs once more
    assert_eq!(c.clone().by_arc(Msg { id: 1 }).await.unwrap(), 2);
    assert_eq!(c.clone().by_arc(Msg { id: 1 }).await.unwrap(), 2);
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
    assert_eq!(Consumer::associated(21).await.unwrap(), 42);
}
