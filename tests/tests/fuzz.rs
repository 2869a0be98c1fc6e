//! Fuzzing with a fixed budget, through the public API: arbitrary bytes for the key
//! encoding, arbitrary cached outputs through replay, and arbitrary records written
//! behind the stores' back (bytes under a Redis record key, column values in the SQL
//! rows of PostgreSQL, MariaDB / MySQL and SQLite), each followed by every protocol
//! step. No input may panic; a record a store cannot read is a `Corrupt` error (not
//! retryable) naming the record's scope; a duplicate is never answered with a value
//! other than the one its stored output decodes to.
//!
//! The inputs come from a seeded generator: `IDEMPOTENT_FUZZ_SEED` replays a run,
//! `IDEMPOTENT_FUZZ_CASES` scales the budget (default 1: the counts below). Each test
//! prints its seed and how many inputs it ran.
#![cfg(all(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]

use idempotent_runtime::redis::AsyncCommands;
use idempotent_runtime::sqlx::{self, AssertSqlSafe};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion, Release};
use idempotent_runtime::{
    Error, Idempotency, MemoryStore, MySqlStore, NotReplayable, PostgresStore, RecordKey,
    SqliteStore, Store, StoreErrorKind, Token,
};
use idempotent_tests::rng::{Rng, scaled};
use idempotent_tests::sql_support::{env_url, unique_name};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(300);

fn budget(n: usize) -> usize {
    scaled(n, "IDEMPOTENT_FUZZ_CASES")
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order: String,
    cents: u64,
}

/// G8 under arbitrary bytes: no panic, bounded length, and distinct keys (also
/// composite keys split at different places) never share an encoding.
#[test]
fn key_encoding_is_total_bounded_and_unambiguous() {
    let mut rng = Rng::seeded("key_encoding", "IDEMPOTENT_FUZZ_SEED");
    let n = budget(20_000);
    let mut seen: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for _ in 0..n {
        let max = if rng.chance(4) { 400 } else { 40 };
        let raw = rng.bytes(max);
        let scope = String::from_utf8_lossy(&rng.bytes(30)).into_owned();
        match RecordKey::new(&scope, raw.as_slice()) {
            Ok(k) => {
                assert!(!raw.is_empty());
                assert!(k.key().len() <= 130, "{} bytes: {raw:?}", k.key().len());
                // over 128 bytes once encoded (escapes included): the SHA-256 instead
                assert!(k.is_hashed() || raw.len() <= 128, "{raw:?}");
                if let Some(other) = seen.insert(k.key().to_vec(), raw.clone()) {
                    assert_eq!(other, raw, "two keys, one encoding");
                }
            }
            Err(Error::MissingKey) => assert!(raw.is_empty()),
            Err(e) => panic!("unexpected {e}"),
        }
        if raw.len() >= 2 {
            // an empty part is a missing key; split inside
            let i = 1 + rng.below(raw.len() as u64 - 1) as usize;
            let j = 1 + rng.below(raw.len() as u64 - 1) as usize;
            let a = RecordKey::new("s", &(&raw[..i], &raw[i..])).unwrap();
            let b = RecordKey::new("s", &(&raw[..j], &raw[j..])).unwrap();
            assert_eq!(i == j, a.key() == b.key(), "split at {i} vs {j} of {raw:?}");
            let text = String::from_utf8_lossy(&raw).into_owned();
            let t = RecordKey::new("s", &(text.as_str(), rng.int(), Some(raw.len() as u32)));
            assert!(t.is_ok());
        }
    }
    println!(
        "key_encoding: {n} inputs, {} distinct encodings",
        seen.len()
    );
}

