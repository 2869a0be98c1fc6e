//! The `idempotent` binary against the shared Redis server (`IDEMPOTENT_REDIS_URL`,
//! default `redis://127.0.0.1:6379`), under a key prefix of its own: every command's
//! output and effect, and the errors for bad URLs and unreachable servers.
#![cfg(feature = "redis")]

mod support;

use idempotent_runtime::RedisStore;
use idempotent_runtime::redis::{self, AsyncCommands};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest};
use idempotent_runtime::{RecordKey, Store};
use std::time::Duration;
use support::{
    ERROR, FOUND, NOT_FOUND, Target, check_every_command, clean, refused_at_once, run, seed, unique,
};

fn url() -> String {
    std::env::var("IDEMPOTENT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test]
async fn every_command_on_redis() {
    let url = url();
    let prefix = unique("idem-cli-test:");
    let store = RedisStore::connect(url.as_str())
        .await
        .unwrap_or_else(|e| {
            panic!("the Redis tests need a server at {url} (set IDEMPOTENT_REDIS_URL): {e}")
        })
        .with_prefix(&prefix);
    let scope = unique("orders-");
    let seeded = seed(&store, &scope).await;
    let target = Target {
        global: vec![
            "--store".into(),
            url.clone(),
            "--prefix".into(),
            prefix.clone(),
        ],
        sql: false,
    };
    check_every_command(&target, &store, &seeded).await;

    // the record key as Redis holds it
    let r = target.run(&["key", &scope, "o-1"]);
    assert!(
        r.stdout
            .contains(&format!("redis key  {prefix}{}:{scope}:o-1", scope.len())),
        "{}",
        r.stdout
    );
    // Redis has no schema
    let r = target.run(&["migrate"]).expect(ERROR);
    assert!(r.stderr.contains("no schema"), "{}", r.stderr);
    // another prefix sees nothing
    run(&[
        "--store",
        &url,
        "--prefix",
        "idem-cli-test-none:",
        "list",
        "--scope",
        &scope,
    ])
    .expect(NOT_FOUND);
    clean(&store, &scope).await;
}

#[tokio::test]
async fn errors_say_what_to_fix() {
    let r = run(&["list"]).expect(ERROR);
    assert!(r.stderr.contains("IDEMPOTENT_STORE_URL"), "{}", r.stderr);
    let r = run(&["--store", "ftp://x", "list"]).expect(ERROR);
    assert!(
        r.stderr.contains("unsupported store URL scheme"),
        "{}",
        r.stderr
    );
    let r = run(&["--store", "127.0.0.1:6379", "list"]).expect(ERROR);
    assert!(r.stderr.contains("not a store URL"), "{}", r.stderr);
    let port = idempotent_tests::stores::free_port();
    let dead = format!("redis://:secret@127.0.0.1:{port}");
    let r = run(&["--store", &dead, "stats"]).expect(ERROR);
    assert!(r.stderr.contains("cannot reach Redis"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("secret"),
        "the password is not shown: {}",
        r.stderr
    );
    let r = run(&["key", "s", ""]).expect(ERROR);
    assert!(r.stderr.contains("empty"), "{}", r.stderr);
    let r = run(&["key", "s", "--hex", "zz"]).expect(ERROR);
    assert!(r.stderr.contains("not hex"), "{}", r.stderr);
    run(&["inspect", "s"]).expect(ERROR);
}

#[test]
fn a_refused_connection_fails_at_once() {
    let port = idempotent_tests::stores::free_port();
    let other = idempotent_tests::stores::free_port();
    refused_at_once(&format!("redis://127.0.0.1:{port}"));
    refused_at_once(&format!(
        "redis+cluster://127.0.0.1:{port},127.0.0.1:{other}"
    ));
    refused_at_once(&format!(
        "redis://127.0.0.1:{port},redis://127.0.0.1:{other}"
    ));
}

/// Keys under the prefix that are not records (another program's) are left out of
/// `list`, `stuck`, `poisoned` and `stats`, and counted: a sentence on stderr, and with
/// `--format json` a last line `{"skipped":N}`.
#[tokio::test]
async fn keys_that_are_not_records_are_counted() {
    let url = url();
    let prefix = unique("idem-cli-foreign:");
    let store = RedisStore::connect(url.as_str())
        .await
        .unwrap_or_else(|e| {
            panic!("the Redis tests need a server at {url} (set IDEMPOTENT_REDIS_URL): {e}")
        })
        .with_prefix(&prefix);
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // one record of `orders`, in progress
    let record = RecordKey::new("orders", "o-1").unwrap();
    let claim = ClaimRequest {
        key: &record,
        lease: Duration::from_secs(60),
        ttl: Duration::from_secs(600),
        fingerprint: None,
        max_attempts: None,
    };
    assert!(matches!(
        store.claim(&claim).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));
    // another program's keys: a name not in the records' layout, a hash, and a record's
    // name in the `orders` scope holding something else
    let foreign = [
        format!("{prefix}cache:user:7"),
        format!("{prefix}sessions"),
        format!("{prefix}6:orders:o-2"),
    ];
    let _: () = conn.set_ex(&foreign[0], "hello", 600).await.unwrap();
    let _: () = conn.hset(&foreign[1], "a", "b").await.unwrap();
    let _: () = conn.expire(&foreign[1], 600).await.unwrap();
    let _: () = conn.set_ex(&foreign[2], "not a record", 600).await.unwrap();

    let target = Target {
        global: vec![
            "--store".into(),
            url.clone(),
            "--prefix".into(),
            prefix.clone(),
        ],
        sql: false,
    };
    let three = format!("skipped 3 keys under the prefix `{prefix}` that are not records");
    let one = format!("skipped 1 key under the prefix `{prefix}` that is not a record");

    // list: the record, and the count on stderr
    let r = target.run(&["list"]).expect(FOUND);
    assert_eq!(r.stdout.lines().count(), 2, "{}", r.stdout);
    assert!(r.stdout.contains("o-1"), "{}", r.stdout);
    assert!(r.stderr.contains(&three), "{}", r.stderr);
    // in JSON, the records then the count
    let lines = target
        .run(&["--format", "json", "list"])
        .expect(FOUND)
        .json();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["key"], "o-1");
    assert_eq!(lines[1], serde_json::json!({ "skipped": 3 }));
    // a scope's scan reads only its keys
    let r = target
        .run(&["--format", "json", "list", "--scope", "orders"])
        .expect(FOUND);
    assert!(r.stderr.contains(&one), "{}", r.stderr);
    assert_eq!(r.json()[1], serde_json::json!({ "skipped": 1 }));
    // nothing matches: still counted
    let r = target.run(&["stuck"]).expect(NOT_FOUND);
    assert!(r.stderr.contains("no matching records"), "{}", r.stderr);
    assert!(r.stderr.contains(&three), "{}", r.stderr);
    let r = target
        .run(&["--format", "json", "poisoned", "--max-attempts", "1"])
        .expect(NOT_FOUND);
    assert_eq!(r.json(), [serde_json::json!({ "skipped": 3 })]);
    assert!(r.stderr.contains(&three), "{}", r.stderr);

    // stats: the record counted, the other keys said
    let r = target.run(&["stats"]).expect(FOUND);
    assert_eq!(r.stdout.lines().count(), 2, "{}", r.stdout);
    assert!(r.stderr.contains(&three), "{}", r.stderr);
    let lines = target
        .run(&["--format", "json", "stats"])
        .expect(FOUND)
        .json();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (lines[0]["scope"].as_str(), lines[0]["count"].as_u64()),
        (Some("orders"), Some(1))
    );
    assert_eq!(lines[1], serde_json::json!({ "skipped": 3 }));

    // without them, nothing is said
    let _: () = conn.del(&foreign[..]).await.unwrap();
    let r = target.run(&["--format", "json", "stats"]).expect(FOUND);
    assert_eq!(r.json().len(), 1, "{}", r.stdout);
    assert!(!r.stderr.contains("skipped"), "{}", r.stderr);
    let r = target.run(&["list"]).expect(FOUND);
    assert!(!r.stderr.contains("skipped"), "{}", r.stderr);
    store.forget(&record).await.unwrap();
}
