//! `RedisStore` on a Redis Cluster of three masters that the test starts on free
//! loopback ports (and kills afterwards, also when a check fails): the conformance
//! suite, batches spanning many slots, records spread over every node, and two stores
//! racing.
#![cfg(feature = "redis")]

use idempotent_runtime::redis;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Release};
use idempotent_runtime::testing::conformance::{run_all, unique_scope};
use idempotent_runtime::{RecordKey, RedisStore, Store};
use idempotent_tests::redis_support::{RedisCluster, race_two_stores, raw};
use std::sync::Arc;
use std::time::Duration;

async fn cluster_store(urls: &[String]) -> RedisStore {
    RedisStore::connect_cluster(urls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster {urls:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let store = cluster_store(&urls).await;
    assert!(store.is_cluster());

    {
        let store = store.clone();
        run_all(move || {
            let s = store.clone();
            async move { Arc::new(s) as Arc<dyn Store> }
        })
        .await;
    }

    batches_span_slots_and_nodes(&cluster, &store).await;

    eprintln!("cluster: two stores racing");
    let other = cluster_store(&urls).await;
    race_two_stores(Arc::new(store), Arc::new(other), 100, 6).await;
}

/// One batch over 300 keys (hundreds of slots on three nodes): every step gives one
/// answer per item in order, and the records land on every node (no hash tag pins
/// them to one slot).
async fn batches_span_slots_and_nodes(cluster: &RedisCluster, store: &RedisStore) {
    eprintln!("cluster: batches across slots");
    let scope = unique_scope("cluster-batch");
    let keys: Vec<RecordKey> = (0..300)
        .map(|i| RecordKey::new(&scope, &format!("{{order}}-{i}")).unwrap())
        .collect();
    let reqs: Vec<ClaimRequest<'_>> = keys
        .iter()
        .map(|k| ClaimRequest {
            key: k,
            lease: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            fingerprint: None,
            max_attempts: None,
        })
        .collect();
    let tokens: Vec<_> = store
        .claim_batch(&reqs)
        .await
        .unwrap()
        .into_iter()
        .map(|o| match o {
            ClaimOutcome::Acquired { token, attempt: 1 } => token,
            other => panic!("expected Acquired, got {other:?}"),
        })
        .collect();
    let outputs: Vec<String> = (0..keys.len()).map(|i| format!("o{i}")).collect();
    let completions: Vec<Completion<'_>> = keys
        .iter()
        .zip(&tokens)
        .zip(&outputs)
        .take(150)
        .map(|((k, t), o)| Completion {
            key: k,
            token: *t,
            output: Some(o.as_bytes()),
            ttl: Duration::from_secs(60),
        })
        .collect();
    assert!(
        store
            .complete_batch(&completions)
            .await
            .unwrap()
            .iter()
            .all(|f| *f == Fence::Held)
    );
    let releases: Vec<Release<'_>> = keys
        .iter()
        .zip(&tokens)
        .map(|(k, t)| Release { key: k, token: *t })
        .collect();
    let fences = store.release_batch(&releases).await.unwrap();
    assert!(fences[..150].iter().all(|f| *f == Fence::Lost));
    assert!(fences[150..].iter().all(|f| *f == Fence::Held));
    let again = store.claim_batch(&reqs).await.unwrap();
    for (i, o) in again.into_iter().enumerate() {
        if i < 150 {
            assert_eq!(
                o,
                ClaimOutcome::Completed {
                    output: Some(outputs[i].clone().into_bytes())
                }
            );
        } else {
            assert!(
                matches!(o, ClaimOutcome::Acquired { attempt: 2, .. }),
                "{o:?}"
            );
        }
    }
    for node in cluster.nodes() {
        let mut conn = raw(&node.url()).await;
        let n: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert!(n >= 30, "node {} holds only {n} records", node.url());
    }
}
