//! The `idempotent` binary against the shared Redis server (`IDEMPOTENT_REDIS_URL`,
//! default `redis://127.0.0.1:6379`), under a key prefix of its own: every command's
//! output and effect, and the errors for bad URLs and unreachable servers.
#![cfg(feature = "redis")]

mod support;

use idempotent_runtime::RedisStore;
use support::{
    ERROR, NOT_FOUND, Target, check_every_command, clean, refused_at_once, run, seed, unique,
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
    let port = idempotent_tests::conformance::free_port();
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
    let port = idempotent_tests::conformance::free_port();
    let other = idempotent_tests::conformance::free_port();
    refused_at_once(&format!("redis://127.0.0.1:{port}"));
    refused_at_once(&format!(
        "redis+cluster://127.0.0.1:{port},127.0.0.1:{other}"
    ));
    refused_at_once(&format!(
        "redis://127.0.0.1:{port},redis://127.0.0.1:{other}"
    ));
}
