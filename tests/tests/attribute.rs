//! The attribute end to end on the runtime: store selection, scopes, keys and
//! fingerprints as users write them.

use idempotent_runtime::store::StoreAdmin;
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

/// Two methods of the same name on different types of one module, the usual shape of
/// consumers: each default scope names the type (`attribute::Orders::handle`,
/// `attribute::Payments::handle`), so both run, each keeps its own records, and the
/// duplicates of each are replayed.
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

// ---------------------------------------------------------------- hot path edges

use idempotent_runtime::store::RecordState;
use idempotent_runtime::testing::FaultyStore;
use idempotent_runtime::{RecordKey, Store};
use std::sync::Arc;
use std::time::Duration;

static EDGE: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);
static EDGE_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "id", scope = "edge-long", store = EDGE)]
async fn long_key_handler(id: &str, out_len: usize) -> Result<String, Error> {
    EDGE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("{id}|{}", "o".repeat(out_len)))
}

/// Keys on both sides of the inline record key buffer and of the hashing threshold,
/// and outputs on both sides of the inline output buffer, dedup and replay exactly.
#[tokio::test]
async fn long_keys_and_outputs_replay_exactly() {
    for (n, len) in [1usize, 60, 90, 100, 102, 103, 104, 110, 127, 128, 129, 300]
        .into_iter()
        .enumerate()
    {
        let id = format!("{n:x}{}", "k".repeat(len - 1));
        // differs from `id` only in its last byte
        let twin = format!("{}z", &id[..id.len() - 1]);
        for out_len in [0usize, 50, 70, 5000] {
            let before = EDGE_RUNS.load(Ordering::SeqCst);
            let id = format!("{id}{out_len}");
            let twin = format!("{twin}{out_len}");
            let first = long_key_handler(&id, out_len).await.unwrap();
            assert_eq!(first, format!("{id}|{}", "o".repeat(out_len)));
            assert_eq!(long_key_handler(&id, 1).await.unwrap(), first, "replayed");
            let other = long_key_handler(&twin, out_len).await.unwrap();
            assert_eq!(other, format!("{twin}|{}", "o".repeat(out_len)));
            assert_eq!(EDGE_RUNS.load(Ordering::SeqCst), before + 2);
            let rec = EDGE
                .inspect(&RecordKey::new("edge-long", id.as_str()).unwrap())
                .await
                .unwrap()
                .expect("record");
            assert_eq!(rec.state, RecordState::Completed);
        }
    }
}

#[idempotent(key = "(a, b)", scope = "edge-composite", store = EDGE)]
async fn composite_long(a: &str, b: &str) -> Result<String, Error> {
    Ok(format!("{a}/{b}"))
}

/// Composite keys with long parts stay unambiguous through the attribute.
#[tokio::test]
async fn composite_keys_with_long_parts() {
    for len in [1usize, 30, 61, 62, 63, 64, 65, 100, 140] {
        let a = "a".repeat(len);
        let ab = format!("{a}:b");
        assert_eq!(composite_long(&ab, "c").await.unwrap(), format!("{ab}/c"));
        assert_eq!(
            composite_long(&a, "b:c").await.unwrap(),
            format!("{a}/b:c"),
            "a different split is a different key"
        );
        assert_eq!(composite_long(&ab, "c").await.unwrap(), format!("{ab}/c"));
    }
}

#[idempotent(key = "id", store = EDGE)]
async fn default_scoped(id: &str) -> Result<u32, Error> {
    let _ = id;
    Ok(current_claim().expect("claim").attempt)
}

/// The default scope is the module path and the fn name, the same on every call.
#[tokio::test]
async fn default_scope_is_the_handler_path() {
    assert_eq!(default_scoped("ds-1").await.unwrap(), 1);
    assert_eq!(default_scoped("ds-2").await.unwrap(), 1);
    for id in ["ds-1", "ds-2"] {
        let k = RecordKey::new("attribute::default_scoped", id).unwrap();
        let rec = EDGE.inspect(&k).await.unwrap().expect("record");
        assert_eq!(rec.state, RecordState::Completed);
    }
}

