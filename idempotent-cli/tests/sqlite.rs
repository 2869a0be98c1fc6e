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

    // a listing longer than a page (1000 rows) goes on where the page ended
    let mut many = idempotent_runtime::outbox::Outbox::new();
    many.bind(&idempotent_runtime::RecordKey::new("bulk", "b-1").unwrap());
    for n in 0..2500u32 {
        many.emit("bulk.events", n.to_be_bytes().to_vec());
    }
    support::enqueue(&pool, "idempotent_outbox", &many).await;
    let rows = target
        .run(&["--format", "json", "outbox", "list", "--pending"])
        .expect(FOUND)
        .json();
    let seqs: Vec<i64> = rows.iter().map(|v| v["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs.len(), 2502, "the 2500 rows and the two left pending");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in emission order, once each"
    );
    let emitted: Vec<String> = many.messages().iter().map(|m| m.id().to_string()).collect();
    let listed: Vec<&str> = rows[2..]
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), emitted.len());
    if let Some(i) = (0..listed.len()).find(|&i| listed[i] != emitted[i]) {
        panic!("row {i} is {} where {} was emitted", listed[i], emitted[i]);
    }
    let r = target
        .run(&["outbox", "list", "--pending", "--limit", "1500"])
        .expect(FOUND);
    assert_eq!(
        r.stdout.lines().count(),
        1501,
        "a header once, then 1500 rows"
    );
    let r = target.run(&["outbox", "stats"]).expect(FOUND);
    let bulk: Vec<&str> = r
        .stdout
        .lines()
        .find(|l| l.starts_with("bulk.events "))
        .unwrap_or_else(|| panic!("{}", r.stdout))
        .split_whitespace()
        .collect();
    assert_eq!(
        (bulk[0], bulk[1], bulk[3], bulk[4]),
        ("bulk.events", "2500", "0", "0"),
        "{}",
        r.stdout
    );

    drop(store);
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
