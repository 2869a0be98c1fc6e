//! `SqliteStore`, the embedded durable store: the conformance suite on a temporary
//! file, restarts, concurrent writers, two stores on one file, table names, purging and
//! bad data.
#![cfg(feature = "sqlite")]

use futures_util::FutureExt;
use futures_util::future::join_all;
use idempotent_runtime::sqlx::{self, AssertSqlSafe};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{ClaimOutcome, Fence, RecordState, Release};
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{Error, Idempotency, RecordKey, SqliteStore, Store, StoreErrorKind};
use idempotent_tests::sql_support::{
    self, CORRUPTIONS, TTL, acquire, corrupt_records_are_refused_unchanged, poison_is_shared,
    purge_and_sweep, race_two_stores, req, sql_keys_are_data, unique_name,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A database file in the temporary directory that no other test uses (removed, with
/// its WAL files, when dropped).
struct TempDb(PathBuf);

impl TempDb {
    fn new() -> TempDb {
        TempDb(std::env::temp_dir().join(format!("{}.db", unique_name("idempotent_sqlite"))))
    }

    fn url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.0.display())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn open(db: &TempDb) -> SqliteStore {
    SqliteStore::connect(&db.url()).await.unwrap_or_else(|e| {
        panic!(
            "cannot open {}: {e} ({:?})",
            db.url(),
            std::error::Error::source(&e)
        )
    })
}

/// One shared file for the conformance cases (each case uses its own scope).
static SHARED: std::sync::LazyLock<TempDb> = std::sync::LazyLock::new(TempDb::new);

idempotent_runtime::protocol_conformance_suite!(async {
    Arc::new(open(&SHARED).await) as Arc<dyn Store>
});
idempotent_runtime::admin_conformance_suite!(async {
    Arc::new(open(&SHARED).await) as Arc<dyn Store>
});

/// The protocol cases with the store's single steps coalesced into batch calls.
mod coalesced {
    use super::*;
    use idempotent_runtime::store::coalesce::Coalesced;
    idempotent_runtime::protocol_conformance_suite!(async {
        Arc::new(Coalesced::new(open(&SHARED).await)) as Arc<dyn Store>
    });
}

/// Stores opening the same new file at the same moment as others write to it
/// (consumers starting together) all open it and run their messages: switching a new
/// file to write-ahead logging takes a lock SQLite's busy timeout does not wait for,
/// and `connect` must wait for it itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opening_one_new_file_while_others_write_all_open() {
    for round in 0..60 {
        let db = TempDb::new();
        let scope = unique_scope("opening");
        let tasks = join_all((0..8).map(|n| {
            let url = db.url();
            let scope = scope.clone();
            tokio::spawn(async move {
                let store = SqliteStore::connect(&url).await?;
                let h = Idempotency::new(scope).store(store.clone());
                for i in 0..10u32 {
                    let r: Result<u32, Error> = h.run(&(n * 10 + i), async move { Ok(i) }).await;
                    assert_eq!(r.unwrap(), i);
                }
                Ok::<_, idempotent_runtime::StoreError>(store)
            })
        }))
        .await;
        for store in tasks {
            let store = store.unwrap().unwrap_or_else(|e| {
                panic!(
                    "round {round}: a concurrent open of {} failed: {e}",
                    db.url()
                )
            });
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(store.pool())
                .await
                .unwrap();
            assert_eq!(mode, "wal");
            store.pool().close().await;
        }
    }
}

/// Completed keys survive dropping the store and opening the file again: the
/// duplicate after a restart replays the output; a key in progress at the "crash"
/// is claimable once its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_survive_a_restart() {
    let db = TempDb::new();
    let scope = unique_scope("restart");
    {
        let store = open(&db).await;
        let h = Idempotency::new(scope.clone()).store(store.clone());
        for i in 0..20u32 {
            let r: Result<u32, Error> = h.run(&i, async move { Ok(i * 3) }).await;
            assert_eq!(r.unwrap(), i * 3);
        }
        let k = RecordKey::new(&scope, "crashed").unwrap();
        acquire(&store, &req(&k, Duration::from_millis(200))).await;
        store.pool().close().await;
    }
    let store = open(&db).await;
    let h = Idempotency::new(scope.clone()).store(store.clone());
    let runs = AtomicU32::new(0);
    for i in 0..20u32 {
        let r: Result<u32, Error> = h
            .run(&i, async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(0)
            })
            .await;
        assert_eq!(r.unwrap(), i * 3, "key {i} replays after the restart");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let k = RecordKey::new(&scope, "crashed").unwrap();
    match store.claim(&req(&k, TTL)).await.unwrap() {
        ClaimOutcome::Acquired { attempt: 2, .. } => {}
        other => panic!("expected a take-over, got {other:?}"),
    }
}