/// Delivers `key` once through the manual API and checks what came back against the
/// output the store holds: a replay gives exactly the value that output decodes to,
/// else `OutputNotReplayable`; a record the store cannot read is `Corrupt`.
/// Returns whether the body ran.
async fn deliver(h: &Idempotency, key: &str, stored_output: Option<&[u8]>) -> bool {
    let runs = AtomicU32::new(0);
    let r: Result<Receipt, Error> = h
        .run(key, async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(Receipt {
                order: key.to_owned(),
                cents: 1,
            })
        })
        .await;
    let ran = runs.load(Ordering::SeqCst) != 0;
    match r {
        Ok(v) if ran => assert_eq!(v.cents, 1),
        Ok(v) => {
            let decoded: Option<Receipt> =
                stored_output.and_then(|o| serde_json::from_slice(o).ok());
            assert_eq!(
                Some(&v),
                decoded.as_ref(),
                "replayed a value its stored output does not decode to"
            );
        }
        Err(Error::OutputNotReplayable { reason }) => {
            assert!(!ran, "not replayable after the body ran: {reason:?}");
            if let (NotReplayable::Decode(_), Some(o)) = (&reason, stored_output) {
                assert!(serde_json::from_slice::<Receipt>(o).is_err());
            }
        }
        Err(e @ (Error::InProgress { .. } | Error::AttemptsExhausted { .. })) => {
            assert!(!ran, "{e:?} after the body ran")
        }
        Err(Error::Store(e)) => {
            assert!(!ran, "the body ran although the store failed: {e} ({e:?})");
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
            assert!(!e.is_retryable());
            assert!(
                e.to_string().contains(h.scope()),
                "does not name the record: {e}"
            );
        }
        Err(e) => panic!("unexpected {e:?}"),
    }
    ran
}

/// Every protocol step on `k`; each answers or fails with a clear `Corrupt` error.
/// Returns how many steps failed.
async fn every_step(store: &dyn Store, k: &RecordKey, rng: &mut Rng) -> usize {
    let lease = Duration::from_secs(30);
    let req = ClaimRequest {
        key: k,
        lease,
        ttl: TTL,
        fingerprint: if rng.chance(2) { Some(b"fp") } else { None },
        max_attempts: if rng.chance(2) { Some(3) } else { None },
    };
    let token = Token::new(rng.int() as u64);
    let mut failed = 0;
    let mut check = |r: Result<(), idempotent_runtime::StoreError>, op: &str| {
        if let Err(e) = r {
            failed += 1;
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{op}: {e} ({e:?})");
            assert!(!e.is_retryable(), "{op}: {e}");
            assert!(
                e.to_string().contains(k.scope()),
                "{op}: the error does not name the record's scope: {e}"
            );
        }
    };
    check(
        store.as_admin().unwrap().inspect(k).await.map(drop),
        "inspect",
    );
    check(store.renew(k, token, lease).await.map(drop), "renew");
    check(
        store
            .complete(&Completion {
                key: k,
                token,
                output: Some(b"{}"),
                ttl: TTL,
            })
            .await
            .map(drop),
        "complete",
    );
    check(
        store.release(&Release { key: k, token }).await.map(drop),
        "release",
    );
    check(store.claim(&req).await.map(drop), "claim");
    check(store.claim_batch(&[req]).await.map(drop), "claim_batch");
    failed
}

/// Arbitrary bytes as the cached output of a completed record: a duplicate gets the
/// value they decode to, or `OutputNotReplayable`; the body never runs.
#[tokio::test]
async fn arbitrary_cached_outputs_replay_exactly_or_not_at_all() {
    let mut rng = Rng::seeded("cached_outputs", "IDEMPOTENT_FUZZ_SEED");
    let store = Arc::new(MemoryStore::new());
    let h = Idempotency::new("fuzz-output").shared_store(store.clone());
    let n = budget(5_000);
    let (mut replayed, mut refused) = (0, 0);
    for i in 0..n {
        let key = format!("k{i}");
        let k = h.record_key(key.as_str()).unwrap();
        let mut output = rng.bytes(48);
        if rng.chance(8) {
            output = serde_json::to_vec(&Receipt {
                order: key.clone(),
                cents: rng.next_u64(),
            })
            .unwrap();
        }
        let ClaimOutcome::Acquired { token, .. } = store
            .claim(&ClaimRequest {
                key: &k,
                lease: TTL / 2,
                ttl: TTL,
                fingerprint: None,
                max_attempts: None,
            })
            .await
            .unwrap()
        else {
            panic!("fresh key")
        };
        store
            .complete(&Completion {
                key: &k,
                token,
                output: Some(&output),
                ttl: TTL,
            })
            .await
            .unwrap();
        assert!(
            !deliver(&h, &key, Some(&output)).await,
            "a completed key ran again"
        );
        if serde_json::from_slice::<Receipt>(&output).is_ok() {
            replayed += 1;
        } else {
            refused += 1;
        }
    }
    println!("cached_outputs: {n} inputs, {replayed} replayed, {refused} not replayable");
}

