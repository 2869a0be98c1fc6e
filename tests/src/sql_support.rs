//! Helpers for the SQL store tests: server URLs from the environment, unique names,
//! and the store-agnostic scenarios the SQL stores run: round trips, a server that goes
//! away, killed connections, purging, two stores racing on the same keys, shared
//! poisoning, and keys full of SQL metacharacters.
//!
//! Compiled with any of the `mysql`, `postgres` and `sqlite` features.
#![cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]

use crate::proxy::Proxy;
use crate::stores::admin;
pub use crate::stores::free_port;
use futures_util::future::join_all;
use idempotent_runtime::store::Release;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion, Fence};
pub use idempotent_runtime::testing::conformance::{
    TTL, acquire_token as acquire, claim_request as req,
};
use idempotent_runtime::{Error, Idempotency};
use idempotent_runtime::{RecordKey, Store, StoreErrorKind};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// `$var`, or `default` when it is unset.
pub fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// A random lowercase suffix, for table and schema names no other run uses.
pub fn unique_name(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random bytes");
    let n = b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x));
    format!("{prefix}_{n:012x}")
}

/// Prepares every protocol statement on `store`'s single connection behind `proxy`,
/// then checks that a fresh claim, a renewal, a completion and the duplicates of
/// completed keys cost one round trip each. Returns the scope it used.
pub async fn single_steps_are_one_round_trip(
    store: &dyn Store,
    proxy: &Proxy,
    prefix: &str,
) -> String {
    let scope = idempotent_runtime::testing::conformance::unique_scope(prefix);
    // warm up: prepare every statement once on the single connection
    let warm = RecordKey::new(&scope, "warm").unwrap();
    let t = acquire(store, &req(&warm, TTL)).await;
    store.renew(&warm, t, TTL).await.unwrap();
    store
        .release(&Release {
            key: &warm,
            token: t,
        })
        .await
        .unwrap();
    let t = acquire(store, &req(&warm, TTL)).await;
    store
        .complete(&Completion {
            key: &warm,
            token: t,
            output: Some(b"w"),
            ttl: TTL,
        })
        .await
        .unwrap();
    store.claim(&req(&warm, TTL)).await.unwrap();

    let k = RecordKey::new(&scope, "m-1").unwrap();
    let before = proxy.round_trips();
    let token = acquire(store, &req(&k, TTL)).await;
    assert_eq!(proxy.round_trips() - before, 1, "fresh claim");

    let before = proxy.round_trips();
    assert_eq!(store.renew(&k, token, TTL).await.unwrap(), Fence::Held);
    assert_eq!(proxy.round_trips() - before, 1, "renew");

    let before = proxy.round_trips();
    let done = store
        .complete(&Completion {
            key: &k,
            token,
            output: Some(b"42"),
            ttl: TTL,
        })
        .await
        .unwrap();
    assert_eq!(done, Fence::Held);
    assert_eq!(proxy.round_trips() - before, 1, "complete");

    for _ in 0..3 {
        let before = proxy.round_trips();
        match store.claim(&req(&k, TTL)).await.unwrap() {
            ClaimOutcome::Completed { output } => assert_eq!(output.as_deref(), Some(&b"42"[..])),
            other => panic!("expected Completed, got {other:?}"),
        }
        assert_eq!(
            proxy.round_trips() - before,
            1,
            "duplicate of a completed key"
        );
    }

    let before = proxy.round_trips();
    match store.claim(&req(&warm, TTL)).await.unwrap() {
        ClaimOutcome::Completed { .. } => {}
        other => panic!("expected Completed, got {other:?}"),
    }
    assert_eq!(proxy.round_trips() - before, 1, "another duplicate");
    scope
}

