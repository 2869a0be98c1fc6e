//! The attribute end to end on the runtime: store selection, scopes, keys and
//! fingerprints as users write them.

use idempotent_runtime::{Error, MemoryStore, current_claim, idempotent, register_store};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, Ordering};

static RUNS: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
struct Msg {
    id: String,
    tenant: Option<String>,
    amount: u64,
}

fn msg(id: &str) -> Msg {
    Msg {
        id: id.into(),
        tenant: Some("acme".into()),
        amount: 10,
    }
}

#[idempotent(key = "msg.id", store = "not-registered")]
async fn unregistered(msg: &Msg) -> Result<(), Error> {
    let _ = msg;
    panic!("must not run without its store");
}

/// A name that was never registered fails with the name in the error; nothing runs.
#[tokio::test]
async fn unknown_store_names_the_store() {
    match unregistered(&msg("a")).await {
        Err(Error::UnknownStore { name }) => assert_eq!(name, "not-registered"),
        other => panic!("expected UnknownStore, got {other:?}"),
    }
}

#[idempotent(key = "msg.id", store = "registered-late")]
async fn registered_late(msg: &Msg) -> Result<u32, Error> {
    let _ = msg;
    Ok(RUNS.fetch_add(1, Ordering::SeqCst))
}

/// A store registered after the handler was compiled (at start-up) is found by name.
#[tokio::test]
async fn named_store_is_looked_up_at_call_time() {
    register_store("registered-late", MemoryStore::new());
    let first = registered_late(&msg("late-1")).await.unwrap();
    assert_eq!(registered_late(&msg("late-1")).await.unwrap(), first);
}

static TYPED: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);
static TYPED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "msg.id", store = TYPED)]
async fn typed_store(msg: &Msg) -> Result<u64, Error> {
    TYPED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(msg.amount)
}

/// `store = STATIC` uses that store and nothing else.
#[tokio::test]
async fn typed_store_is_used() {
    assert_eq!(typed_store(&msg("t-1")).await.unwrap(), 10);
    assert_eq!(typed_store(&msg("t-1")).await.unwrap(), 10);
    assert_eq!(TYPED_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(TYPED.len(), 1);
}

struct Orders;
struct Payments;
static ORDER_RUNS: AtomicU32 = AtomicU32::new(0);
static PAYMENT_RUNS: AtomicU32 = AtomicU32::new(0);

impl Orders {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<(), Error> {
        let _ = msg;
        ORDER_RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Payments {
    #[idempotent(key = "msg.id")]
    async fn handle(&self, msg: &Msg) -> Result<(), Error> {
        let _ = msg;
        PAYMENT_RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Two methods of the same name on different types keep separate records.
#[tokio::test]
async fn methods_of_different_types_never_share_records() {
    let m = msg("shared-id");
    for _ in 0..3 {
        Orders.handle(&m).await.unwrap();
        Payments.handle(&m).await.unwrap();
    }
    assert_eq!(ORDER_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(PAYMENT_RUNS.load(Ordering::SeqCst), 1);
}

#[idempotent(key = "(msg.tenant, msg.id)", scope = "composite")]
async fn composite(msg: &Msg) -> Result<String, Error> {
    Ok(format!(
        "{}/{}",
        msg.tenant.as_deref().unwrap_or("-"),
        msg.id
    ))
}

/// A composite key with an `Option` part: `None` is a missing key, nothing runs.
#[tokio::test]
async fn missing_key_part_is_missing_key() {
    assert_eq!(composite(&msg("c-1")).await.unwrap(), "acme/c-1");
    let mut m = msg("c-2");
    m.tenant = None;
    assert!(matches!(composite(&m).await, Err(Error::MissingKey)));
    assert!(matches!(composite(&msg("")).await, Err(Error::MissingKey)));
}

#[idempotent(key = "msg.id", fingerprint = "(msg.amount, msg.tenant)")]
async fn fingerprinted(msg: &Msg) -> Result<u64, Error> {
    Ok(msg.amount)
}

/// The same id with another payload is refused, not replayed.
#[tokio::test]
async fn fingerprint_mismatch_through_the_attribute() {
    let m = msg("fp-1");
    assert_eq!(fingerprinted(&m).await.unwrap(), 10);
    let mut other = msg("fp-1");
    other.amount = 11;
    assert!(matches!(
        fingerprinted(&other).await,
        Err(Error::FingerprintMismatch)
    ));
    assert_eq!(fingerprinted(&m).await.unwrap(), 10);
}

#[idempotent(key = "id", scope = "attempts", max_attempts = 2)]
async fn flaky(id: u64, fail: bool) -> Result<u32, Error> {
    let _ = id;
    if fail {
        return Err(Error::MissingKey);
    }
    Ok(current_claim().expect("claim").attempt)
}

/// `max_attempts` through the attribute, with `current_claim()` telling the attempt.
#[tokio::test]
async fn attempts_through_the_attribute() {
    assert_eq!(flaky(1, false).await.unwrap(), 1);
    assert!(flaky(2, true).await.is_err());
    assert_eq!(flaky(2, false).await.unwrap(), 2);
    assert!(flaky(3, true).await.is_err());
    assert!(flaky(3, true).await.is_err());
    assert!(matches!(
        flaky(3, false).await,
        Err(Error::AttemptsExhausted { attempts: 2 })
    ));
}

#[idempotent(key = "id", scope = "spawned")]
async fn owned(id: String, payload: Vec<u8>) -> Result<usize, Error> {
    tokio::task::yield_now().await;
    Ok(id.len() + payload.len())
}

/// Handlers with owned arguments can be spawned (their futures are `Send`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_handlers_run_once_per_key() {
    let tasks: Vec<_> = (0..50)
        .map(|i| tokio::spawn(owned(format!("k{}", i % 5), vec![0; 3])))
        .collect();
    for t in tasks {
        match t.await.unwrap() {
            Ok(n) => assert_eq!(n, 5),
            Err(Error::InProgress { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
