//! Redis replication under failover, on real processes: a master and a replica whose
//! replication link goes through a proxy the test cuts; the master is killed and the
//! replica promoted (`REPLICAOF NO ONE`).
//!
//! - Without replica acknowledgement, a key completed on the master after the cut runs
//!   its handler a second time after the promotion (Redis replicates asynchronously).
//! - With `min-replicas-to-write 1` on the master and `with_replica_ack`, the claim after
//!   the cut fails closed and nothing runs twice.
//! - With `with_replica_ack` alone, `WAIT` catches the claim after the cut, and a
//!   completion the replica did not get is reported as `NotReplicated`.
//! - The cost of `WAIT` per message on a local pair, printed.
#![cfg(feature = "redis")]

use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion, RecordState, StoreAdmin};
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{
    Error, Idempotency, RecordKey, RedisStore, ReplicaAck, Store, StoreErrorKind,
};
use idempotent_tests::redis_ha_support::{ProxiedPair, dbsize, start_replica};
use idempotent_tests::redis_support::RedisServer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts the runs of each key's handler.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<String, u32>>>);

impl Runs {
    fn get(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    async fn deliver(&self, h: &Idempotency, key: &str) -> Result<String, Error> {
        h.run(key, async {
            *self.0.lock().unwrap().entry(key.to_owned()).or_default() += 1;
            Ok(format!("done {key}"))
        })
        .await
    }
}

fn handler(scope: &str, store: RedisStore) -> Idempotency {
    Idempotency::new(scope.to_owned())
        .shared_store(Arc::new(store))
        .lease(Duration::from_secs(5))
        .ttl(Duration::from_secs(600))
}

async fn store_on(url: &str) -> RedisStore {
    RedisStore::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn store_error_kind(r: &Result<String, Error>) -> Option<StoreErrorKind> {
    match r {
        Err(Error::Store(e)) => Some(e.kind()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replica_ack_a_completion_lost_in_a_failover_runs_again() {
    let mut pair = ProxiedPair::start(&[]).await;
    let scope = unique_scope("replication-plain");
    let runs = Runs::default();
    let h = handler(&scope, store_on(&pair.master.url()).await);

    assert_eq!(runs.deliver(&h, "k1").await.unwrap(), "done k1");
    pair.wait_replica_keys(1).await; // k1's record (functions are not keys)
    pair.cut().await;
    assert_eq!(runs.deliver(&h, "k2").await.unwrap(), "done k2");
    assert_eq!(runs.get("k2"), 1);

    pair.fail_over();
    let h = handler(&scope, store_on(&pair.replica.url()).await);
    assert_eq!(runs.deliver(&h, "k1").await.unwrap(), "done k1");
    assert_eq!(runs.deliver(&h, "k2").await.unwrap(), "done k2");
    assert_eq!(runs.get("k1"), 1, "k1 replicated: answered from its record");
    assert_eq!(
        runs.get("k2"),
        2,
        "k2's completion existed on the lost master only: its handler ran again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_and_replica_ack_fail_the_claim_closed_and_nothing_runs_twice() {
    let mut pair = ProxiedPair::start(&[
        "--min-replicas-to-write",
        "1",
        "--min-replicas-max-lag",
        "10",
    ])
    .await;
    let scope = unique_scope("replication-acked");
    let runs = Runs::default();
    let store = store_on(&pair.master.url())
        .await
        .with_replica_ack(ReplicaAck::new(1, Duration::from_millis(200)));
    let h = handler(&scope, store);

    assert_eq!(runs.deliver(&h, "k1").await.unwrap(), "done k1");
    // acknowledged by the replica before the claim and the completion returned
    assert_eq!(dbsize(pair.replica.port()), 1);
    pair.cut().await;
    let r = runs.deliver(&h, "k2").await;
    assert_eq!(
        store_error_kind(&r),
        Some(StoreErrorKind::NotReplicated),
        "the claim fails closed: {r:?}"
    );
    assert!(r.as_ref().unwrap_err().is_retryable());
    assert_eq!(runs.get("k2"), 0, "k2's handler did not run");

    pair.fail_over();
    let h = handler(&scope, store_on(&pair.replica.url()).await);
    assert_eq!(runs.deliver(&h, "k1").await.unwrap(), "done k1");
    assert_eq!(runs.deliver(&h, "k2").await.unwrap(), "done k2");
    assert_eq!(runs.get("k1"), 1, "k1 answered from its record");
    assert_eq!(runs.get("k2"), 1, "k2 ran once, after the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_ack_alone_catches_an_unreplicated_claim_and_completion() {
    let mut pair = ProxiedPair::start(&[]).await;
    let scope = unique_scope("replication-wait");
    let runs = Runs::default();
    let store = store_on(&pair.master.url())
        .await
        .with_replica_ack(ReplicaAck::new(1, Duration::from_millis(100)));
    assert_eq!(
        store.replica_ack(),
        Some(ReplicaAck::new(1, Duration::from_millis(100)))
    );

    // a claim acknowledged before the cut, completed after it
    let k3 = RecordKey::new(&scope, "k3").unwrap();
    let acquired = store
        .claim(&ClaimRequest {
            key: &k3,
            lease: Duration::from_secs(5),
            ttl: Duration::from_secs(600),
            fingerprint: None,
            max_attempts: None,
        })
        .await
        .expect("claim acknowledged by the replica");
    let ClaimOutcome::Acquired { token, .. } = acquired else {
        panic!("expected Acquired, got {acquired:?}")
    };

    let h = handler(&scope, store.clone());
    assert_eq!(runs.deliver(&h, "k1").await.unwrap(), "done k1");
    pair.cut().await;

    // the claim of a new key runs on the master, but WAIT finds no replica: fail closed
    let started = Instant::now();
    let r = runs.deliver(&h, "k2").await;
    assert_eq!(
        store_error_kind(&r),
        Some(StoreErrorKind::NotReplicated),
        "{r:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "WAIT waited"
    );
    assert_eq!(runs.get("k2"), 0, "k2's handler did not run");

    // a batch of claims is acknowledged by one WAIT after it: refused as a whole
    let batch: Vec<RecordKey> = (0..3)
        .map(|i| RecordKey::new(&scope, &format!("b{i}")).unwrap())
        .collect();
    let reqs: Vec<ClaimRequest<'_>> = batch
        .iter()
        .map(|key| ClaimRequest {
            key,
            lease: Duration::from_secs(5),
            ttl: Duration::from_secs(600),
            fingerprint: None,
            max_attempts: None,
        })
        .collect();
    let e = store
        .claim_batch(&reqs)
        .await
        .expect_err("the batch's claims are not on the replica");
    assert_eq!(e.kind(), StoreErrorKind::NotReplicated, "{e}");

    // a completion recorded on the master only is reported, and is on the master
    let e = store
        .complete(&Completion {
            key: &k3,
            token,
            output: Some(b"\"out\""),
            ttl: Duration::from_secs(600),
        })
        .await
        .expect_err("the completion is not on the replica");
    assert_eq!(e.kind(), StoreErrorKind::NotReplicated, "{e}");
    let on_master = store.inspect(&k3).await.unwrap().expect("k3's record");
    assert_eq!(on_master.state, RecordState::Completed);

    // a duplicate of a completed key is answered whatever the acknowledgement
    assert_eq!(runs.deliver(&h, "k1").await.unwrap(), "done k1");
    assert_eq!(runs.get("k1"), 1);

    pair.fail_over();
    let promoted = store_on(&pair.replica.url()).await;
    let on_replica = promoted.inspect(&k3).await.unwrap().expect("k3's claim");
    assert_eq!(
        on_replica.state,
        RecordState::InProgress,
        "the completion the store reported as not replicated is lost"
    );
    let h = handler(&scope, promoted);
    assert_eq!(runs.deliver(&h, "k2").await.unwrap(), "done k2");
    assert_eq!(runs.get("k2"), 1, "k2 ran once, after the failover");
}

/// Time per message (claim, an empty handler, completion; one at a time) on a local
/// master and replica, without and with `WAIT 1`, printed; run with `--nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_ack_cost_per_message() {
    const MESSAGES: usize = 500;
    const ROUNDS: usize = 5;
    let master = RedisServer::start();
    let _replica = start_replica(master.port());
    let runs = Runs::default();
    let plain = store_on(&master.url()).await;
    let acked = plain
        .clone()
        .with_replica_ack(ReplicaAck::new(1, Duration::from_millis(100)));
    let mut figures: Vec<(&str, Vec<f64>)> = vec![("without", vec![]), ("with WAIT 1", vec![])];
    for round in 0..ROUNDS {
        for (i, store) in [&plain, &acked].into_iter().enumerate() {
            let scope = unique_scope(&format!("cost-{round}-{i}"));
            let h = handler(&scope, store.clone());
            let start = Instant::now();
            for m in 0..MESSAGES {
                runs.deliver(&h, &format!("{scope}-{m}")).await.unwrap();
            }
            figures[i]
                .1
                .push(start.elapsed().as_secs_f64() * 1e6 / MESSAGES as f64);
        }
    }
    assert!(runs.0.lock().unwrap().values().all(|n| *n == 1));
    assert_eq!(runs.0.lock().unwrap().len(), 2 * ROUNDS * MESSAGES);
    for (name, mut us) in figures {
        us.sort_by(f64::total_cmp);
        println!(
            "replica ack cost: {name}: median {:.0} µs per message (min {:.0}, max {:.0}; \
             {ROUNDS} rounds of {MESSAGES} messages, one replica on loopback)",
            us[ROUNDS / 2],
            us[0],
            us[ROUNDS - 1]
        );
    }
}