/// The server's port goes away: deliveries through `store` (whose pool connects
/// through `proxy`) fail closed with an `Unavailable` store error and their bodies do
/// not run; when it comes back the same store works again.
pub async fn fails_closed_while_the_server_is_away(
    store: Arc<dyn Store>,
    proxy: &mut Proxy,
    prefix: &str,
) {
    let h = Idempotency::new(idempotent_runtime::testing::conformance::unique_scope(
        prefix,
    ))
    .shared_store(store);
    let r: Result<u32, Error> = h.run("a", async { Ok(1) }).await;
    assert_eq!(r.unwrap(), 1);

    proxy.cut().await;
    let runs = AtomicU32::new(0);
    for key in ["a", "b"] {
        let r: Result<u32, Error> = h
            .run(key, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(9)
            })
            .await;
        match r {
            Err(Error::Store(e)) => assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e:?}"),
            other => panic!("expected a fail-closed store error, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    proxy.restore().await;
    let r: Result<u32, Error> = h.run("a", async { Ok(5) }).await;
    assert_eq!(r.unwrap(), 1, "completed before the outage: replayed");
    let r: Result<u32, Error> = h.run("b", async { Ok(5) }).await;
    assert_eq!(r.unwrap(), 5);
}

/// A connection killed while a claim waits on a row lock: the delivery through `store`
/// (a pool of that one connection) fails closed with a retryable `Error::Store` (the
/// body does not run), and the same store recovers on a new connection. The hooks, on
/// another connection: `lock` locks the rows of a scope in a transaction, `blocked`
/// tells whether the store's connection waits on that lock, `kill` kills it, and
/// `unlock` rolls the transaction back.
pub async fn killed_connection_fails_closed_and_recovers<T>(
    store: Arc<dyn Store>,
    prefix: &str,
    lock: impl AsyncFnOnce(&str) -> T,
    mut blocked: impl AsyncFnMut() -> bool,
    kill: impl AsyncFnOnce(),
    unlock: impl AsyncFnOnce(T),
) {
    let scope = idempotent_runtime::testing::conformance::unique_scope(prefix);
    let h = Idempotency::new(scope.clone())
        .shared_store(store.clone())
        .lease(Duration::from_secs(10));
    // a released record, then a transaction that locks its row
    let k = RecordKey::new(&scope, "m-1").unwrap();
    let t = acquire(&*store, &req(&k, TTL)).await;
    store.release(&Release { key: &k, token: t }).await.unwrap();
    let locked = lock(&scope).await;
    let runs = Arc::new(AtomicU32::new(0));
    let delivery = {
        let h = h.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            h.run("m-1", async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, Error>(1)
            })
            .await
        })
    };
    // wait until the claim blocks on the row lock, then kill its connection
    let mut waited = 0;
    while !blocked().await {
        waited += 1;
        assert!(waited < 200, "the claim never blocked on the row lock");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    kill().await;
    match delivery.await.unwrap() {
        Err(Error::Store(e)) => assert!(e.is_retryable(), "{e:?}"),
        other => panic!("expected a fail-closed store error, got {other:?}"),
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the body ran without a claim"
    );
    unlock(locked).await;
    // the same store, a new connection
    let r: Result<u32, Error> = h.run("m-1", async { Ok(2) }).await;
    assert_eq!(r.unwrap(), 2);
    let r: Result<u32, Error> = h.run("m-1", async { Ok(3) }).await;
    assert_eq!(r.unwrap(), 2, "the duplicate replays");
}

/// `expired` expired rows are already in `store`'s table: `purge_expired` deletes
/// exactly those (in batches) and leaves live records alone; then the sweeper that
/// `spawn_sweeper` starts purges a record whose ttl ran out. `count_short` counts the
/// rows of the scope `short` in the table.
pub async fn purge_and_sweep<S, C, F>(
    store: &dyn Store,
    expired: u64,
    spawn_sweeper: S,
    mut count_short: C,
) where
    S: FnOnce(Duration) -> tokio::task::JoinHandle<()>,
    C: FnMut() -> F,
    F: Future<Output = i64>,
{
    let live: Vec<RecordKey> = (0..10)
        .map(|i| RecordKey::new("live", &i.to_string()).unwrap())
        .collect();
    for k in &live {
        acquire(store, &req(k, TTL)).await;
    }
    assert_eq!(admin(store).purge_expired().await.unwrap(), expired);
    assert_eq!(admin(store).purge_expired().await.unwrap(), 0);
    for k in &live {
        assert!(admin(store).inspect(k).await.unwrap().is_some());
    }

    // the sweeper purges records whose ttl ran out
    let k = RecordKey::new("short", "k").unwrap();
    let short = ClaimRequest {
        key: &k,
        lease: Duration::from_millis(50),
        ttl: Duration::from_millis(50),
        fingerprint: None,
        max_attempts: None,
    };
    acquire(store, &short).await;
    let sweeper = spawn_sweeper(Duration::from_millis(50));
    let mut left = 1;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = count_short().await;
        if left == 0 {
            break;
        }
    }
    sweeper.abort();
    assert_eq!(left, 0, "the sweeper did not purge the expired record");
}