/// 32 tasks write at once (fresh claims, completions, duplicates, failures) through
/// one store: no "database is locked" error reaches anyone, and each key runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_writers_never_see_database_is_locked() {
    let db = TempDb::new();
    let store = Arc::new(open(&db).await) as Arc<dyn Store>;
    let h = Idempotency::new(unique_scope("writers"))
        .shared_store(store)
        .lease(Duration::from_secs(10))
        .on_in_progress(idempotent_runtime::OnInProgress::Wait);
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..200).map(|_| AtomicU32::new(0)).collect());
    let tasks = (0..32).map(|w| {
        let h = h.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            for n in 0..50usize {
                // every key is delivered by several writers
                let key = (w * 50 + n) % 200;
                let runs = runs.clone();
                let r: Result<usize, Error> = h
                    .run(&key, async move {
                        runs[key].fetch_add(1, Ordering::SeqCst);
                        Ok(key)
                    })
                    .await;
                match r {
                    Ok(v) => assert_eq!(v, key),
                    Err(e) => panic!("writer {w}: {e} ({e:?})"),
                }
            }
        })
    });
    for t in join_all(tasks).await {
        t.expect("writer");
    }
    for (k, n) in runs.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "key {k}");
    }
}

/// Two stores (two pools, two write gates) on one file: writers of both wait on
/// SQLite's busy timeout, and each key still runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_run_each_key_once() {
    let db = TempDb::new();
    let a = Arc::new(open(&db).await) as Arc<dyn Store>;
    let b = Arc::new(open(&db).await) as Arc<dyn Store>;
    race_two_stores(a, b, 40, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoning_is_shared_between_stores() {
    let db = TempDb::new();
    let a = Arc::new(open(&db).await) as Arc<dyn Store>;
    let b = Arc::new(open(&db).await) as Arc<dyn Store>;
    poison_is_shared(a, b, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_metacharacters_and_binary_keys_are_data() {
    let db = TempDb::new();
    sql_keys_are_data(Arc::new(open(&db).await)).await;
}

/// Leases are judged against the lease deadline stored in the row and SQLite's clock:
/// a deadline moved an hour ahead in the table is an hour of `retry_after`, and one
/// moved into the past lets the key be taken over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_judged_on_the_database_clock() {
    let db = TempDb::new();
    let store = open(&db).await;
    let scope = unique_scope("lite-clock");
    let k = RecordKey::new(&scope, "m").unwrap();
    acquire(&store, &req(&k, Duration::from_secs(5))).await;
    sqlx::query(
        "UPDATE message_idempotent SET lease_until_us = CAST(unixepoch('subsec') * 1000000 AS INTEGER) + 3600000000 WHERE scope = ?",
    )
    .bind(&scope)
    .execute(store.pool())
    .await
    .unwrap();
    match store.claim(&req(&k, TTL)).await.unwrap() {
        ClaimOutcome::InProgress { retry_after } => assert!(
            retry_after > Duration::from_secs(3590) && retry_after <= Duration::from_secs(3600),
            "{retry_after:?}"
        ),
        other => panic!("expected InProgress, got {other:?}"),
    }
    sqlx::query(
        "UPDATE message_idempotent SET lease_until_us = CAST(unixepoch('subsec') * 1000000 AS INTEGER) - 1 WHERE scope = ?",
    )
    .bind(&scope)
    .execute(store.pool())
    .await
    .unwrap();
    match store.claim(&req(&k, TTL)).await.unwrap() {
        ClaimOutcome::Acquired { attempt: 2, .. } => {}
        other => panic!("expected a take-over, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_purge_and_bad_data() {
    let db = TempDb::new();
    let store = open(&db).await;
    for bad in ["", "a-b", "x; DROP TABLE y", "a.b.c", "\"q\"", "1x"] {
        let e = store.clone().with_table(bad).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Rejected, "{bad:?}");
    }
    let k = RecordKey::new("s", "k").unwrap();
    let missing = store.clone().with_table("missing_table").unwrap();
    let e = missing.claim(&req(&k, TTL)).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e:?}");

    let custom = store.clone().with_table("main.custom_dedup").unwrap();
    custom.migrate().await.unwrap();
    custom.migrate().await.unwrap();
    let t = acquire(&custom, &req(&k, TTL)).await;
    assert_eq!(
        custom
            .release(&Release { key: &k, token: t })
            .await
            .unwrap(),
        Fence::Held
    );
    assert_eq!(
        custom.inspect(&k).await.unwrap().unwrap().state,
        RecordState::Released
    );

    // purge: 2500 expired rows go, live ones stay
    sqlx::query(AssertSqlSafe(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) \
         INSERT INTO custom_dedup (scope, message_id, status, retry_times, owner_token, expires_at_us) \
         SELECT 'old', CAST(i AS BLOB), 1, 1, 1, 1 FROM n"
            .to_owned(),
    ))
    .execute(custom.pool())
    .await
    .unwrap();
    purge_and_sweep(
        &custom,
        2500,
        |every| custom.spawn_sweeper(every).unwrap(),
        || {
            sqlx::query_scalar("SELECT COUNT(*) FROM custom_dedup WHERE scope = 'short'")
                .fetch_one(custom.pool())
                .map(Result::unwrap)
        },
    )
    .await;
    assert!(custom.inspect(&k).await.unwrap().is_some());

    // a row this store did not write is a Corrupt error
    sqlx::query("UPDATE custom_dedup SET status = 9 WHERE scope = 's'")
        .execute(custom.pool())
        .await
        .unwrap();
    let e = custom.claim(&req(&k, TTL)).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
}

/// Regression: a database file that cannot be opened (its directory does not exist)
/// is an error at once that names the file and the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_opened_is_an_error_naming_the_cause() {
    let started = std::time::Instant::now();
    let e = SqliteStore::connect("sqlite:///nonexistent-dir/x/y.db?mode=rwc")
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "{e}");
    assert!(
        matches!(
            e.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::Rejected
        ),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(message.contains("/nonexistent-dir/x/y.db"), "{message}");
    assert!(message.contains("does not exist"), "{message}");
}

