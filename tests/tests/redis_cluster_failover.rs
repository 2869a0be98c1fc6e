//! A Redis Cluster of three masters with one replica each, and a `CLUSTER FAILOVER`
//! (a replica takes its master's slots over) while a store with replica
//! acknowledgement runs deliveries: deliveries that meet the failover fail closed (and
//! are delivered again) or are retried by the driver, every key's handler runs exactly
//! once, and duplicates after
//! the failover are answered from their records on the promoted replica.
#![cfg(feature = "redis")]

use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{Error, Idempotency, RedisStore, ReplicaAck};
use idempotent_tests::redis_ha_support::{cli, replication_field, wait_until};
use idempotent_tests::redis_support::RedisServer;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn role(port: u16) -> String {
    cli(port, &["ROLE"])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_during_deliveries_runs_every_handler_once() {
    let nodes: Vec<RedisServer> = (0..6)
        .map(|_| {
            RedisServer::start_with(&[
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ])
        })
        .collect();
    let mut create = Command::new("redis-cli");
    create.args(["--cluster", "create"]);
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port()));
    }
    let out = create
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("the cluster failover test needs `redis-cli` on PATH: {e}"));
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for n in &nodes {
        let port = n.port();
        wait_until("cluster_state:ok", Duration::from_secs(30), || {
            cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
        });
    }
    let replicas: Vec<u16> = nodes
        .iter()
        .map(RedisServer::port)
        .filter(|p| role(*p) == "slave")
        .collect();
    assert_eq!(replicas.len(), 3, "one replica per master");
    for &port in &replicas {
        wait_until(
            "every replica's link is up",
            Duration::from_secs(20),
            || replication_field(port, "master_link_status").as_deref() == Some("up"),
        );
    }

    let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
    let store = RedisStore::connect_cluster(&urls)
        .await
        .expect("connect to the cluster")
        .with_replica_ack(ReplicaAck::new(1, Duration::from_millis(200)));
    let h = Idempotency::new(unique_scope("cluster-failover"))
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
    let retried = Arc::new(AtomicU32::new(0));
    // delivers `key` until it succeeds (a store error means the handler did not run)
    let deliver_until_ok = |key: String| {
        let deliver = &deliver;
        let retried = retried.clone();
        async move {
            let started = Instant::now();
            loop {
                match deliver(key.clone()).await {
                    Ok(_) => return,
                    // a claim whose acknowledgement failed holds the key until its
                    // lease ends: the redelivery waits (in progress)
                    Err(e @ (Error::Store(_) | Error::InProgress { .. })) if e.is_retryable() => {
                        assert!(
                            started.elapsed() < Duration::from_secs(20),
                            "{key} failed for 20 s: {e:?}"
                        );
                        retried.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("{key}: {e:?}"),
                }
            }
        }
    };

    for i in 0..60 {
        deliver_until_ok(format!("before-{i}")).await;
    }
    let promoted = replicas[0];
    let answer = cli(promoted, &["CLUSTER", "FAILOVER"]);
    assert!(
        answer.contains("OK"),
        "CLUSTER FAILOVER answered {answer:?}"
    );
    // deliveries while the replica takes over
    for i in 0..60 {
        deliver_until_ok(format!("during-{i}")).await;
    }
    wait_until("the replica is a master", Duration::from_secs(20), || {
        role(promoted) == "master"
    });
    for i in 0..60 {
        deliver_until_ok(format!("after-{i}")).await;
    }
    for i in 0..60 {
        deliver_until_ok(format!("before-{i}")).await;
    }

    println!(
        "deliveries failed closed and delivered again around the failover: {}",
        retried.load(Ordering::SeqCst)
    );
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 180);
    for (key, n) in runs.iter() {
        assert_eq!(*n, 1, "{key} ran {n} times");
    }
}