/// [`purge_and_sweep`] on a table of its own: `table` (its name quoted, created by
/// `store`) gets 2500 expired rows, whose message ids `ids_from` gives as the end of a
/// `SELECT` (`seq FROM seq_1_to_2500`), and is dropped at the end. `exec` runs a
/// statement and `count` a `COUNT(*)` on another connection.
pub async fn purge_and_sweep_table<S>(
    store: &dyn Store,
    spawn_sweeper: S,
    table: &str,
    ids_from: &str,
    exec: impl AsyncFn(&str),
    count: impl AsyncFn(&str) -> i64,
) where
    S: FnOnce(Duration) -> tokio::task::JoinHandle<()>,
{
    exec(&format!(
        "INSERT INTO {table} \
         (scope, status, retry_times, owner_token, lease_until_us, expires_at_us, message_id) \
         SELECT 's', 1, 1, 1, NULL, 1, {ids_from}"
    ))
    .await;
    let count_short = format!("SELECT COUNT(*) FROM {table} WHERE scope = 'short'");
    purge_and_sweep(store, 2500, spawn_sweeper, || count(&count_short)).await;
    exec(&format!("DROP TABLE {table}")).await;
}

/// [`conformance::race_two_stores`](crate::stores::race_two_stores) with the SQL
/// tests' lease of 10 s.
pub async fn race_two_stores(a: Arc<dyn Store>, b: Arc<dyn Store>, keys: usize, tasks: usize) {
    crate::stores::race_two_stores("sql-race", Duration::from_secs(10), a, b, keys, tasks).await;
}

/// A failing message delivered alternately through two stores: the attempt count is
/// shared, so after `max_attempts` failures both stores refuse it with
/// `AttemptsExhausted`, and the body ran exactly `max_attempts` times. Concurrent
/// deliveries of several such keys run at once.
pub async fn poison_is_shared(a: Arc<dyn Store>, b: Arc<dyn Store>, max_attempts: u32) {
    let scope = idempotent_runtime::testing::conformance::unique_scope("sql-poison");
    let make = |s: &Arc<dyn Store>| {
        Idempotency::new(scope.clone())
            .shared_store(s.clone())
            .lease(Duration::from_secs(10))
            .ttl(Duration::from_secs(120))
            .max_attempts(max_attempts)
    };
    let handlers = [make(&a), make(&b)];
    let keys = 8;
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..keys).map(|_| AtomicU32::new(0)).collect());
    let mut jobs = Vec::new();
    for k in 0..keys {
        let handlers = handlers.clone();
        let runs = runs.clone();
        jobs.push(tokio::spawn(async move {
            let id = format!("poison-{k}");
            let mut exhausted = 0;
            // more deliveries than attempts, alternating stores, some concurrently refused
            for d in 0..(max_attempts as usize * 3) {
                let r: Result<(), Error> = handlers[d % 2]
                    .run(id.as_str(), async {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        Err(Error::MissingKey)
                    })
                    .await;
                match r {
                    Err(Error::MissingKey) => {}
                    Err(Error::AttemptsExhausted { attempts }) => {
                        assert_eq!(attempts, max_attempts);
                        exhausted += 1;
                    }
                    other => panic!("key {k}: unexpected {other:?}"),
                }
            }
            exhausted
        }));
    }
    for (k, j) in join_all(jobs).await.into_iter().enumerate() {
        let exhausted = j.expect("task");
        assert_eq!(exhausted, max_attempts as usize * 2, "key {k}");
        assert_eq!(runs[k].load(Ordering::SeqCst), max_attempts, "key {k}");
    }
}

