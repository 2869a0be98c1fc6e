//! `MySqlStore`: the conformance suite against the shared server
//! (`IDEMPOTENT_MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`; MariaDB 10.11 or
//! MySQL 8), and the MySQL-specific behaviour: round trips, the database clock, killed
//! connections, a server that goes away, table names, purging and bad data.
#![cfg(feature = "mysql")]

use idempotent_runtime::sqlx::mysql::{
    MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlSslMode,
};
use idempotent_runtime::sqlx::{self, AssertSqlSafe, Executor};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{ClaimOutcome, Completion, Fence, RecordState, Release};
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{Error, Idempotency, MySqlStore, RecordKey, Store, StoreErrorKind, Token};
use idempotent_tests::proxy::{Proxy, Wire};
use idempotent_tests::sql_support::{
    self, CORRUPTIONS, TTL, acquire, corrupt_records_are_refused_unchanged, env_url,
    fails_closed_while_the_server_is_away, free_port, poison_is_shared, purge_and_sweep_table,
    race_two_stores, refused_connection_fails_fast, req, single_steps_are_one_round_trip,
    sql_keys_are_data, unique_name,
};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

const URL_VAR: &str = "IDEMPOTENT_MYSQL_URL";

fn url() -> String {
    env_url(URL_VAR, "mysql://root@127.0.0.1:3306/test")
}

fn options() -> MySqlConnectOptions {
    MySqlConnectOptions::from_str(&url())
        .unwrap_or_else(|e| panic!("{URL_VAR} is not a MySQL URL: {e}"))
}

/// A store on the shared server (default table); panics, naming the variable, when
/// the server is unreachable.
async fn connect() -> MySqlStore {
    let url = url();
    MySqlStore::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "the MySQL tests need a server at {url} (set {URL_VAR} to use another): {e} ({:?})",
            std::error::Error::source(&e)
        )
    })
}

/// A pool of one connection that is not pinged before use.
async fn one_connection(opts: MySqlConnectOptions) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to MySQL (set {URL_VAR}): {e}"))
}

async fn admin() -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(2)
        .connect_with(options())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to MySQL (set {URL_VAR}): {e}"))
}