/// Arbitrary bytes, and valid records with bytes flipped, cut or appended, under a
/// Redis record key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_redis_values_are_corrupt_errors_or_records() {
    let mut rng = Rng::seeded("redis_records", "IDEMPOTENT_FUZZ_SEED");
    let store = Arc::new(idempotent_tests::redis_support::connect().await);
    let mut conn =
        idempotent_tests::redis_support::raw(&idempotent_tests::redis_support::redis_url()).await;
    let scope = idempotent_runtime::testing::conformance::unique_scope("fuzz-redis");
    let h = Idempotency::new(scope.clone()).shared_store(store.clone());
    let n = budget(400);
    let mut failed = 0;
    for i in 0..n {
        let key = format!("k{i}");
        let k = h.record_key(key.as_str()).unwrap();
        let name = store.redis_key(&k);
        let value = if rng.chance(3) {
            rng.bytes(64)
        } else {
            // a real record (in progress, released or completed), then mutated
            let r = ClaimRequest {
                key: &k,
                lease: TTL / 2,
                ttl: TTL,
                fingerprint: if rng.chance(2) {
                    Some(b"fingerprint")
                } else {
                    None
                },
                max_attempts: None,
            };
            let ClaimOutcome::Acquired { token, .. } = store.claim(&r).await.unwrap() else {
                panic!("fresh key")
            };
            match rng.below(3) {
                0 => {}
                1 => drop(store.release(&Release { key: &k, token }).await.unwrap()),
                _ => {
                    let out = serde_json::to_vec(&Receipt {
                        order: key.clone(),
                        cents: 7,
                    })
                    .unwrap();
                    store
                        .complete(&Completion {
                            key: &k,
                            token,
                            output: Some(&out),
                            ttl: TTL,
                        })
                        .await
                        .unwrap();
                }
            }
            let mut v: Vec<u8> = conn.get(&name).await.unwrap();
            for _ in 0..=rng.below(3) {
                match rng.below(4) {
                    0 if !v.is_empty() => {
                        let at = rng.below(v.len() as u64) as usize;
                        v[at] ^= 1 << rng.below(8);
                    }
                    1 if !v.is_empty() => v.truncate(rng.below(v.len() as u64) as usize),
                    2 => v.extend(rng.bytes(8)),
                    _ if !v.is_empty() => {
                        let at = rng.below(v.len() as u64) as usize;
                        v[at] = rng.next_u64() as u8;
                    }
                    _ => {}
                }
            }
            v
        };
        let _: () = conn.set(&name, &value).await.unwrap();
        let stored_output = match store
            .claim(&ClaimRequest {
                key: &k,
                lease: TTL / 2,
                ttl: TTL,
                fingerprint: None,
                max_attempts: None,
            })
            .await
        {
            Ok(ClaimOutcome::Completed { output }) => output,
            _ => None,
        };
        failed += every_step(&*store, &k, &mut rng).await;
        // a fresh copy of the bytes for the replay check
        let _: () = conn.set(&name, &value).await.unwrap();
        deliver(&h, &key, stored_output.as_deref()).await;
        let _: () = conn.del(&name).await.unwrap();
    }
    println!("redis_records: {n} inputs, {failed} steps refused as Corrupt");
}

/// One column value of the fuzzed SQL rows.
#[derive(Debug)]
enum Val {
    Null,
    Int(i64),
    Bytes(Vec<u8>),
}

fn int_or_null(rng: &mut Rng) -> Val {
    if rng.chance(6) {
        Val::Null
    } else {
        Val::Int(rng.int())
    }
}

fn bytes_or_null(rng: &mut Rng, max: usize) -> Val {
    if rng.chance(3) {
        Val::Null
    } else {
        Val::Bytes(rng.bytes(max))
    }
}