static SLOW: LazyLock<FaultyStore<MemoryStore>> =
    LazyLock::new(|| FaultyStore::new(MemoryStore::new()));

#[idempotent(key = "id", scope = "edge-slow-release", store = SLOW, lease = "30s")]
async fn fails_slowly(id: &str) -> Result<u32, Error> {
    let _ = id;
    SLOW.set_delay(Duration::from_millis(300));
    Err(Error::MissingKey)
}

async fn state_of(store: &dyn Store, scope: &str, id: &str, want: RecordState) -> RecordState {
    let k = RecordKey::new(scope, id).unwrap();
    let mut state = None;
    for _ in 0..100 {
        state = store
            .as_admin()
            .unwrap()
            .inspect(&k)
            .await
            .unwrap()
            .map(|r| r.state);
        if state == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.expect("record")
}

/// A handler cancelled while the release of its failed attempt is in flight still
/// releases the claim.
#[tokio::test]
async fn cancelled_during_release_still_releases() {
    let r = tokio::time::timeout(Duration::from_millis(100), fails_slowly("m-1")).await;
    assert!(r.is_err(), "cancelled while releasing");
    SLOW.set_delay(Duration::ZERO);
    assert_eq!(
        state_of(
            SLOW.inner(),
            "edge-slow-release",
            "m-1",
            RecordState::Released
        )
        .await,
        RecordState::Released
    );
}

#[idempotent(key = "id", scope = "edge-slow-panic", store = SLOW_PANIC, lease = "30s")]
async fn panics_slowly(id: &str) -> Result<u32, Error> {
    let _ = id;
    SLOW_PANIC.set_delay(Duration::from_millis(50));
    if id.is_empty() {
        return Ok(0);
    }
    panic!("handler bug");
}

static SLOW_PANIC: LazyLock<FaultyStore<MemoryStore>> =
    LazyLock::new(|| FaultyStore::new(MemoryStore::new()));

/// A panic with a store that must be awaited: the claim is released, then the panic
/// reaches the caller.
#[tokio::test]
async fn panic_with_an_awaited_store_releases() {
    let joined = tokio::spawn(panics_slowly("m-1")).await;
    assert!(joined.unwrap_err().is_panic());
    SLOW_PANIC.set_delay(Duration::ZERO);
    let k = RecordKey::new("edge-slow-panic", "m-1").unwrap();
    let rec = SLOW_PANIC
        .inner()
        .inspect(&k)
        .await
        .unwrap()
        .expect("record");
    assert_eq!(rec.state, RecordState::Released);
}

static LEASED: LazyLock<Arc<FaultyStore<MemoryStore>>> =
    LazyLock::new(|| Arc::new(FaultyStore::new(MemoryStore::new())));
static LEASED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "id", scope = "edge-renew", store = LEASED, lease = "300ms")]
async fn outlives_its_lease(id: &str) -> Result<u32, Error> {
    let _ = id;
    LEASED_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Ok(7)
}

/// The lease of a body that yields is renewed through an awaited store, so a
/// duplicate arriving long after the first lease would have ended is refused.
#[tokio::test]
async fn renewal_keeps_a_long_handler_claimed() {
    let first = tokio::spawn(outlives_its_lease("m-1"));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match outlives_its_lease("m-1").await {
            Err(Error::InProgress { .. }) | Ok(7) => {}
            other => panic!("duplicate got {other:?}"),
        }
    }
    assert_eq!(first.await.unwrap().unwrap(), 7);
    assert_eq!(LEASED_RUNS.load(Ordering::SeqCst), 1);
    assert!(LEASED.calls().renew >= 2, "renewed: {:?}", LEASED.calls());
}

