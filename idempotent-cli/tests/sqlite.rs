//! The `idempotent` binary on an SQLite file of its own: `migrate` creates the table,
//! then every command's output and effect.
#![cfg(feature = "sqlite")]

mod support;

use idempotent_runtime::SqliteStore;
use support::{ERROR, FOUND, Target, check_every_command, run, seed, unique};

#[tokio::test]
async fn every_command_on_sqlite() {
    let path = std::env::temp_dir().join(format!("{}.db", unique("idempotent-cli-")));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let target = Target {
        global: vec!["--store".into(), url.clone()],
        sql: true,
    };
    let r = target.run(&["list"]).expect(ERROR);
    assert!(r.stderr.contains("idempotent migrate"), "{}", r.stderr);
    target.run(&["migrate"]).expect(FOUND);
    let store = SqliteStore::connect(&url)
        .await
        .expect("open the SQLite file");
    let scope = unique("orders-");
    let seeded = seed(&store, &scope).await;
    check_every_command(&target, &store, &seeded).await;
    let missing = format!("sqlite://{}", path.with_extension("missing").display());
    let r = run(&["--store", &missing, "list"]).expect(ERROR);
    assert!(r.stderr.contains("check the path"), "{}", r.stderr);
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// The outbox commands on an SQLite file of the test's own; and `outbox` refused on
/// stores without an outbox.
#[tokio::test]
async fn outbox_commands_on_sqlite() {
    support::outbox_needs_an_sql_store();
    let path = std::env::temp_dir().join(format!("{}.db", unique("idempotent-cli-outbox-")));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let store = SqliteStore::connect(&url)
        .await
        .expect("open the SQLite file");
    let target = Target {
        global: vec!["--store".into(), url.clone()],
        sql: true,
    };
    let pool = store.pool().clone();
    support::check_outbox_commands(&target, "idempotent_outbox", &pool, || {
        idempotent_runtime::SqliteOutbox::new(pool.clone(), "idempotent_outbox").unwrap()
    })
    .await;
    drop(store);
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