/// Keys full of SQL metacharacters, non-UTF-8 bytes and 100 KB lengths are data: each
/// is its own record (no two collide, no wildcard matches another), and each replays
/// its own output.
pub async fn sql_keys_are_data(store: Arc<dyn Store>) {
    let scope = idempotent_runtime::testing::conformance::unique_scope("sql-keys");
    let long_a = vec![b'\''; 100 * 1024];
    let mut long_b = long_a.clone();
    long_b[50_000] = b'%';
    let keys: Vec<Vec<u8>> = vec![
        b"'".to_vec(),
        b"''".to_vec(),
        b"' OR '1'='1".to_vec(),
        b"x'; DROP TABLE message_idempotent; --".to_vec(),
        b"--".to_vec(),
        b"/*".to_vec(),
        b"%".to_vec(),
        b"a%".to_vec(),
        b"ab".to_vec(),
        b"_".to_vec(),
        b"a_".to_vec(),
        b"\\".to_vec(),
        b"\\'".to_vec(),
        b"\\0".to_vec(),
        b"\"".to_vec(),
        b"`".to_vec(),
        b"?".to_vec(),
        b"$1".to_vec(),
        b";".to_vec(),
        b"a\nb".to_vec(),
        b"a ".to_vec(),
        b"a".to_vec(),
        b"A".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x80],
        vec![0xc3, 0x28],
        vec![0x00],
        vec![0x00, 0x00],
        "é".as_bytes().to_vec(),
        "e\u{301}".as_bytes().to_vec(),
        long_a,
        long_b,
    ];
    let rks: Vec<RecordKey> = keys
        .iter()
        .map(|k| RecordKey::new(&scope, k.as_slice()).expect("key"))
        .collect();
    for (i, k) in rks.iter().enumerate() {
        let r = req(k, Duration::from_secs(30));
        let token = match store.claim(&r).await.expect("claim") {
            ClaimOutcome::Acquired { token, attempt: 1 } => token,
            other => panic!(
                "key #{i} {:?}: expected a fresh claim, got {other:?}",
                keys[i]
            ),
        };
        let out = format!("out-{i}");
        let fence = store
            .complete(&Completion {
                key: k,
                token,
                output: Some(out.as_bytes()),
                ttl: TTL,
            })
            .await
            .expect("complete");
        assert_eq!(fence, Fence::Held);
    }
    for (i, k) in rks.iter().enumerate() {
        match store
            .claim(&req(k, Duration::from_secs(30)))
            .await
            .expect("claim")
        {
            ClaimOutcome::Completed { output } => {
                assert_eq!(output.as_deref(), Some(format!("out-{i}").as_bytes()))
            }
            other => panic!("key #{i}: expected Completed, got {other:?}"),
        }
        let rec = admin(&*store)
            .inspect(k)
            .await
            .expect("inspect")
            .expect("record");
        assert_eq!(rec.output.as_deref(), Some(format!("out-{i}").as_bytes()));
    }
    // forgetting one metacharacter key leaves its look-alikes alone
    assert!(admin(&*store).forget(&rks[6]).await.expect("forget"));
    assert!(
        admin(&*store)
            .inspect(&rks[6])
            .await
            .expect("inspect")
            .is_none()
    );
    for (i, k) in rks.iter().enumerate().filter(|(i, _)| *i != 6) {
        assert!(
            admin(&*store).inspect(k).await.expect("inspect").is_some(),
            "key #{i} was removed with key #6"
        );
    }
}

/// Corruptions every SQL store must refuse, as `SET` clauses valid on all three
/// databases: values the stores never write in each column they read.
pub const CORRUPTIONS: &[&str] = &[
    "lease_until_us = -9223372036854775808",
    "expires_at_us = -9223372036854775808",
    "lease_until_us = 9223372036854775807",
    "expires_at_us = 9223372036854775807",
    "status = 7",
    "status = -1",
    "retry_times = -1",
    "retry_times = 2147483647",
    "owner_token = -5",
    "owner_token = 9223372036854775807",
];

