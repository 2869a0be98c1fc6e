//! `PostgresStore`: the conformance suite against the shared server
//! (`IDEMPOTENT_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`), and
//! the PostgreSQL-specific behaviour: round trips, the database clock, killed
//! connections, a server that goes away, table names, purging and bad data.
#![cfg(feature = "postgres")]

use idempotent_runtime::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use idempotent_runtime::sqlx::{self, AssertSqlSafe};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{ClaimOutcome, Completion, Fence, RecordState, Release};
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{
    Error, Idempotency, PostgresStore, RecordKey, Store, StoreErrorKind, Token,
};
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

const URL_VAR: &str = "IDEMPOTENT_POSTGRES_URL";

fn url() -> String {
    env_url(URL_VAR, "postgres://postgres@127.0.0.1:5432/test")
}

fn options() -> PgConnectOptions {
    PgConnectOptions::from_str(&url())
        .unwrap_or_else(|e| panic!("{URL_VAR} is not a PostgreSQL URL: {e}"))
}

/// A store on the shared server (default table); panics, naming the variable, when
/// the server is unreachable.
async fn connect() -> PostgresStore {
    let url = url();
    PostgresStore::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "the PostgreSQL tests need a server at {url} (set {URL_VAR} to use another): {e} ({:?})",
            std::error::Error::source(&e)
        )
    })
}

/// A pool of one connection that is not pinged before use (so a dead connection is
/// used, and fails, instead of being replaced silently).
async fn one_connection(opts: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL (set {URL_VAR}): {e}"))
}

async fn admin() -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL (set {URL_VAR}): {e}"))
}

/// Runs `sql` on `admin`; panics, naming the statement, when it fails.
async fn exec(admin: &PgPool, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql))
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

async fn db_now_us(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8")
        .fetch_one(pool)
        .await
        .expect("clock")
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

/// Each protocol step is one statement: with the statements prepared (first use on a
/// connection), a fresh claim, a completion and the duplicate of a completed key each
/// cost exactly one round trip, counted on the wire by a proxy (the pool's own ping
/// when a connection goes back to it is counted apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_is_one_round_trip() {
    connect().await; // the table exists
    let opts = options();
    let target = format!("{}:{}", opts.get_host(), opts.get_port());
    let proxy = Proxy::start(&target, Wire::Postgres).await;
    let opts = opts.port(proxy.port()).ssl_mode(PgSslMode::Disable);
    let store = PostgresStore::from_pool(one_connection(opts).await);
    let scope = single_steps_are_one_round_trip(&store, &proxy, "pg-rt").await;

    // a batch of 50 claims, then 50 completions: one round trip each
    let keys: Vec<RecordKey> = (0..50)
        .map(|i| RecordKey::new(&scope, &format!("b-{i}")).unwrap())
        .collect();
    let reqs: Vec<_> = keys.iter().map(|k| req(k, TTL)).collect();
    store.claim_batch(&reqs[..1]).await.unwrap(); // prepare
    let before = proxy.round_trips();
    let outcomes = store.claim_batch(&reqs).await.unwrap();
    assert_eq!(proxy.round_trips() - before, 1, "claim_batch");
    let completions: Vec<_> = keys
        .iter()
        .zip(&outcomes)
        .map(|(k, o)| match o {
            ClaimOutcome::Acquired { token, .. } => Completion {
                key: k,
                token: *token,
                output: Some(b"b"),
                ttl: TTL,
            },
            // the first key was claimed by the preparing call
            ClaimOutcome::InProgress { .. } => Completion {
                key: k,
                token: Token::new(0),
                output: None,
                ttl: TTL,
            },
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    store.complete_batch(&completions[..1]).await.unwrap(); // prepare
    let before = proxy.round_trips();
    let fences = store.complete_batch(&completions).await.unwrap();
    assert_eq!(proxy.round_trips() - before, 1, "complete_batch");
    assert_eq!(fences[0], Fence::Lost);
    assert!(fences[1..].iter().all(|f| *f == Fence::Held));
}

/// Lease and expiry decisions use the database clock: a store whose session resolves
/// `clock_timestamp()` to a clock two hours ahead writes leases two hours ahead, and
/// a store on the real database clock sees a claim with two hours left, although every
/// client shares one clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_use_the_database_clock() {
    let real = connect().await;
    let admin = admin().await;
    let schema = unique_name("skewed_clock");
    let skewed_clock = format!(
        "CREATE SCHEMA {schema}; \
         CREATE FUNCTION {schema}.clock_timestamp() RETURNS timestamptz LANGUAGE sql \
         AS 'SELECT pg_catalog.clock_timestamp() + interval ''2 hours''';"
    );
    exec(&admin, &skewed_clock).await;
    let skewed_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options().options([("search_path", format!("{schema},public,pg_catalog"))]))
        .await
        .expect("connect with the skewed clock");
    let skewed = PostgresStore::from_pool(skewed_pool);

    let scope = unique_scope("pg-clock");
    let k = RecordKey::new(&scope, "m-1").unwrap();
    let lease = Duration::from_secs(5);
    let now = db_now_us(&admin).await;
    let token = acquire(&skewed, &req(&k, lease)).await;
    // the token is at least the (skewed) database clock in microseconds
    assert!(
        token.get() as i64 >= now + 7_190_000_000,
        "token {token} vs now {now}"
    );
    match real.claim(&req(&k, lease)).await.unwrap() {
        ClaimOutcome::InProgress { retry_after } => assert!(
            retry_after > Duration::from_secs(7100) && retry_after < Duration::from_secs(7300),
            "retry_after {retry_after:?}"
        ),
        other => panic!("expected InProgress, got {other:?}"),
    }
    // the holder sees its own lease on its own (database) clock
    let rec = skewed.inspect(&k).await.unwrap().unwrap();
    assert!(rec.lease_remaining.unwrap() <= lease);
    let rec = real.inspect(&k).await.unwrap().unwrap();
    assert!(rec.lease_remaining.unwrap() > Duration::from_secs(7100));
    exec(&admin, &format!("DROP SCHEMA {schema} CASCADE")).await;
}

