//! A store connected through Redis Sentinel (`redis+sentinel://`) follows the master
//! across a failover, on real processes: one master, one replica, one Sentinel on
//! loopback ports. The master is killed; once Sentinel has promoted the replica, the
//! same store runs deliveries on the new master, and keys completed before the
//! failover (and replicated) are answered from their records.
#![cfg(feature = "redis")]

use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{Error, Idempotency, RedisStore};
use idempotent_tests::redis_ha_support::{Sentinel, cli, dbsize, start_replica, wait_until};
use idempotent_tests::redis_support::RedisServer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MASTER: &str = "idem-master";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_store_follows_the_master_after_a_failover() {
    let mut master = RedisServer::start();
    let replica = start_replica(master.port());
    let sentinel = Sentinel::start(MASTER, master.port(), Duration::from_millis(1000));
    let replica_port = replica.port().to_string();
    wait_until(
        "Sentinel knows the replica",
        Duration::from_secs(15),
        || {
            cli(sentinel.port(), &["SENTINEL", "REPLICAS", MASTER])
                .lines()
                .any(|l| l.trim() == replica_port)
        },
    );

    let url = format!("redis+sentinel://127.0.0.1:{}/{MASTER}", sentinel.port());
    let store = RedisStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect through {url}: {e}"));
    assert!(format!("{store:?}").contains("sentinel"), "{store:?}");
    let h = Idempotency::new(unique_scope("sentinel"))
        .shared_store(Arc::new(store))
        .lease(Duration::from_secs(5))
        .ttl(Duration::from_secs(600));
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let deliver = |key: String| {
        let h = h.clone();
        let runs = runs.clone();
        async move {
            h.run(key.as_str(), async {
                *runs.lock().unwrap().entry(key.clone()).or_default() += 1;
                Ok::<_, Error>(key.len())
            })
            .await
        }
    };

    for i in 0..20 {
        deliver(format!("before-{i}"))
            .await
            .expect("delivery before the failover");
    }
    wait_until(
        "the replica holds the 20 records",
        Duration::from_secs(10),
        || dbsize(replica.port()) == 20,
    );

    master.kill();
    let started = Instant::now();
    let mut failed = 0u32;
    loop {
        match deliver("after-0".to_owned()).await {
            Ok(_) => break,
            Err(Error::Store(e)) => {
                assert!(e.is_retryable(), "{e:?}");
                failed += 1;
            }
            Err(e) => panic!("unexpected error during the failover: {e:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no delivery succeeded within 20 s of the master's death; Sentinel log:\n{}",
            sentinel.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "the store followed the master after {:?} ({failed} deliveries failed closed meanwhile)",
        started.elapsed()
    );
    assert!(failed > 0, "deliveries failed while no master was known");
    assert_eq!(
        sentinel.master_port(MASTER),
        Some(replica.port()),
        "Sentinel promoted the replica"
    );

    for i in 1..20 {
        deliver(format!("after-{i}"))
            .await
            .expect("delivery after the failover");
    }
    for i in 0..20 {
        deliver(format!("before-{i}"))
            .await
            .expect("duplicate after the failover");
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 40);
    for (key, n) in runs.iter() {
        assert_eq!(*n, 1, "{key} ran {n} times");
    }
}