/// Regression: a row holding a value the store never writes (a lease or expiry of
/// `i64::MIN` or `i64::MAX`, a status other than 0 or 1, a negative or overflowing
/// attempt count or token, and whatever else `corruptions` lists) made claims loop
/// until "the record changed under every claim attempt" (a retryable error, so the
/// message was redelivered forever), or made MariaDB's claim procedure take the row
/// over and then fail, leaving it claimed with an attempt used. Every step on such a
/// record (claim, complete, release, renew, inspect and the batches) must now fail with
/// a non-retryable `Corrupt` error that names the record's scope, and leave the row as
/// it was.
///
/// `set(scope, clause)` runs `UPDATE <table> SET <clause> WHERE scope = <scope>` on
/// another connection; `snapshot(scope)` returns the row's columns as text.
pub async fn corrupt_records_are_refused_unchanged(
    shared: Arc<dyn Store>,
    prefix: &str,
    corruptions: &[&str],
    set: impl AsyncFn(&str, &str),
    snapshot: impl AsyncFn(&str) -> String,
) {
    let store = &*shared;
    for (n, clause) in corruptions.iter().enumerate() {
        let scope =
            idempotent_runtime::testing::conformance::unique_scope(&format!("{prefix}-{n}"));
        let k = RecordKey::new(&scope, "m-1").unwrap();
        let token = acquire(store, &req(&k, TTL)).await;
        // a released record: a claim would take it over
        assert_eq!(
            store.release(&Release { key: &k, token }).await.unwrap(),
            Fence::Held
        );
        // the claim that owns it now, whose steps must also see the corruption
        let token = acquire(store, &req(&k, TTL)).await;
        set(&scope, clause).await;
        let before = snapshot(&scope).await;
        let check = |step: &str, e: idempotent_runtime::StoreError| {
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{clause}: {step}: {e:?}");
            assert!(!e.is_retryable(), "{clause}: {step}");
            assert!(
                e.to_string().contains(&scope),
                "{clause}: {step}: the error names the scope: {e}"
            );
        };
        check("claim", store.claim(&req(&k, TTL)).await.unwrap_err());
        // a batch with a corrupt record fails as a whole and claims nothing
        let fresh = RecordKey::new(&scope, "fresh").unwrap();
        check(
            "claim_batch",
            store
                .claim_batch(&[req(&fresh, TTL), req(&k, TTL)])
                .await
                .unwrap_err(),
        );
        assert!(
            admin(store).inspect(&fresh).await.unwrap().is_none(),
            "{clause}: the batch claimed another key"
        );
        check("inspect", admin(store).inspect(&k).await.unwrap_err());
        let completion = Completion {
            key: &k,
            token,
            output: Some(b"1"),
            ttl: TTL,
        };
        check("complete", store.complete(&completion).await.unwrap_err());
        check(
            "complete_batch",
            store.complete_batch(&[completion]).await.unwrap_err(),
        );
        let release = Release { key: &k, token };
        check("release", store.release(&release).await.unwrap_err());
        check(
            "release_batch",
            store.release_batch(&[release]).await.unwrap_err(),
        );
        check("renew", store.renew(&k, token, TTL).await.unwrap_err());
        // the protocol: a non-retryable store error, the body does not run
        let h = Idempotency::new(scope.clone()).shared_store(shared.clone());
        let runs = AtomicU32::new(0);
        let r: Result<u32, Error> = h
            .run("m-1", async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await;
        match r {
            Err(Error::Store(e)) => check("run", e),
            other => panic!("{clause}: expected a Corrupt store error, got {other:?}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0, "{clause}: the body ran");
        assert_eq!(snapshot(&scope).await, before, "{clause}: the row changed");
    }
}

/// Regression: a completion applied by the store whose reply was lost is retried
/// with the same token; the store answered `Lost` (the record was already Completed,
/// by this very claim), and the protocol reported a take-over that never happened. A
/// completion that finds the record Completed by its own claim is `Held`, alone or in
/// a batch (also a key repeated in one batch); any other token, and a record that is
/// not Completed, is still `Lost`.
pub async fn repeated_completion_by_the_same_claim_is_held(store: &dyn Store) {
    let scope = idempotent_runtime::testing::conformance::unique_scope("sql-complete-again");
    let keys: Vec<RecordKey> = (0..4)
        .map(|i| RecordKey::new(&scope, &format!("m-{i}")).unwrap())
        .collect();
    let mut tokens = Vec::new();
    for k in &keys {
        tokens.push(acquire(store, &req(k, TTL)).await);
    }
    let completion = |i: usize, token| Completion {
        key: &keys[i],
        token,
        output: Some(b"7"),
        ttl: TTL,
    };
    assert_eq!(
        store.complete(&completion(0, tokens[0])).await.unwrap(),
        Fence::Held
    );
    // the same completion again (its first reply lost)
    assert_eq!(
        store.complete(&completion(0, tokens[0])).await.unwrap(),
        Fence::Held
    );
    // another token: Lost
    let other = idempotent_runtime::Token::new(tokens[0].get() + 1);
    assert_eq!(
        store.complete(&completion(0, other)).await.unwrap(),
        Fence::Lost
    );
    // batches: an item completed before, a fresh one, the fresh one repeated, a stale
    // token, and a key released (not Completed) by its own claim
    store.complete(&completion(1, tokens[1])).await.unwrap();
    store
        .release(&Release {
            key: &keys[3],
            token: tokens[3],
        })
        .await
        .unwrap();
    let batch = [
        completion(1, tokens[1]),
        completion(2, tokens[2]),
        completion(2, tokens[2]),
        completion(1, idempotent_runtime::Token::new(tokens[1].get() + 1)),
        completion(3, tokens[3]),
    ];
    assert_eq!(
        store.complete_batch(&batch).await.unwrap(),
        vec![
            Fence::Held,
            Fence::Held,
            Fence::Held,
            Fence::Lost,
            Fence::Lost
        ]
    );
    for (i, k) in keys.iter().enumerate().take(3) {
        match store.claim(&req(k, TTL)).await.unwrap() {
            ClaimOutcome::Completed { output } => assert_eq!(output.as_deref(), Some(&b"7"[..])),
            other => panic!("key {i}: expected Completed, got {other:?}"),
        }
    }
    assert_eq!(
        admin(store).inspect(&keys[3]).await.unwrap().unwrap().state,
        idempotent_runtime::store::RecordState::Released
    );
}

/// Regression: connecting to a port nothing listens on took the pool's acquire
/// timeout (30 s) and said only "pool timed out while waiting for an open
/// connection". `connect` must fail well under a second, with kind `Unavailable` and
/// the refused connection in its error chain.
pub async fn refused_connection_fails_fast<T: std::fmt::Debug>(
    connect: impl Future<Output = Result<T, idempotent_runtime::StoreError>>,
) {
    let started = std::time::Instant::now();
    let e = connect.await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "connect took {took:?}: {e}");
    assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e:?}");
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(
        chain.to_lowercase().contains("refused"),
        "the cause is in the error chain: {chain}"
    );
}

/// Takes every connection of a pool (`size` of them) with `take`, which answers the
/// connection and its server-side id, lets them go back idle (`idle` counts the idle
/// ones), then kills each from another connection with `kill`: the pool then holds dead
/// connections it has not noticed.
pub async fn kill_idle_connections<C>(
    size: u32,
    take: impl AsyncFn() -> (C, String),
    idle: impl Fn() -> usize,
    kill: impl AsyncFn(String),
) {
    let mut held = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..size.max(1) {
        let (conn, id) = take().await;
        held.push(conn);
        ids.push(id);
    }
    let n = held.len();
    drop(held);
    // back in the pool (after sqlx's ping on release) before they are killed
    for _ in 0..200 {
        if idle() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in ids {
        kill(id).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Delivers `key` (body answering `value`) until it succeeds, at most 12 times, each
/// failure a retryable store error: the answer and how many times the body ran.
async fn deliver_until_ok(h: &Idempotency, key: &str, value: u32) -> (u32, u32) {
    let runs = AtomicU32::new(0);
    for _ in 0..12 {
        let r: Result<u32, Error> = h
            .run(key, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(value)
            })
            .await;
        match r {
            Ok(v) => return (v, runs.into_inner()),
            Err(Error::Store(e)) => assert!(e.is_retryable(), "{e:?}"),
            Err(e) => panic!("expected a retryable store error, got {e:?}"),
        }
    }
    panic!("the store never recovered");
}

/// Connections killed while idle in a pool that does not ping them before use (as
/// `connect` makes it): a completion that meets one is retried on a fresh connection
/// and recorded (never lost, never a hang), and a claim that meets one fails closed
/// with a retryable error; the store then works on new connections. `single` is a
/// store on a one-connection pool, `pooled` one from `connect`; `kill_single` and
/// `kill_pooled` kill the idle connections of their pools.
pub async fn killed_idle_connections_are_replaced(
    case: &str,
    single: Arc<dyn Store>,
    kill_single: impl AsyncFn(),
    pooled: Arc<dyn Store>,
    kill_pooled: impl AsyncFn(),
) {
    // one connection, killed while the body runs: the completion meets it
    let h = Idempotency::new(idempotent_runtime::testing::conformance::unique_scope(case))
        .shared_store(single)
        .lease(Duration::from_secs(10));
    let r: Result<u32, Error> = h
        .run("a", async {
            kill_single().await;
            Ok(2)
        })
        .await;
    assert_eq!(r.unwrap(), 2);
    assert_eq!(
        deliver_until_ok(&h, "a", 3).await,
        (2, 0),
        "the completion was recorded"
    );

    // the pool of `connect`, killed between deliveries: claims may fail closed,
    // retryably, then work
    let h = Idempotency::new(idempotent_runtime::testing::conformance::unique_scope(case))
        .shared_store(pooled)
        .lease(Duration::from_secs(10));
    assert_eq!(deliver_until_ok(&h, "b", 4).await, (4, 1));
    kill_pooled().await;
    assert_eq!(deliver_until_ok(&h, "c", 5).await, (5, 1));
    assert_eq!(deliver_until_ok(&h, "b", 6).await, (4, 0));
}
