// `crate = "path"`: a crate that re-exports the runtime; generated code names only that path.
// The runtime is not reachable as `idempotent_runtime` from `app`'s point of view here:
// everything goes through `reexport`.
mod reexport {
    pub use idempotent_runtime::*;
}

mod app {
    use crate::reexport::{Error, idempotent};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub static RUNS: AtomicUsize = AtomicUsize::new(0);

    pub struct Msg {
        pub id: String,
    }

    #[idempotent(key = "msg.id", crate = "crate::reexport")]
    pub async fn handle(msg: &Msg) -> Result<(), Error> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    #[idempotent(key = "msg.id", crate = crate::reexport, store = crate::reexport::registered_store("memory").unwrap())]
    pub async fn handle_unquoted(msg: &Msg) -> Result<(), Error> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let msg = app::Msg { id: "r-1".into() };
    app::handle(&msg).await.unwrap();
    app::handle(&msg).await.unwrap();
    app::handle_unquoted(&msg).await.unwrap();
    app::handle_unquoted(&msg).await.unwrap();
    assert_eq!(app::RUNS.load(std::sync::atomic::Ordering::SeqCst), 2);
}
