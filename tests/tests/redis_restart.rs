//! A Redis server killed while handlers run, then restarted on the same port: handlers
//! fail closed while it is down (their bodies do not run), no key is Completed whose
//! body did not finish, and the same `RedisStore` works again once the server is back,
//! without being created anew.
#![cfg(feature = "redis")]

use futures_util::future::join_all;
use idempotent_runtime::store::RecordState;
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{Error, Idempotency, OnInProgress, RedisStore};
use idempotent_tests::redis_support::RedisServer;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

const KEYS: usize = 150;

struct Marks {
    started: Vec<AtomicBool>,
    finished: Vec<AtomicBool>,
    runs: Vec<AtomicU32>,
}

async fn deliver(h: Idempotency, marks: Arc<Marks>, i: usize) -> Result<u64, Error> {
    let id = format!("m-{i}");
    h.run(id.as_str(), async {
        marks.started[i].store(true, Ordering::SeqCst);
        marks.runs[i].fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
        marks.finished[i].store(true, Ordering::SeqCst);
        Ok(i as u64)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_fails_closed_and_the_same_store_reconnects_after_restart() {
    // the append-only file (fsync on every write) keeps every acknowledged record
    // across the kill, so the records can be checked after the restart
    let mut server = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]);
    let store = Arc::new(
        RedisStore::connect(&server.url())
            .await
            .expect("connect to the private server"),
    );
    let h = Idempotency::new(unique_scope("restart"))
        .shared_store(store.clone())
        .lease(Duration::from_secs(2))
        .ttl(Duration::from_secs(300));
    let marks = Arc::new(Marks {
        started: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
        finished: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
        runs: (0..KEYS).map(|_| AtomicU32::new(0)).collect(),
    });

    // phase 1: deliveries start every 4 ms; the server dies after 300 ms
    let jobs: Vec<_> = (0..KEYS)
        .map(|i| {
            let h = h.clone();
            let marks = marks.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(4 * i as u64)).await;
                deliver(h, marks, i).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    let results: Vec<Result<u64, Error>> = join_all(jobs)
        .await
        .into_iter()
        .map(|j| j.expect("task"))
        .collect();

    let mut ok = 0;
    let mut failed_closed = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(v) => {
                assert_eq!(*v, i as u64);
                assert!(marks.finished[i].load(Ordering::SeqCst));
                ok += 1;
            }
            Err(Error::Store(e)) => {
                assert!(e.is_retryable(), "store error while down is retryable: {e}");
                assert!(
                    !marks.started[i].load(Ordering::SeqCst),
                    "delivery {i} failed with a store error but its body ran"
                );
                failed_closed += 1;
            }
            Err(other) => panic!("delivery {i}: unexpected {other} ({other:?})"),
        }
    }
    assert!(ok > 10, "only {ok} deliveries finished before the kill");
    assert!(
        failed_closed > 10,
        "only {failed_closed} deliveries hit the dead server"
    );

    // while the server stays down, a delivery fails closed quickly instead of
    // holding its message
    let probe_started = Instant::now();
    let down = deliver(h.clone(), marks.clone(), 0).await;
    assert!(matches!(down, Err(Error::Store(_))), "{down:?}");
    assert!(
        probe_started.elapsed() < Duration::from_secs(3),
        "a delivery took {:?} to fail while the server was down",
        probe_started.elapsed()
    );

    // restart on the same port; the same store reconnects by itself
    server.restart();
    let probe = h.record_key("m-0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.inspect(&probe).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the store did not reconnect within 20 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // no key is Completed whose body did not finish
    let mut completed = Vec::new();
    for (i, finished) in marks.finished.iter().enumerate() {
        let k = h.record_key(format!("m-{i}").as_str()).unwrap();
        let rec = store.inspect(&k).await.expect("inspect after restart");
        if let Some(rec) = rec.filter(|r| r.state == RecordState::Completed) {
            assert!(
                finished.load(Ordering::SeqCst),
                "key {i} is Completed but its body never finished"
            );
            assert_eq!(rec.output.as_deref(), Some(i.to_string().as_bytes()));
            completed.push(i);
        }
    }
    assert!(
        completed.len() >= ok / 2,
        "only {} of {ok} finished deliveries survived the restart as Completed",
        completed.len()
    );

    // phase 2: every message is delivered again through the same store; completed
    // keys replay without running, the others run (waiting out a lease cut short by
    // the kill)
    let runs_before: Vec<u32> = marks
        .runs
        .iter()
        .map(|r| r.load(Ordering::SeqCst))
        .collect();
    let h2 = h.clone().on_in_progress(OnInProgress::Wait);
    let jobs: Vec<_> = (0..KEYS)
        .map(|i| tokio::spawn(deliver(h2.clone(), marks.clone(), i)))
        .collect();
    for (i, j) in join_all(jobs).await.into_iter().enumerate() {
        match j.expect("task") {
            Ok(v) => assert_eq!(v, i as u64),
            Err(e) => panic!("redelivery {i} after the restart failed: {e} ({e:?})"),
        }
    }
    for &i in &completed {
        assert_eq!(
            marks.runs[i].load(Ordering::SeqCst),
            runs_before[i],
            "completed key {i} ran again"
        );
    }
    for (i, finished) in marks.finished.iter().enumerate() {
        assert!(finished.load(Ordering::SeqCst), "key {i} never ran");
    }
}
