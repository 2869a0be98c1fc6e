//! `IDEMPOTENT_DISABLED=1` turns handlers into pass-throughs. Its own test binary:
//! the variable is read once per process.

use idempotent_runtime::{Error, current_claim, idempotent};
use std::sync::atomic::{AtomicU32, Ordering};

static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "id")]
async fn handler(id: &str) -> Result<bool, Error> {
    let _ = id;
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(current_claim().is_some())
}

#[tokio::test]
async fn disabled_handlers_pass_through() {
    // SAFETY: set before any thread reads the environment; this binary has one test
    unsafe { std::env::set_var("IDEMPOTENT_DISABLED", "1") };
    assert!(!handler("m-1").await.unwrap(), "no claim when disabled");
    assert!(!handler("m-1").await.unwrap());
    assert_eq!(RUNS.load(Ordering::SeqCst), 2, "every delivery runs");
}