/// Runs `sql` on `admin`; panics, naming the statement, when it fails.
async fn exec(admin: &MySqlPool, sql: &str) {
    sqlx::query(AssertSqlSafe(sql))
        .execute(admin)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

idempotent_runtime::protocol_conformance_suite!(async {
    Arc::new(connect().await) as Arc<dyn Store>
});
idempotent_runtime::admin_conformance_suite!(async { Arc::new(connect().await) as Arc<dyn Store> });

/// The protocol cases with the store's single steps coalesced into batch calls.
mod coalesced {
    use super::*;
    use idempotent_runtime::store::coalesce::Coalesced;
    idempotent_runtime::protocol_conformance_suite!(async {
        Arc::new(Coalesced::new(connect().await)) as Arc<dyn Store>
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_separate_pools_run_each_key_once() {
    let a = Arc::new(connect().await) as Arc<dyn Store>;
    let b = Arc::new(connect().await) as Arc<dyn Store>;
    race_two_stores(a, b, 40, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoning_is_shared_between_stores() {
    let a = Arc::new(connect().await) as Arc<dyn Store>;
    let b = Arc::new(connect().await) as Arc<dyn Store>;
    poison_is_shared(a, b, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_metacharacters_and_binary_keys_are_data() {
    sql_keys_are_data(Arc::new(connect().await)).await;
}

/// Round trips on the wire, with the statements prepared: a claim is one (the claim
/// procedure), whether fresh or the duplicate of a completed key; complete and renew
/// one each; a batch is one per step. Without the procedure a fresh claim takes two
/// (read, then insert) and a duplicate still one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_step() {
    connect().await;
    let opts = options();
    let target = format!("{}:{}", opts.get_host(), opts.get_port());
    let proxy = Proxy::start(&target, Wire::MySql).await;
    let opts = opts.port(proxy.port()).ssl_mode(MySqlSslMode::Disabled);
    let store = MySqlStore::from_pool(one_connection(opts).await);
    let scope = single_steps_are_one_round_trip(&store, &proxy, "my-rt").await;

    // a batch of completed duplicates: one read for the whole batch
    let keys: Vec<RecordKey> = (0..20)
        .map(|i| RecordKey::new(&scope, &format!("b-{i}")).unwrap())
        .collect();
    for k in &keys {
        let t = acquire(&store, &req(k, TTL)).await;
        store
            .complete(&Completion {
                key: k,
                token: t,
                output: Some(b"b"),
                ttl: TTL,
            })
            .await
            .unwrap();
    }
    let reqs: Vec<_> = keys.iter().map(|k| req(k, TTL)).collect();
    store.claim_batch(&reqs).await.unwrap(); // prepare
    let before = proxy.round_trips();
    let outcomes = store.claim_batch(&reqs).await.unwrap();
    assert_eq!(proxy.round_trips() - before, 1, "claim_batch of duplicates");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ClaimOutcome::Completed { .. }))
    );

    // fresh batches: one read and one insert to claim, one statement to complete or
    // release (each statement prepared by a first batch of the same size)
    for round in 0..2 {
        let keys: Vec<RecordKey> = (0..20)
            .map(|i| RecordKey::new(&scope, &format!("f-{round}-{i}")).unwrap())
            .collect();
        let reqs: Vec<_> = keys.iter().map(|k| req(k, TTL)).collect();
        let before = proxy.round_trips();
        let outcomes = store.claim_batch(&reqs).await.unwrap();
        let claim_trips = proxy.round_trips() - before;
        let tokens: Vec<Token> = outcomes
            .iter()
            .map(|o| match o {
                ClaimOutcome::Acquired { token, attempt: 1 } => *token,
                other => panic!("expected Acquired, got {other:?}"),
            })
            .collect();
        let completions: Vec<Completion<'_>> = keys[..10]
            .iter()
            .zip(&tokens)
            .map(|(key, &token)| Completion {
                key,
                token,
                output: Some(b"c"),
                ttl: TTL,
            })
            .collect();
        let releases: Vec<Release<'_>> = keys[10..]
            .iter()
            .zip(&tokens[10..])
            .map(|(key, &token)| Release { key, token })
            .collect();
        let before = proxy.round_trips();
        let fences = store.complete_batch(&completions).await.unwrap();
        let complete_trips = proxy.round_trips() - before;
        assert!(fences.iter().all(|f| *f == Fence::Held));
        let before = proxy.round_trips();
        let fences = store.release_batch(&releases).await.unwrap();
        let release_trips = proxy.round_trips() - before;
        assert!(fences.iter().all(|f| *f == Fence::Held));
        if round == 1 {
            assert_eq!(claim_trips, 2, "claim_batch of fresh keys");
            assert_eq!(complete_trips, 1, "complete_batch");
            assert_eq!(release_trips, 1, "release_batch");
        }
    }
}

/// Batches whose items are partly stale: each item gets its own fence, in order,
/// and a key repeated in a batch is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_fences_are_per_item() {
    let store = connect().await;
    let scope = unique_scope("my-fences");
    let keys: Vec<RecordKey> = (0..6)
        .map(|i| RecordKey::new(&scope, &format!("m-{i}")).unwrap())
        .collect();
    let mut tokens = Vec::new();
    for k in &keys {
        tokens.push(acquire(&store, &req(k, TTL)).await);
    }
    // key 1 is completed and key 4 released by their owners beforehand: stale in a batch
    store
        .complete(&Completion {
            key: &keys[1],
            token: tokens[1],
            output: Some(b"x"),
            ttl: TTL,
        })
        .await
        .unwrap();
    store
        .release(&Release {
            key: &keys[4],
            token: tokens[4],
        })
        .await
        .unwrap();
    let completions: Vec<Completion<'_>> = [0, 1, 2, 0]
        .iter()
        .map(|&i| Completion {
            key: &keys[i],
            token: if i == 2 {
                Token::new(tokens[2].get() + 1)
            } else {
                tokens[i]
            },
            output: Some(b"y"),
            ttl: TTL,
        })
        .collect();
    // key 1 and the repeat of key 0 are Completed by the item's own claim: Held
    assert_eq!(
        store.complete_batch(&completions).await.unwrap(),
        vec![Fence::Held, Fence::Held, Fence::Lost, Fence::Held]
    );
    let releases: Vec<Release<'_>> = [3, 5, 3]
        .iter()
        .map(|&i| Release {
            key: &keys[i],
            token: tokens[i],
        })
        .collect();
    // the repeat of key 3 is a release by the claim that released it: Held
    assert_eq!(
        store.release_batch(&releases).await.unwrap(),
        vec![Fence::Held, Fence::Held, Fence::Held]
    );
    let stale = [Release {
        key: &keys[2],
        token: Token::new(tokens[2].get() + 1),
    }];
    assert_eq!(
        store.release_batch(&stale).await.unwrap(),
        vec![Fence::Lost]
    );
    assert_eq!(
        store.inspect(&keys[0]).await.unwrap().unwrap().output,
        Some(b"y".to_vec())
    );
    assert_eq!(
        store.inspect(&keys[2]).await.unwrap().unwrap().state,
        RecordState::InProgress
    );
}

/// Without the claim procedure (a store on a table whose procedure was never created)
/// claims fall back to the two statements and follow the same rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_work_without_the_procedure() {
    connect().await;
    let admin = admin().await;
    let table = unique_name("idem_noproc");
    let store = MySqlStore::connect_with_table(&url(), &table)
        .await
        .unwrap();
    exec(&admin, &format!("DROP PROCEDURE `{table}_claim_v2`")).await;
    let store = MySqlStore::from_pool(store.pool().clone())
        .with_table(&table)
        .unwrap();
    let scope = unique_scope("my-noproc");
    let k = RecordKey::new(&scope, "m-1").unwrap();
    let t = acquire(&store, &req(&k, TTL)).await;
    assert!(matches!(
        store.claim(&req(&k, TTL)).await.unwrap(),
        ClaimOutcome::InProgress { .. }
    ));
    store.release(&Release { key: &k, token: t }).await.unwrap();
    match store.claim(&req(&k, TTL)).await.unwrap() {
        ClaimOutcome::Acquired { token, attempt } => {
            assert!(token > t);
            assert_eq!(attempt, 2);
        }
        other => panic!("expected Acquired, got {other:?}"),
    }
    // migrate creates it again, and claims use it
    store.migrate().await.unwrap();
    let k2 = RecordKey::new(&scope, "m-2").unwrap();
    acquire(&store, &req(&k2, TTL)).await;
    exec(&admin, &format!("DROP TABLE `{table}`")).await;
    exec(&admin, &format!("DROP PROCEDURE `{table}_claim_v2`")).await;
}

/// Lease and expiry decisions use the database clock: a store whose sessions run two
/// hours ahead (`SET timestamp`) writes leases two hours ahead, and a store on the
/// real database clock sees a claim with two hours left, although every client shares
/// one clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_use_the_database_clock() {
    let real = connect().await;
    // one connection: `SET timestamp` freezes that session's clock
    let skewed_pool = MySqlPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET timestamp = UNIX_TIMESTAMP(NOW(6)) + 7200")
                    .await?;
                Ok(())
            })
        })
        .connect_with(options())
        .await
        .expect("connect with the skewed clock");
    let skewed = MySqlStore::from_pool(skewed_pool);
    let scope = unique_scope("my-clock");
    let k = RecordKey::new(&scope, "m-1").unwrap();
    let lease = Duration::from_secs(5);
    let before_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let token = acquire(&skewed, &req(&k, lease)).await;
    assert!(
        token.get() >= before_us + 7_190_000_000,
        "token {token} follows the database clock, not the client's ({before_us})"
    );
    match real.claim(&req(&k, lease)).await.unwrap() {
        ClaimOutcome::InProgress { retry_after } => assert!(
            retry_after > Duration::from_secs(7100) && retry_after < Duration::from_secs(7300),
            "retry_after {retry_after:?}"
        ),
        other => panic!("expected InProgress, got {other:?}"),
    }
    let rec = skewed.inspect(&k).await.unwrap().unwrap();
    assert!(rec.lease_remaining.unwrap() <= lease);
}