/// A connection killed while a claim waits on it: the delivery fails closed with
/// `Error::Store` (the body does not run), and the same store recovers on the next
/// delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_fails_closed_and_recovers() {
    connect().await;
    let admin = admin().await;
    let pool = one_connection(options()).await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    sql_support::killed_connection_fails_closed_and_recovers(
        Arc::new(PostgresStore::from_pool(pool)),
        "pg-kill",
        async |scope| {
            let mut tx = admin.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM message_idempotent WHERE scope = $1 FOR UPDATE")
                .bind(scope)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        },
        async || {
            sqlx::query_scalar(
                "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
            )
            .bind(pid)
            .fetch_one(&admin)
            .await
            .unwrap()
        },
        async || {
            let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&admin)
                .await
                .unwrap();
            assert!(killed);
        },
        async |tx| tx.rollback().await.unwrap(),
    )
    .await;
}

/// Kills every connection `pool` holds once they are idle again, from `admin`.
async fn kill_idle_connections(pool: &PgPool, admin: &PgPool) {
    sql_support::kill_idle_connections(
        pool.size(),
        async || {
            let mut conn = pool.acquire().await.unwrap();
            let id: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            (conn, id.to_string())
        },
        || pool.num_idle(),
        async |id| exec(admin, &format!("SELECT pg_terminate_backend({id})")).await,
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
        "pg-idle",
        Arc::new(PostgresStore::from_pool(pool.clone())),
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
    let mut proxy = Proxy::start(&target, Wire::Postgres).await;
    let store = PostgresStore::from_pool(one_connection(opts.port(proxy.port())).await);
    fails_closed_while_the_server_is_away(Arc::new(store), &mut proxy, "pg-away").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_are_validated_and_custom_tables_work() {
    let store = connect().await;
    for bad in ["", "a-b", "x; DROP TABLE y", "a.b.c", "\"q\"", "1x"] {
        let e = store.clone().with_table(bad).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Rejected, "{bad:?}");
    }
    let e = PostgresStore::connect_with_table(&url(), "no good")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Rejected);

    // a table that does not exist is a Rejected error, not a panic
    let missing = store.clone().with_table(&unique_name("missing")).unwrap();
    let k = RecordKey::new("s", "k").unwrap();
    let e = missing.claim(&req(&k, TTL)).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e:?}");
    assert!(!e.is_retryable());

    // a schema-qualified custom table, created by migrate (twice: idempotent)
    let admin = admin().await;
    let schema = unique_name("idem_schema");
    exec(&admin, &format!("CREATE SCHEMA {schema}")).await;
    let custom = store.with_table(&format!("{schema}.Dedup_Table")).unwrap();
    custom.migrate().await.unwrap();
    custom.migrate().await.unwrap();
    assert_eq!(custom.table(), format!("{schema}.Dedup_Table"));
    let t = acquire(&custom, &req(&k, TTL)).await;
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.\"Dedup_Table\" WHERE owner_token = $1"
    )))
    .bind(t.get() as i64)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(n, 1);
    // concurrent migrations of a new table do not trip over each other
    let fresh = custom
        .clone()
        .with_table(&format!("{schema}.concurrent"))
        .unwrap();
    let all = futures_util::future::join_all((0..6).map(|_| fresh.migrate())).await;
    assert!(all.iter().all(Result::is_ok), "{all:?}");
    exec(&admin, &format!("DROP SCHEMA {schema} CASCADE")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_expired_rows_in_batches_and_the_sweeper_runs_it() {
    let admin = admin().await;
    let store = connect().await.with_table(&unique_name("purge")).unwrap();
    store.migrate().await.unwrap();
    purge_and_sweep_table(
        &store,
        |every| store.spawn_sweeper(every).unwrap(),
        &format!("\"{}\"", store.table()),
        "int4send(g) FROM generate_series(1, 2500) g",
        async |sql| exec(&admin, sql).await,
        async |sql| {
            sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&admin)
                .await
                .unwrap()
        },
    )
    .await;
}