/// Random values for status, retry_times, owner_token, lease_until_us, expires_at_us,
/// fingerprint, output. Small status values and plausible times are favoured so the
/// row is often readable and the later steps run on it.
fn row_values(rng: &mut Rng, now_us: i64) -> [Val; 7] {
    let status = if rng.chance(2) {
        Val::Int(rng.below(3) as i64)
    } else {
        Val::Int(i64::from(rng.int() as i8))
    };
    let time = |rng: &mut Rng| {
        if rng.chance(2) {
            Val::Int(now_us + (rng.below(600_000_000) as i64 - 300_000_000))
        } else {
            int_or_null(rng)
        }
    };
    let retry = if rng.chance(2) {
        Val::Int(rng.below(4) as i64)
    } else {
        Val::Int(i64::from(rng.int() as i32))
    };
    let expires = match time(rng) {
        Val::Null => Val::Int(rng.int()),
        v => v,
    };
    [
        status,
        retry,
        Val::Int(rng.int()),
        time(rng),
        expires,
        bytes_or_null(rng, 40),
        bytes_or_null(rng, 48),
    ]
}

const COLUMNS: [&str; 7] = [
    "status",
    "retry_times",
    "owner_token",
    "lease_until_us",
    "expires_at_us",
    "fingerprint",
    "output",
];

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

macro_rules! fuzz_sql_rows {
    ($name:ident, $label:literal, $store:ty, $pool:ty, $connect:expr, $placeholder:expr, $narrow:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let mut rng = Rng::seeded($label, "IDEMPOTENT_FUZZ_SEED");
            let (store, pool, drop_table): ($store, $pool, String) = $connect.await;
            let store = Arc::new(store);
            let table = store.table();
            let scope = idempotent_runtime::testing::conformance::unique_scope("fuzz-sql");
            let h = Idempotency::new(scope.clone()).shared_store(store.clone());
            let n = budget(300);
            let (mut failed, mut rejected_by_db) = (0, 0);
            for i in 0..n {
                let key = format!("k{i}");
                let k = h.record_key(key.as_str()).unwrap();
                let r = ClaimRequest {
                    key: &k,
                    lease: TTL / 2,
                    ttl: TTL,
                    fingerprint: None,
                    max_attempts: None,
                };
                assert!(matches!(store.claim(&r).await.unwrap(), ClaimOutcome::Acquired { .. }));
                let vals = row_values(&mut rng, now_us());
                let set: Vec<String> = COLUMNS
                    .iter()
                    .enumerate()
                    .map(|(j, c)| format!("{c} = {}", $placeholder(j + 1)))
                    .collect();
                let sql = format!(
                    "UPDATE {table} SET {} WHERE scope = {} AND message_id = {}",
                    set.join(", "),
                    $placeholder(8),
                    $placeholder(9)
                );
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for v in &vals {
                    q = match $narrow(v) {
                        Val::Null => q.bind(None::<i64>),
                        Val::Int(x) => q.bind(x),
                        Val::Bytes(b) => q.bind(b),
                    };
                }
                let q = q.bind(k.scope().to_owned()).bind(k.key().to_vec());
                if q.execute(&pool).await.is_err() {
                    // the column's type refuses the value (a NULL in a NOT NULL column,
                    // a number out of its range): nothing written
                    rejected_by_db += 1;
                    continue;
                }
                let stored_output = match store.inspect(&k).await {
                    Ok(Some(rec)) if rec.state == idempotent_runtime::store::RecordState::Completed => rec.output,
                    _ => None,
                };
                failed += every_step(&*store, &k, &mut rng).await;
                deliver(&h, &key, stored_output.as_deref()).await;
            }
            sqlx::query(AssertSqlSafe(drop_table)).execute(&pool).await.unwrap();
            println!(
                "{}: {n} rows, {rejected_by_db} refused by the column types, {failed} steps refused as Corrupt",
                $label
            );
        }
    };
}

fn pg_placeholder(i: usize) -> String {
    format!("${i}")
}

fn mysql_placeholder(_: usize) -> String {
    "?".to_owned()
}