static ARCED: LazyLock<Arc<MemoryStore>> = LazyLock::new(|| Arc::new(MemoryStore::new()));
static ARCED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "id", scope = "edge-arc", store = ARCED, lease = "300ms")]
async fn on_arc(id: &str, sleep_ms: u64) -> Result<u64, Error> {
    let _ = id;
    ARCED_RUNS.fetch_add(1, Ordering::SeqCst);
    let claim = current_claim().expect("claim");
    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    assert_eq!(current_claim().expect("claim after a yield"), claim);
    Ok(claim.token.get())
}

/// An `Arc<MemoryStore>` (the immediate path through the `Arc`): renewal keeps the
/// claim, cancellation releases it, and `current_claim()` matches the record.
#[tokio::test]
async fn arc_of_memory_store_keeps_every_guarantee() {
    let first = tokio::spawn(on_arc("m-1", 1000));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(
            on_arc("m-1", 0).await,
            Err(Error::InProgress { .. })
        ));
    }
    let token = first.await.unwrap().unwrap();
    let k = RecordKey::new("edge-arc", "m-1").unwrap();
    let rec = ARCED.inspect(&k).await.unwrap().expect("record");
    assert_eq!(rec.token.get(), token);
    assert_eq!(on_arc("m-1", 0).await.unwrap(), token);
    assert_eq!(ARCED_RUNS.load(Ordering::SeqCst), 1);

    let r = tokio::time::timeout(Duration::from_millis(50), on_arc("m-2", 5000)).await;
    assert!(r.is_err());
    assert_eq!(
        state_of(&**ARCED, "edge-arc", "m-2", RecordState::Released).await,
        RecordState::Released
    );
}

static WAITED: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

#[idempotent(key = "id", scope = "edge-wait", store = WAITED, on_in_progress = "wait", lease = "5s")]
async fn waits(id: &str, sleep_ms: u64, fail: bool) -> Result<(u32, u64), Error> {
    let _ = id;
    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    if fail {
        return Err(Error::MissingKey);
    }
    Ok((current_claim().expect("claim").attempt, sleep_ms))
}

/// `on_in_progress = "wait"` through the attribute: the duplicate gets the winner's
/// output, or runs itself (attempt 2) when the winner fails.
#[tokio::test]
async fn waiting_duplicates_through_the_attribute() {
    let first = tokio::spawn(waits("m-1", 200, false));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(waits("m-1", 0, false).await.unwrap(), (1, 200));
    assert_eq!(first.await.unwrap().unwrap(), (1, 200));

    let first = tokio::spawn(waits("m-2", 200, true));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(waits("m-2", 0, false).await.unwrap(), (2, 0));
    assert!(first.await.unwrap().is_err());
}

static DOWN: LazyLock<FaultyStore<MemoryStore>> =
    LazyLock::new(|| FaultyStore::new(MemoryStore::new()));
static OPEN_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "id", scope = "edge-open", store = DOWN, on_store_error = "process")]
async fn fails_open(id: &str) -> Result<bool, Error> {
    let _ = id;
    OPEN_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(current_claim().is_some())
}

#[idempotent(key = "id", scope = "edge-closed", store = DOWN)]
async fn fails_closed(id: &str) -> Result<bool, Error> {
    let _ = id;
    OPEN_RUNS.fetch_add(100, Ordering::SeqCst);
    Ok(true)
}

/// `on_store_error = "process"` through the attribute runs the body without a claim;
/// the default fails closed.
#[tokio::test]
async fn store_outage_through_the_attribute() {
    DOWN.set_down(true);
    assert!(!fails_open("m-1").await.unwrap());
    assert!(!fails_open("m-1").await.unwrap());
    assert!(matches!(fails_closed("m-1").await, Err(Error::Store(_))));
    assert_eq!(OPEN_RUNS.load(Ordering::SeqCst), 2);
    DOWN.set_down(false);
    assert!(fails_open("m-1").await.unwrap());
    assert!(fails_open("m-1").await.unwrap());
    assert_eq!(OPEN_RUNS.load(Ordering::SeqCst), 3);
}