/// A connection killed while a claim waits on a row lock: the delivery fails closed
/// with `Error::Store` (the body does not run), and the same store recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_fails_closed_and_recovers() {
    connect().await;
    let admin = admin().await;
    let pool = one_connection(options()).await;
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&pool)
        .await
        .unwrap();
    sql_support::killed_connection_fails_closed_and_recovers(
        Arc::new(MySqlStore::from_pool(pool)),
        "my-kill",
        async |scope| {
            let mut tx = admin.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM message_idempotent WHERE scope = ? FOR UPDATE")
                .bind(scope.as_bytes())
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        },
        async || {
            sqlx::query_scalar::<_, String>(
                "SELECT STATE FROM information_schema.PROCESSLIST WHERE ID = ? AND INFO LIKE 'UPDATE%'",
            )
            .bind(id)
            .fetch_optional(&admin)
            .await
            .unwrap()
            .is_some()
        },
        async || {
            exec(&admin, &format!("KILL {id}")).await;
        },
        async |tx| tx.rollback().await.unwrap(),
    )
    .await;
}

/// Kills every connection `pool` holds once they are idle again, from `admin`.
async fn kill_idle_connections(pool: &MySqlPool, admin: &MySqlPool) {
    sql_support::kill_idle_connections(
        pool.size(),
        async || {
            let mut conn = pool.acquire().await.unwrap();
            let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            (conn, id.to_string())
        },
        || pool.num_idle(),
        async |id| exec(admin, &format!("KILL {id}")).await,
    )
    .await;
}