/// The value as the column would hold it: NULL for the nullable ones, else as is.
fn same(v: &Val) -> Val {
    match v {
        Val::Null => Val::Null,
        Val::Int(x) => Val::Int(*x),
        Val::Bytes(b) => Val::Bytes(b.clone()),
    }
}

async fn postgres() -> (PostgresStore, sqlx::PgPool, String) {
    let url = env_url(
        "IDEMPOTENT_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let table = unique_name("fuzz");
    let store = PostgresStore::connect_with_table(&url, &table)
        .await
        .unwrap_or_else(|e| panic!("the fuzz tests need PostgreSQL at {url}: {e}"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    (store, pool, format!("DROP TABLE {table}"))
}

async fn mysql() -> (MySqlStore, sqlx::MySqlPool, String) {
    let url = env_url("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
    let table = unique_name("fuzz");
    let store = MySqlStore::connect_with_table(&url, &table)
        .await
        .unwrap_or_else(|e| panic!("the fuzz tests need MySQL / MariaDB at {url}: {e}"));
    let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
    (store, pool, format!("DROP TABLE {table}"))
}

async fn sqlite() -> (SqliteStore, sqlx::SqlitePool, String) {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name("idempotent_fuzz")));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let table = unique_name("fuzz");
    let store = SqliteStore::connect_with_table(&url, &table).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    (store, pool, format!("DROP TABLE {table}"))
}

fuzz_sql_rows!(
    arbitrary_postgres_rows_are_corrupt_errors_or_records,
    "postgres_rows",
    PostgresStore,
    sqlx::PgPool,
    postgres(),
    pg_placeholder,
    same
);
fuzz_sql_rows!(
    arbitrary_mysql_rows_are_corrupt_errors_or_records,
    "mysql_rows",
    MySqlStore,
    sqlx::MySqlPool,
    mysql(),
    mysql_placeholder,
    same
);
fuzz_sql_rows!(
    arbitrary_sqlite_rows_are_corrupt_errors_or_records,
    "sqlite_rows",
    SqliteStore,
    sqlx::SqlitePool,
    sqlite(),
    pg_placeholder,
    same
);

/// Regression: a SQL row with an out-of-range status was a `Corrupt` error that did not
/// say which record it was about ("status 7 is neither 0 … nor 1"), so an operator
/// could not find the row. The error now names the record's scope (the table is the
/// store's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_corrupt_errors_name_the_scope() {
    async fn case<S: Store>(store: S, corrupt: impl AsyncFnOnce(&RecordKey)) {
        let scope = idempotent_runtime::testing::conformance::unique_scope("named");
        let k = RecordKey::new(&scope, "m").unwrap();
        let r = ClaimRequest {
            key: &k,
            lease: TTL / 2,
            ttl: TTL,
            fingerprint: None,
            max_attempts: None,
        };
        store.claim(&r).await.unwrap();
        corrupt(&k).await;
        for e in [
            store.as_admin().unwrap().inspect(&k).await.unwrap_err(),
            store.claim(&r).await.unwrap_err(),
        ] {
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
            let text = e.to_string();
            assert!(text.contains(&scope), "{text}");
        }
    }
    let (store, pool, drop_pg) = postgres().await;
    let table = store.table();
    case(store, async |k| {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET status = 7 WHERE scope = $1"
        )))
        .bind(k.scope().to_owned())
        .execute(&pool)
        .await
        .unwrap();
    })
    .await;
    sqlx::query(AssertSqlSafe(drop_pg))
        .execute(&pool)
        .await
        .unwrap();
    let (store, pool, drop_my) = mysql().await;
    let table = store.table();
    case(store, async |k| {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET status = 7 WHERE scope = ?"
        )))
        .bind(k.scope().to_owned())
        .execute(&pool)
        .await
        .unwrap();
    })
    .await;
    sqlx::query(AssertSqlSafe(drop_my))
        .execute(&pool)
        .await
        .unwrap();
    let (store, pool, _) = sqlite().await;
    let table = store.table();
    case(store, async |k| {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET status = 7 WHERE scope = ?"
        )))
        .bind(k.scope().to_owned())
        .execute(&pool)
        .await
        .unwrap();
    })
    .await;
}
