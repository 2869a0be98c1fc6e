//! The `idempotent` binary against a Redis Cluster of three masters the test starts on
//! free loopback ports: scans go master by master, and every command works through
//! `redis+cluster://` and through a list of nodes; keys that are not records are counted
//! on every master.
#![cfg(feature = "redis")]

mod support;

use idempotent_runtime::RedisStore;
use idempotent_runtime::redis::{self, AsyncCommands};
use idempotent_tests::redis_support::RedisCluster;
use support::{FOUND, Target, check_every_command, seed, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_on_a_cluster() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let store = RedisStore::connect_cluster(&urls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster {urls:?}: {e}"));
    let hosts: Vec<String> = urls
        .iter()
        .map(|u| {
            u.trim_start_matches("redis://")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    // records of many scopes land on every master; a scan must visit them all
    let scope = unique("orders-");
    let seeded = seed(&store, &scope).await;
    let target = Target {
        global: vec!["--store".into(), url],
        sql: false,
    };
    check_every_command(&target, &store, &seeded).await;

    let list = Target {
        global: vec!["--store".into(), urls.join(",")],
        sql: false,
    };
    let r = list
        .run(&["--format", "json", "list", "--scope", &scope])
        .expect(FOUND);
    assert_eq!(r.json().len(), 6, "{}", r.stdout);
    let stats = list
        .run(&["--format", "json", "stats", "--scope", &scope])
        .expect(FOUND)
        .json();
    assert_eq!(
        stats
            .iter()
            .map(|v| v["count"].as_u64().unwrap())
            .sum::<u64>(),
        6
    );

    // another program's keys under the prefix, on every master: all counted
    let mut conn = redis::cluster::ClusterClient::new(urls.clone())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    for i in 0..12 {
        let _: () = conn
            .set(format!("idem:cache-{i}"), "not a record")
            .await
            .unwrap();
    }
    let all = target
        .run(&["--format", "json", "stats"])
        .expect(FOUND)
        .json();
    assert_eq!(all.last(), Some(&serde_json::json!({ "skipped": 12 })));
    let r = list.run(&["list"]).expect(FOUND);
    assert!(
        r.stderr
            .contains("skipped 12 keys under the prefix `idem:` that are not records"),
        "{}",
        r.stderr
    );
}