/// See [`sql_support::killed_idle_connections_are_replaced`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_while_idle_are_replaced() {
    let admin = admin().await;
    let pool = one_connection(options()).await;
    let pooled = Arc::new(connect().await);
    sql_support::killed_idle_connections_are_replaced(
        "my-idle",
        Arc::new(MySqlStore::from_pool(pool.clone())),
        async || kill_idle_connections(&pool, &admin).await,
        pooled.clone(),
        async || kill_idle_connections(pooled.pool(), &admin).await,
    )
    .await;
}

/// The server's port goes away: deliveries fail closed with an `Unavailable` store
/// error; when it comes back the same store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_going_away_fails_closed_and_recovers() {
    connect().await;
    let opts = options();
    let target = format!("{}:{}", opts.get_host(), opts.get_port());
    let mut proxy = Proxy::start(&target, Wire::MySql).await;
    let store = MySqlStore::from_pool(one_connection(opts.port(proxy.port())).await);
    fails_closed_while_the_server_is_away(Arc::new(store), &mut proxy, "my-away").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_are_validated_and_custom_tables_work() {
    let store = connect().await;
    for bad in ["", "a-b", "x; DROP TABLE y", "a.b.c", "`q`", "1x"] {
        let e = store.clone().with_table(bad).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Rejected, "{bad:?}");
    }
    let missing = store.clone().with_table(&unique_name("missing")).unwrap();
    let k = RecordKey::new("s", "k").unwrap();
    let e = missing.claim(&req(&k, TTL)).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e:?}");
    assert!(!e.is_retryable());

    let admin = admin().await;
    let name = unique_name("custom");
    let custom = store.with_table(&format!("test.{name}")).unwrap();
    custom.migrate().await.unwrap();
    custom.migrate().await.unwrap();
    let t = acquire(&custom, &req(&k, TTL)).await;
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM test.`{name}` WHERE owner_token = ?"
    )))
    .bind(t.get() as i64)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(n, 1);
    exec(&admin, &format!("DROP TABLE test.`{name}`")).await;
    exec(&admin, &format!("DROP PROCEDURE test.`{name}_claim_v2`")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_expired_rows_in_batches_and_the_sweeper_runs_it() {
    let admin = admin().await;
    let store = connect().await.with_table(&unique_name("purge")).unwrap();
    store.migrate().await.unwrap();
    purge_and_sweep_table(
        &store,
        |every| store.spawn_sweeper(every).unwrap(),
        &format!("`{}`", store.table()),
        "seq FROM seq_1_to_2500", // MariaDB's sequence engine
        async |sql| exec(&admin, sql).await,
        async |sql| {
            sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&admin)
                .await
                .unwrap()
        },
    )
    .await;
    // the table is gone; its claim procedure goes too
    exec(
        &admin,
        &format!("DROP PROCEDURE `{}_claim_v2`", store.table()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rows_are_corrupt_errors_and_columns_are_classic() {
    let store = connect().await;
    let admin = admin().await;
    let scope = unique_scope("my-corrupt");
    let k = RecordKey::new(&scope, "order-17").unwrap();
    let t = acquire(&store, &req(&k, TTL)).await;
    store.release(&Release { key: &k, token: t }).await.unwrap();
    let (id, status, retry, lease): (Vec<u8>, i8, i32, Option<i64>) = sqlx::query_as(
        "SELECT message_id, status, retry_times, lease_until_us FROM message_idempotent WHERE scope = ?",
    )
    .bind(scope.as_bytes())
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(
        (id.as_slice(), status, retry, lease),
        (&b"order-17"[..], 0, 1, None)
    );
    assert_eq!(
        store.inspect(&k).await.unwrap().unwrap().state,
        RecordState::Released
    );
    sqlx::query("UPDATE message_idempotent SET status = 7 WHERE scope = ?")
        .bind(scope.as_bytes())
        .execute(&admin)
        .await
        .unwrap();
    let e = store.claim(&req(&k, TTL)).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
}

/// Regression: connecting to a closed port took 30 s and said only "pool timed out
/// while waiting for an open connection"; it fails at once with the refused
/// connection as the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_fast_with_the_cause() {
    let url = format!("mysql://root@127.0.0.1:{}/test", free_port());
    refused_connection_fails_fast(MySqlStore::connect(&url)).await;
    refused_connection_fails_fast(MySqlStore::connect_with_table(&url, "t")).await;
}

/// Regression: the `scope` column was `VARCHAR … COLLATE utf8mb4_bin`, a PAD SPACE
/// collation, so `"h_sc"` and `"h_sc "` were one primary key: the handler of the
/// second scope replayed the first one's output without running. Scopes are bytes
/// now; every byte is data, in single steps and batches alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_differing_only_by_trailing_spaces_are_separate_records() {
    let table = unique_name("idem_pad");
    let store = MySqlStore::connect_with_table(&url(), &table)
        .await
        .unwrap();
    let scope = unique_scope("h_sc");
    let scopes = [
        scope.clone(),
        format!("{scope} "),
        format!("{scope}  "),
        format!("{scope}\t"),
    ];
    for (n, s) in scopes.iter().enumerate() {
        let h = Idempotency::new(s.clone()).store(store.clone());
        let r: Result<usize, Error> = h.run("k", async move { Ok(n) }).await;
        assert_eq!(r.unwrap(), n, "scope {s:?} runs its own body");
    }
    for (n, s) in scopes.iter().enumerate() {
        let k = RecordKey::new(s, "k").unwrap();
        let rec = store.inspect(&k).await.unwrap().unwrap();
        assert_eq!(rec.output, Some(n.to_string().into_bytes()), "{s:?}");
    }
    // a batch over the same key in each scope
    let keys: Vec<RecordKey> = scopes
        .iter()
        .map(|s| RecordKey::new(s, "b").unwrap())
        .collect();
    let reqs: Vec<_> = keys.iter().map(|k| req(k, TTL)).collect();
    let out = store.claim_batch(&reqs).await.unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, ClaimOutcome::Acquired { attempt: 1, .. })),
        "{out:?}"
    );
    let admin = admin().await;
    exec(&admin, &format!("DROP TABLE `{table}`")).await;
    exec(&admin, &format!("DROP PROCEDURE `{table}_claim_v2`")).await;
}