/// Regression: a non-integer value in `lease_until_us` made every delivery fail with
/// a retryable "the record changed under every claim attempt" (so the message was
/// redelivered forever) instead of `Corrupt`. SQLite columns take any type: every
/// value of the wrong type or out of range, in every column, is now a `Corrupt` error
/// naming the scope, for every step, and the row stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_fail_as_corrupt_and_stay_unchanged() {
    let db = TempDb::new();
    let store = open(&db).await;
    let pool = store.pool().clone();
    let mut corruptions = CORRUPTIONS.to_vec();
    corruptions.extend([
        "lease_until_us = 'abc'",
        "lease_until_us = 1.5",
        "expires_at_us = 'soon'",
        "status = '1x'",
        "status = 0.5",
        "retry_times = 1.5",
        "retry_times = x'00'",
        "owner_token = 'token'",
        "fingerprint = 5",
        "output = 1.5",
    ]);
    corrupt_records_are_refused_unchanged(
        Arc::new(store),
        "lite-corrupt",
        &corruptions,
        async |scope, clause| {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE message_idempotent SET {clause} WHERE scope = ?"
            )))
            .bind(scope)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{clause}: {e}"));
        },
        async |scope| {
            sqlx::query_scalar(
                "SELECT quote(status) || ',' || quote(retry_times) || ',' || quote(owner_token) \
                    || ',' || quote(lease_until_us) || ',' || quote(expires_at_us) || ',' \
                    || quote(fingerprint) || ',' || quote(output) \
                 FROM message_idempotent WHERE scope = ?",
            )
            .bind(scope)
            .fetch_one(&pool)
            .await
            .unwrap()
        },
    )
    .await;
}

/// Regression: a completion applied but whose reply was lost, retried with the same
/// token, was `Lost`; it is `Held`, alone and in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_completion_by_the_same_claim_is_held() {
    let db = TempDb::new();
    let store = open(&db).await;
    sql_support::repeated_completion_by_the_same_claim_is_held(&store).await;
}

/// Regression: a renewal waiting for the writer connection when the body returned kept
/// that connection from the completion of its own task, so the handler never returned
/// and every later write on the store hung. Here another connection holds the
/// database's write lock (`BEGIN IMMEDIATE`) from 50 ms to 250 ms; the lease is 300 ms
/// (renewed every 100 ms), the body takes 150 ms, so a renewal is waiting on the lock
/// when the body returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_waiting_for_the_writer_when_the_body_returns() {
    use idempotent_runtime::sqlx::{Connection, SqliteConnection};

    let db = TempDb::new();
    let store = open(&db).await;
    let h = Idempotency::new(unique_scope("renewal-writer"))
        .store(store.clone())
        .lease(Duration::from_millis(300));
    let url = db.url();
    let locker = tokio::spawn(async move {
        let mut conn = SqliteConnection::connect(&url)
            .await
            .expect("second connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .expect("write lock");
        tokio::time::sleep(Duration::from_millis(200)).await;
        sqlx::raw_sql("COMMIT")
            .execute(&mut conn)
            .await
            .expect("release the write lock");
    });
    let run = h.run("m-1", async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok::<u32, Error>(1)
    });
    let r = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the handler returns after the write lock is released");
    assert_eq!(r.unwrap(), 1);
    locker.await.unwrap();
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        h.run("m-2", async { Ok::<u32, Error>(2) }),
    )
    .await
    .expect("later writes on the store do not hang");
    assert_eq!(next.unwrap(), 2);
    let k = h.record_key("m-1").unwrap();
    let state = store.inspect(&k).await.unwrap().map(|r| r.state);
    assert_eq!(state, Some(RecordState::Completed));
}
