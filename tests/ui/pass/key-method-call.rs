// A key read through a method: `msg.header.biz_id()`.
use idempotent_runtime::{Error, idempotent};
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Header {
    raw: String,
}

impl Header {
    fn biz_id(&self) -> &str {
        self.raw.split('/').next().unwrap_or_default()
    }
}

struct Msg {
    header: Header,
}

#[idempotent(key = "msg.header.biz_id()")]
async fn handle(msg: &Msg) -> Result<(), Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let m = |raw: &str| Msg { header: Header { raw: raw.into() } };
    handle(&m("b-1/retry-0")).await.unwrap();
    handle(&m("b-1/retry-1")).await.unwrap(); // same business id
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