/// Regression (migration): a table made by an earlier version, with the `VARCHAR`
/// scope column and the old claim procedure, is migrated by `connect`: the column
/// becomes `VARBINARY(200)` with its records intact, the new claim procedure is
/// created beside the old one (which processes of the earlier version still call),
/// and scopes differing by trailing spaces are then separate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_migrates_a_table_with_a_varchar_scope() {
    connect().await;
    let admin = admin().await;
    let table = unique_name("idem_oldscope");
    exec(
        &admin,
        &format!(
            "CREATE TABLE `{table}` (\
             scope VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, \
             message_id VARBINARY(130) NOT NULL, status TINYINT NOT NULL, \
             retry_times INT NOT NULL, owner_token BIGINT NOT NULL, \
             lease_until_us BIGINT NULL, expires_at_us BIGINT NOT NULL, \
             fingerprint VARBINARY(32) NULL, output LONGBLOB NULL, \
             PRIMARY KEY (scope, message_id), KEY expires_at_us_idx (expires_at_us)) \
             ENGINE = InnoDB"
        ),
    )
    .await;
    // sent as text: CREATE PROCEDURE cannot be a prepared statement
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE PROCEDURE `{table}_claim_v1` () BEGIN SELECT 1; END"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let scope = unique_scope("old");
    let old = RecordKey::new(&scope, "k").unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO `{table}` (scope, message_id, status, retry_times, owner_token, \
            lease_until_us, expires_at_us, fingerprint, output) \
         VALUES (?, ?, 1, 1, 1, NULL, \
            TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) + 3600000000, NULL, '5')"
    )))
    .bind(&scope)
    .bind(old.key())
    .execute(&admin)
    .await
    .unwrap();

    let store = MySqlStore::connect_with_table(&url(), &table)
        .await
        .unwrap();
    let column: String = sqlx::query_scalar(
        "SELECT CAST(COLUMN_TYPE AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'scope'",
    )
    .bind(&table)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(column, "varbinary(200)");
    let procedures: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(ROUTINE_NAME AS CHAR) FROM information_schema.ROUTINES \
         WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME LIKE ? ORDER BY 1",
    )
    .bind(format!("{table}\\_%"))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(
        procedures,
        vec![format!("{table}_claim_v1"), format!("{table}_claim_v2")]
    );

    let h = Idempotency::new(scope.clone()).store(store.clone());
    let r: Result<u32, Error> = h.run("k", async { Ok(9) }).await;
    assert_eq!(r.unwrap(), 5, "the old record replays");
    let h = Idempotency::new(format!("{scope} ")).store(store.clone());
    let r: Result<u32, Error> = h.run("k", async { Ok(9) }).await;
    assert_eq!(
        r.unwrap(),
        9,
        "a scope with a trailing space is its own record"
    );
    // migrating again changes nothing
    store.migrate().await.unwrap();
    exec(&admin, &format!("DROP TABLE `{table}`")).await;
    exec(&admin, &format!("DROP PROCEDURE `{table}_claim_v1`")).await;
    exec(&admin, &format!("DROP PROCEDURE `{table}_claim_v2`")).await;
}