/// A row this store did not write (bad status, negative token) is a `Corrupt` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rows_are_corrupt_errors() {
    let store = connect().await;
    let admin = admin().await;
    let scope = unique_scope("pg-corrupt");
    let k = RecordKey::new(&scope, "m").unwrap();
    let t = acquire(&store, &req(&k, TTL)).await;
    sqlx::query("UPDATE message_idempotent SET status = 7 WHERE scope = $1")
        .bind(&scope)
        .execute(&admin)
        .await
        .unwrap();
    let e = store.claim(&req(&k, TTL)).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
    let e = store.inspect(&k).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
    sqlx::query("UPDATE message_idempotent SET status = 0, owner_token = -5 WHERE scope = $1")
        .bind(&scope)
        .execute(&admin)
        .await
        .unwrap();
    let e = store.inspect(&k).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
    // the owner's steps say so too, rather than that the claim was lost
    let e = store
        .release(&Release { key: &k, token: t })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
}

/// The states map onto the documented columns (`status`, `retry_times`, and a NULL
/// lease deadline for Released), so a DBA can read the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_use_the_classic_columns() {
    let store = connect().await;
    let admin = admin().await;
    let scope = unique_scope("pg-cols");
    let k = RecordKey::new(&scope, "order-17").unwrap();
    let row = |admin: PgPool, scope: String| async move {
        sqlx::query_as::<_, (Vec<u8>, i16, i32, Option<i64>)>(
            "SELECT message_id, status, retry_times, lease_until_us FROM message_idempotent WHERE scope = $1",
        )
        .bind(scope)
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    let t = acquire(&store, &req(&k, TTL)).await;
    let (id, status, retry, lease) = row(admin.clone(), scope.clone()).await;
    assert_eq!((id.as_slice(), status, retry), (&b"order-17"[..], 0, 1));
    assert!(lease.is_some());
    store.release(&Release { key: &k, token: t }).await.unwrap();
    let (_, status, retry, lease) = row(admin.clone(), scope.clone()).await;
    assert_eq!((status, retry, lease), (0, 1, None));
    assert_eq!(
        store.inspect(&k).await.unwrap().unwrap().state,
        RecordState::Released
    );
    let t = acquire(&store, &req(&k, TTL)).await;
    store
        .complete(&Completion {
            key: &k,
            token: t,
            output: Some(b"{}"),
            ttl: TTL,
        })
        .await
        .unwrap();
    let (_, status, retry, lease) = row(admin, scope).await;
    assert_eq!((status, retry, lease), (1, 2, None));
}

/// Regression: connecting to a closed port took 30 s and said only "pool timed out
/// while waiting for an open connection"; it fails at once, `Unavailable`, with the
/// refused connection as the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_fast_with_the_cause() {
    let url = format!("postgres://postgres@127.0.0.1:{}/test", free_port());
    refused_connection_fails_fast(PostgresStore::connect(&url)).await;
    refused_connection_fails_fast(PostgresStore::connect_with_table(&url, "t")).await;
}