static STRESS: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);
static IN_FLIGHT: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];
static SUCCEEDED: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];
static OVERLAPS: AtomicU32 = AtomicU32::new(0);

/// Counts the bodies in flight for key `k` while it lives (cancellation included).
struct InFlight(usize);

impl InFlight {
    fn enter(k: usize) -> Self {
        if IN_FLIGHT[k].fetch_add(1, Ordering::SeqCst) != 0 {
            OVERLAPS.fetch_add(1, Ordering::SeqCst);
        }
        InFlight(k)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT[self.0].fetch_sub(1, Ordering::SeqCst);
    }
}

#[idempotent(key = "k", scope = "edge-stress", store = STRESS, lease = "10s")]
async fn stressed(k: usize, mode: usize) -> Result<usize, Error> {
    let in_flight = InFlight::enter(k);
    for _ in 0..mode % 4 {
        tokio::task::yield_now().await;
    }
    drop(in_flight);
    if mode.is_multiple_of(5) {
        return Err(Error::MissingKey);
    }
    SUCCEEDED[k].fetch_add(1, Ordering::SeqCst);
    Ok(k)
}

/// G1/G2/G3 under load: duplicates, failures and cancellations at every await point of
/// the immediate path, on several threads: never two bodies of a key at once, at most
/// one success per key, and every key ends completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_failures_and_cancellations_under_load() {
    let tasks: Vec<_> = (0..4000usize)
        .map(|i| {
            tokio::spawn(async move {
                let (k, mode) = (i % 8, i * 7 % 13);
                if i % 3 == 0 {
                    let _ =
                        tokio::time::timeout(Duration::from_micros(50), stressed(k, mode)).await;
                } else {
                    let _ = stressed(k, mode).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        OVERLAPS.load(Ordering::SeqCst),
        0,
        "two bodies of a key ran at once"
    );
    for (k, succeeded) in SUCCEEDED.iter().enumerate() {
        // cancelled claims are released by spawned tasks: retry until each settles
        let mut out = Err(Error::MissingKey);
        for _ in 0..100 {
            out = stressed(k, 1).await;
            if out.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(out.unwrap(), k);
        assert_eq!(succeeded.load(Ordering::SeqCst), 1, "key {k}");
    }
}

static SLOW_DONE: LazyLock<FaultyStore<MemoryStore>> =
    LazyLock::new(|| FaultyStore::new(MemoryStore::new()));

#[idempotent(key = "id", scope = "edge-slow-complete", store = SLOW_DONE, lease = "30s")]
async fn completes_slowly(id: &str, out_len: usize, delay_ms: u64) -> Result<String, Error> {
    SLOW_DONE.set_delay(Duration::from_millis(delay_ms));
    Ok(format!("{id}:{}", "x".repeat(out_len)))
}

/// Outputs inline and on the heap, completed through an awaited store, and recorded
/// even when the caller gives up while the completion is in flight.
#[tokio::test]
async fn awaited_completions_of_any_size() {
    for out_len in [0usize, 10, 63, 64, 65, 1000] {
        let id = format!("c-{out_len}");
        let want = format!("{id}:{}", "x".repeat(out_len));
        assert_eq!(completes_slowly(&id, out_len, 0).await.unwrap(), want);
        assert_eq!(completes_slowly(&id, 1, 0).await.unwrap(), want);

        let id = format!("cancelled-{out_len}");
        let want = format!("{id}:{}", "x".repeat(out_len));
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            completes_slowly(&id, out_len, 300),
        )
        .await;
        assert!(r.is_err(), "cancelled while completing");
        SLOW_DONE.set_delay(Duration::ZERO);
        assert_eq!(
            state_of(
                SLOW_DONE.inner(),
                "edge-slow-complete",
                &id,
                RecordState::Completed
            )
            .await,
            RecordState::Completed
        );
        assert_eq!(completes_slowly(&id, 1, 0).await.unwrap(), want);
    }
}