/// Runs `UPDATE <table> SET <clause> WHERE scope = <scope>` on `admin`.
async fn corrupt(admin: &MySqlPool, table: &str, scope: &str, clause: &str) {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE `{table}` SET {clause} WHERE scope = ?"
    )))
    .bind(scope.as_bytes())
    .execute(admin)
    .await
    .unwrap_or_else(|e| panic!("{clause}: {e}"));
}

/// The row of `scope` in `table` as text.
async fn snapshot(admin: &MySqlPool, table: &str, scope: &str) -> String {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT CAST(CONCAT_WS(',', status, retry_times, owner_token, \
            COALESCE(lease_until_us, 'null'), expires_at_us, COALESCE(HEX(fingerprint), ''), \
            COALESCE(HEX(output), '')) AS CHAR) FROM `{table}` WHERE scope = ?"
    )))
    .bind(scope.as_bytes())
    .fetch_one(admin)
    .await
    .unwrap()
}

/// Regression: a lease or expiry of `i64::MIN` made the claim procedure take the row
/// over and then fail its final step, leaving the row claimed with an attempt used
/// (the next delivery got `InProgress`). Every value the store never writes, in every
/// column, is now a `Corrupt` error naming the scope, for every step, with the claim
/// procedure and without it, and the row stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_fail_as_corrupt_and_stay_unchanged() {
    let store = connect().await;
    let admin = admin().await;
    let t = "message_idempotent";
    corrupt_records_are_refused_unchanged(
        Arc::new(store.clone()),
        "my-corrupt",
        CORRUPTIONS,
        async |scope, clause| corrupt(&admin, t, scope, clause).await,
        async |scope| snapshot(&admin, t, scope).await,
    )
    .await;

    // the two-statement claim (no procedure)
    let table = unique_name("idem_corrupt");
    let with_procedure = MySqlStore::connect_with_table(&url(), &table)
        .await
        .unwrap();
    exec(&admin, &format!("DROP PROCEDURE `{table}_claim_v2`")).await;
    let store = MySqlStore::from_pool(with_procedure.pool().clone())
        .with_table(&table)
        .unwrap();
    corrupt_records_are_refused_unchanged(
        Arc::new(store),
        "my-corrupt-noproc",
        CORRUPTIONS,
        async |scope, clause| corrupt(&admin, &table, scope, clause).await,
        async |scope| snapshot(&admin, &table, scope).await,
    )
    .await;
    exec(&admin, &format!("DROP TABLE `{table}`")).await;
}