/// Regression: a scope containing a NUL byte was reported as `Corrupt` ("the database
/// returned data this store does not understand"); PostgreSQL cannot store NUL in a
/// text column, so it is a request the database cannot store: `Rejected`, with a
/// message naming the NUL, on every step and through the protocol (the body does not
/// run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_with_a_nul_is_rejected_not_corrupt() {
    let store = connect().await;
    let scope = format!("{}\0tail", unique_scope("pg-nul"));
    let k = RecordKey::new(&scope, "m").unwrap();
    let check = |step: &str, e: idempotent_runtime::StoreError| {
        assert_eq!(e.kind(), StoreErrorKind::Rejected, "{step}: {e:?}");
        assert!(e.to_string().contains("NUL"), "{step}: {e}");
    };
    check("claim", store.claim(&req(&k, TTL)).await.unwrap_err());
    check(
        "claim_batch",
        store.claim_batch(&[req(&k, TTL)]).await.unwrap_err(),
    );
    check("inspect", store.inspect(&k).await.unwrap_err());
    check("forget", store.forget(&k).await.unwrap_err());
    let c = Completion {
        key: &k,
        token: Token::new(1),
        output: None,
        ttl: TTL,
    };
    check("complete", store.complete(&c).await.unwrap_err());
    check(
        "complete_batch",
        store.complete_batch(&[c]).await.unwrap_err(),
    );
    let r = Release {
        key: &k,
        token: Token::new(1),
    };
    check("release", store.release(&r).await.unwrap_err());
    check(
        "release_batch",
        store.release_batch(&[r]).await.unwrap_err(),
    );
    check(
        "renew",
        store.renew(&k, Token::new(1), TTL).await.unwrap_err(),
    );
    let h = Idempotency::new(scope.clone()).store(store.clone());
    let r: Result<u32, Error> = h.run("m", async { Ok(1) }).await;
    match r {
        Err(Error::Store(e)) => check("run", e),
        other => panic!("expected a Rejected store error, got {other:?}"),
    }
}

/// Regression: a lease of `i64::MIN` let a claim take the row over (and a row with
/// an out-of-range value failed with a database error that named no record). Every
/// value the store never writes, in every column, is a `Corrupt` error naming the
/// scope, for every step, and the row stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_fail_as_corrupt_and_stay_unchanged() {
    let store = connect().await;
    let admin = admin().await;
    corrupt_records_are_refused_unchanged(
        Arc::new(store),
        "pg-corrupt",
        CORRUPTIONS,
        async |scope, clause| {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE message_idempotent SET {clause} WHERE scope = $1"
            )))
            .bind(scope)
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("{clause}: {e}"));
        },
        async |scope| {
            sqlx::query_scalar(
                "SELECT concat_ws(',', status, retry_times, owner_token, \
                    coalesce(lease_until_us::text, 'null'), expires_at_us, \
                    encode(fingerprint, 'hex'), encode(output, 'hex')) \
                 FROM message_idempotent WHERE scope = $1",
            )
            .bind(scope)
            .fetch_one(&admin)
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
    let store = connect().await;
    sql_support::repeated_completion_by_the_same_claim_is_held(&store).await;
}

/// Regression: a lock timeout (or a deadlock, or a serialization failure) in a store
/// step was `StoreErrorKind::Other`; it is a `Conflict` (retryable), as in
/// transactional mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_is_a_retryable_conflict() {
    connect().await;
    let admin = admin().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, "SET lock_timeout = '300ms'").await?;
                Ok(())
            })
        })
        .connect_with(options())
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool);
    let scope = unique_scope("pg-lockwait");
    let k = RecordKey::new(&scope, "m").unwrap();
    let t = acquire(&store, &req(&k, TTL)).await;
    let mut tx = admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM message_idempotent WHERE scope = $1 FOR UPDATE")
        .bind(&scope)
        .execute(&mut *tx)
        .await
        .unwrap();
    let e = store.renew(&k, t, TTL).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Conflict, "{e:?}");
    assert!(e.is_retryable());
    tx.rollback().await.unwrap();
    assert_eq!(store.renew(&k, t, TTL).await.unwrap(), Fence::Held);
}