/// Regression: a completion applied but whose reply was lost, retried with the same
/// token, was `Lost`; it is `Held`, alone and in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_completion_by_the_same_claim_is_held() {
    let store = connect().await;
    sql_support::repeated_completion_by_the_same_claim_is_held(&store).await;
}

/// Regression: a lock wait timeout (or a deadlock) in a store step was
/// `StoreErrorKind::Other`; it is a `Conflict` (retryable), as in transactional mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_wait_timeout_is_a_retryable_conflict() {
    connect().await;
    let admin = admin().await;
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET SESSION innodb_lock_wait_timeout = 1")
                    .await?;
                Ok(())
            })
        })
        .connect_with(options())
        .await
        .unwrap();
    let store = MySqlStore::from_pool(pool);
    let scope = unique_scope("my-lockwait");
    let k = RecordKey::new(&scope, "m").unwrap();
    let t = acquire(&store, &req(&k, TTL)).await;
    let mut tx = admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM message_idempotent WHERE scope = ? FOR UPDATE")
        .bind(scope.as_bytes())
        .execute(&mut *tx)
        .await
        .unwrap();
    let e = store.renew(&k, t, TTL).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Conflict, "{e:?}");
    assert!(e.is_retryable());
    tx.rollback().await.unwrap();
    assert_eq!(store.renew(&k, t, TTL).await.unwrap(), Fence::Held);
}
