//! The outbox cases of the benchmark (`--outbox postgres,mysql,sqlite`), run beside the
//! store cases and written to the same table.
//!
//! - **The handler** (PostgreSQL): a transactional handler that writes one business
//!   row and emits one message, with `#[idempotent(tx = "tx", outbox = "outbox")]`,
//!   beside the same handler without the outbox and beside the hand-written loop
//!   (`BEGIN`, `INSERT` of the dedup row `ON CONFLICT DO NOTHING`, the business
//!   `INSERT`, the outbox `INSERT`, `COMMIT`); with the immediate dispatch after the
//!   commit (`Relay::dispatch` to a `MemoryPublisher`) off and on. Sequential and with
//!   16 tasks, on tables that hold 500 messages of each handler and have statistics
//!   before the first round. The statements each sends per message are counted once,
//!   at the wire (a proxy in this process counts the Query and Execute messages the
//!   client sends).
//! - **The relay** (each database listed): `rows` pending rows written in one
//!   transaction, then drained to NATS JetStream by `Relay::drain`, beside a
//!   hand-written relay loop on the same table (`BEGIN`, `SELECT … ORDER BY seq LIMIT
//!   100 FOR UPDATE SKIP LOCKED`, each row published with its id in `Nats-Msg-Id`, the
//!   acks awaited together, `UPDATE … SET status = 1`, `COMMIT`; on SQLite `BEGIN
//!   IMMEDIATE` and a plain `SELECT`): the same batch size and the same publish
//!   concurrency (the whole batch at once) as the relay's defaults. The time of each
//!   phase of both loops is summed over the rounds.
//!
//! Everything a run writes is its own: a PostgreSQL schema `idempotent_bench_outbox_<pid>`
//! (the handlers' tables are found through its `search_path`, since the attribute names
//! them with literals), a MySQL table with the process id in its name, a SQLite file in
//! the run's temporary directory, a JetStream stream `IDEMPOTENT_BENCH_<pid>`; all are
//! dropped when the runtime's cases end.

use crate::{Comparison, Report, Row, Summary, drive, env_url, named, rounds, run_prefix, support};
use futures_util::future::join_all;
use idempotent_runtime::nats::async_nats::{self, HeaderMap, jetstream};
use idempotent_runtime::nats::{JetStreamPublisher, MESSAGE_ID_HEADER};
use idempotent_runtime::outbox::{
    Emission, MemoryPublisher, Outbox, OutboxPage, OutboxStats, OutboxStore, OutboxTransaction,
    Publisher, Relay, Retry, RowLease, RowStatus, Uuid, message_id,
};
use idempotent_runtime::sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use idempotent_runtime::sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use idempotent_runtime::sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use idempotent_runtime::sqlx::{
    self, AssertSqlSafe, MySqlPool, PgPool, Postgres, Row as _, SqlitePool, Transaction,
};
use idempotent_runtime::store::Fence;
use idempotent_runtime::{
    Error, MySqlOutbox, MySqlStore, PostgresOutbox, PostgresStore, RecordKey, SqliteOutbox,
    SqliteStore, StoreError, idempotent,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The databases `--outbox` accepts.
pub const DATABASES: [&str; 3] = ["postgres", "mysql", "sqlite"];

/// What the outbox rows compare, for the text above the table.
pub const ABOUT: &str = "Rows of the outbox (`--outbox`): `tx handler + outbox` is a PostgreSQL
transactional handler that writes one business row and emits one message, against the
hand-written transaction (`BEGIN`, dedup `INSERT … ON CONFLICT DO NOTHING`, business
`INSERT`, outbox `INSERT`, `COMMIT`); `outbox vs none` is the same handler against itself
without the outbox (target: time per message at most 1.3 × without, a ratio of at least
0.77), with the dispatch after the commit off, or on (`Relay::dispatch` to a
`MemoryPublisher`); `relay → NATS JetStream` is `Relay::drain` publishing pending rows to a
JetStream stream, against a hand-written `FOR UPDATE SKIP LOCKED` loop (on SQLite `BEGIN
IMMEDIATE`) with the same batch (100) and the same publish concurrency (the whole batch at
once), each round on a table emptied and filled again.
";

/// Rows one pass of both relay loops takes: the relay's default batch size.
const BATCH: usize = 100;

/// Tasks of the concurrent handler case (as the SQL store cases).
const TASKS: u64 = 16;

/// Messages per side of the statement count.
const COUNTED: u64 = 200;

/// time with the outbox ≤ 1.3 × without, as a throughput ratio
const HANDLER_TARGET: f64 = 1.0 / 1.3;

/// The relay's throughput must reach this, in messages per second.
const RELAY_TARGET: f64 = 5000.0;

fn nats_url() -> String {
    env_url("IDEMPOTENT_NATS_URL", "nats://127.0.0.1:4222")
}

fn postgres_url() -> String {
    env_url(
        "IDEMPOTENT_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

fn mysql_url() -> String {
    env_url("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}

/// Checks that NATS answers with JetStream on, before anything is measured (the
/// databases are checked with the store cases' servers).
pub async fn reach_nats() -> Result<(), String> {
    let url = nats_url();
    let server = support::Server {
        name: "NATS",
        addr: &url,
        start: "start one there with JetStream (`nats-server -js`) or set IDEMPOTENT_NATS_URL",
    };
    let client = server.reach(async_nats::connect(url.as_str())).await?;
    // JetStream answers when the run's stream can be made; each runtime's cases make
    // it again and drop it
    let js = jetstream::new(client);
    server.reach(create_stream(&js)).await?;
    let _ = js.delete_stream(stream()).await;
    Ok(())
}

/// Creates the stream of this run, if it is missing.
async fn create_stream(js: &jetstream::Context) -> Result<(), String> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: stream().to_owned(),
        subjects: vec![subject(">")],
        ..Default::default()
    })
    .await
    .map(drop)
    .map_err(|e| format!("creating the JetStream stream {}: {e}", stream()))
}

// ------------------------------------------------------------------ the handler

/// The PostgreSQL schema of this run; the handlers' tables are found through the
/// pool's `search_path`.
fn schema() -> &'static str {
    named("idempotent_bench_outbox_{pid}")
}

/// The subject every message goes to (the stream captures `idempotent-bench-<pid>.>`).
fn subject(what: &str) -> String {
    format!("{}.{what}", named("idempotent-bench-{pid}"))
}

fn payload(order: &str) -> Vec<u8> {
    format!("{{\"order\":\"{order}\",\"cents\":500}}").into_bytes()
}

struct Order {
    id: String,
}

#[derive(Debug)]
pub struct HandlerError(#[allow(dead_code)] String);

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        HandlerError(e.to_string())
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError(e.to_string())
    }
}

/// The business write of every handler.
async fn insert_order(tx: &mut Transaction<'_, Postgres>, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO bench_orders (id, cents, status) VALUES ($1, 500, 'paid')")
        .bind(id)
        .execute(&mut **tx)
        .await
        .map(drop)
}

#[idempotent(
    key = "order.id",
    scope = "bench-outbox",
    tx = "tx",
    table = "bench_dedup",
    outbox = "outbox",
    outbox_table = "bench_outbox"
)]
async fn paid_with_outbox(
    order: &Order,
    tx: &mut Transaction<'_, Postgres>,
    outbox: &mut Outbox,
) -> Result<(), HandlerError> {
    insert_order(tx, &order.id).await?;
    outbox.emit(subject("payments"), payload(&order.id));
    Ok(())
}

#[idempotent(
    key = "order.id",
    scope = "bench-no-outbox",
    tx = "tx",
    table = "bench_dedup"
)]
async fn paid(order: &Order, tx: &mut Transaction<'_, Postgres>) -> Result<(), HandlerError> {
    insert_order(tx, &order.id).await?;
    Ok(())
}

/// The hand-written loop's outbox row: the columns the relay reads, the message id
/// derived as the framework derives it.
const RAW_OUTBOX_INSERT: &str = "INSERT INTO bench_outbox (id, origin_scope, origin_key, \
     destination, payload, headers, status, attempts, next_attempt_us, fence, created_us) \
     VALUES ($1, 'bench-raw', $2, $3, $4, '[]', 0, 0, \
     floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8, 0, \
     floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8)";

/// The hand-written consumer: one transaction, the dedup row first.
async fn raw_paid(pool: &PgPool, key: &str) {
    let mut tx = pool.begin().await.unwrap();
    let claimed =
        sqlx::query("INSERT INTO bench_raw_dedup (message_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(key)
            .execute(&mut *tx)
            .await
            .unwrap();
    assert_eq!(claimed.rows_affected(), 1, "a first delivery");
    insert_order(&mut tx, key).await.unwrap();
    let id = message_id(
        &RecordKey::new("bench-raw", key).unwrap(),
        Emission::Position(0),
    );
    sqlx::query(RAW_OUTBOX_INSERT)
        .bind(id.as_bytes().to_vec())
        .bind(key.as_bytes().to_vec())
        .bind(subject("payments"))
        .bind(payload(key))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn framework_paid(pool: &PgPool, key: String) {
    let mut tx = pool.begin().await.unwrap();
    paid(&Order { id: key }, &mut tx).await.unwrap();
    tx.commit().await.unwrap();
}

/// The framework with the outbox; with `relay`, the immediate dispatch after the commit.
async fn framework_paid_with_outbox(pool: &PgPool, key: String, relay: Option<&Relay>) {
    let mut tx = pool.begin().await.unwrap();
    let mut outbox = Outbox::new();
    paid_with_outbox(&Order { id: key }, &mut tx, &mut outbox)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    if let Some(relay) = relay {
        let pass = relay.dispatch(&outbox).await.unwrap();
        assert_eq!(pass.sent, 1, "the dispatch publishes the message");
    }
}

/// PostgreSQL options on this run's schema.
fn pg_options() -> PgConnectOptions {
    let url = postgres_url();
    let options: PgConnectOptions = url
        .parse()
        .unwrap_or_else(|e| support::fail(format!("IDEMPOTENT_POSTGRES_URL {url}: {e}")));
    options.options([("search_path", schema())])
}

/// A pool on this run's schema, as the stores open theirs.
async fn pg_pool(options: PgConnectOptions) -> PgPool {
    PostgresStore::open_pool(PgPoolOptions::new(), options)
        .await
        .unwrap_or_else(|e| support::fail(e))
}

/// Messages per side through every handler before the tables' statistics are
/// taken.
const WARM_UP: u64 = 500;

/// Creates this run's schema and its tables (the dedup table, the outbox tables of
/// the handler and of the relay, the business table, the hand-written dedup table),
/// sends [`WARM_UP`] messages through each handler and takes the tables' statistics,
/// then opens the pool the cases use.
///
/// A table that was never analyzed looks empty to the planner: a statement prepared
/// on it can keep a plan made for an empty table while it grows, and the
/// completion's generic plan then walks the whole `expires_at_us` index, slower with
/// every row, until autovacuum analyzes the table. The cases measure tables with
/// statistics, as a service's are.
async fn pg_setup() -> PgPool {
    let admin = pg_pool(postgres_url().parse().unwrap()).await;
    exec_pg(
        &admin,
        format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", schema()),
    )
    .await;
    admin.close().await;
    let setup = pg_pool(pg_options()).await;
    pg_tables(&setup).await;
    let relay = Relay::new(
        PostgresOutbox::new(setup.clone(), "bench_outbox").unwrap(),
        MemoryPublisher::new(),
    );
    let prefix = run_prefix();
    for i in 0..WARM_UP {
        raw_paid(&setup, &format!("{prefix}-w0-{i}")).await;
        framework_paid(&setup, format!("{prefix}-w1-{i}")).await;
        framework_paid_with_outbox(&setup, format!("{prefix}-w2-{i}"), None).await;
        framework_paid_with_outbox(&setup, format!("{prefix}-w3-{i}"), Some(&relay)).await;
    }
    for table in [
        "bench_dedup",
        "bench_outbox",
        "bench_orders",
        "bench_raw_dedup",
    ] {
        exec_pg(&setup, format!("ANALYZE {table}")).await;
    }
    setup.close().await;
    pg_pool(pg_options()).await
}

/// Creates the tables of this run's schema.
async fn pg_tables(pool: &PgPool) {
    PostgresStore::from_pool(pool.clone())
        .with_table("bench_dedup")
        .unwrap()
        .migrate()
        .await
        .unwrap();
    for table in ["bench_outbox", "bench_relay_outbox"] {
        PostgresOutbox::new(pool.clone(), table)
            .unwrap()
            .migrate()
            .await
            .unwrap();
    }
    for stmt in [
        "CREATE TABLE IF NOT EXISTS bench_orders (id VARCHAR(200) PRIMARY KEY, cents BIGINT NOT NULL, status TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS bench_raw_dedup (message_id VARCHAR(200) PRIMARY KEY)",
    ] {
        exec_pg(pool, stmt.to_owned()).await;
    }
}

async fn exec_pg(pool: &PgPool, stmt: String) {
    sqlx::query(AssertSqlSafe(stmt.clone()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{stmt}: {e}"));
}

/// Messages per second of each side of the handler cases, round by round: the
/// hand-written loop, the framework without the outbox, with it, with it and the
/// dispatch.
async fn handler_rounds(pool: &PgPool, relay: &Relay, n: u64, tasks: u64) -> [Vec<f64>; 4] {
    let per_round = n / rounds() as u64;
    let rate = |t: Duration| per_round as f64 / t.as_secs_f64();
    let mut rates: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds() {
        let prefix = |side: &str| format!("{}-{side}{round}", run_prefix());
        let p = pool.clone();
        let raw = move |k: String| {
            let p = p.clone();
            async move { raw_paid(&p, &k).await }
        };
        rates[0].push(rate(drive(per_round, tasks, prefix("r"), raw).await));
        let p = pool.clone();
        let without = move |k: String| {
            let p = p.clone();
            async move { framework_paid(&p, k).await }
        };
        rates[1].push(rate(drive(per_round, tasks, prefix("n"), without).await));
        let p = pool.clone();
        let with = move |k: String| {
            let p = p.clone();
            async move { framework_paid_with_outbox(&p, k, None).await }
        };
        rates[2].push(rate(drive(per_round, tasks, prefix("o"), with).await));
        let (p, r) = (pool.clone(), relay.clone());
        let dispatched = move |k: String| {
            let (p, r) = (p.clone(), r.clone());
            async move { framework_paid_with_outbox(&p, k, Some(&r)).await }
        };
        rates[3].push(rate(drive(per_round, tasks, prefix("d"), dispatched).await));
    }
    rates
}

async fn handler_cases(report: &mut Report, runtime: &'static str, pool: &PgPool, n: u64) {
    for tasks in [1, TASKS] {
        // the dispatch's claims, publishes and marks, timed
        let timed = Arc::new(Timed {
            store: Box::new(PostgresOutbox::new(pool.clone(), "bench_outbox").unwrap()),
            publisher: Arc::new(MemoryPublisher::new()),
            state: Mutex::default(),
        });
        let relay = Relay::shared(timed.clone(), timed.clone());
        let label = match tasks {
            1 => "sequential".to_owned(),
            t => format!("{t} tasks"),
        };
        let [raw, without, with, dispatched] = handler_rounds(pool, &relay, n, tasks).await;
        let c = Comparison {
            raw: raw.clone(),
            framework: with.clone(),
            cpu: None,
        };
        report.push(Row::new(
            "postgres",
            format!("tx handler + outbox, {label}"),
            runtime,
            "hand-written: BEGIN, 3 INSERTs, COMMIT",
            &c,
            None,
        ));
        let off = Comparison {
            raw: without.clone(),
            framework: with,
            cpu: None,
        };
        let off_row = Row::new(
            "postgres",
            format!("outbox vs none, {label}, dispatch off"),
            runtime,
            "framework, tx mode, no outbox",
            &off,
            Some(HANDLER_TARGET),
        );
        let on = Comparison {
            raw: without,
            framework: dispatched,
            cpu: None,
        };
        let on_row = Row::new(
            "postgres",
            format!("outbox vs none, {label}, dispatch on"),
            runtime,
            "framework, tx mode, no outbox",
            &on,
            Some(HANDLER_TARGET),
        );
        let ms = |rate: f64| 1e3 / rate;
        report.note(format!(
            "postgres ({runtime}, {label}): time per message (1 / throughput), medians: \
             hand-written {:.2} ms, \
             framework without the outbox {:.2} ms, with it {:.2} ms with the dispatch off \
             (×{:.2} per round, median) and {:.2} ms with the dispatch on, to a MemoryPublisher \
             (×{:.2}); target ×1.30 at most",
            ms(Summary::of(&raw).median),
            ms(off_row.raw.median),
            ms(off_row.framework.median),
            1.0 / off_row.ratio.median,
            ms(on_row.framework.median),
            1.0 / on_row.ratio.median,
        ));
        let d = timed.phases(Duration::ZERO);
        let per = |t: Duration| t.as_secs_f64() * 1e3 / d.batches.max(1) as f64;
        report.note(format!(
            "postgres ({runtime}, {label}): the dispatch per message, mean: claim {:.2} ms \
             (an UPDATE … RETURNING of the row by id, its own transaction), publish {:.3} ms \
             (MemoryPublisher), mark {:.2} ms (an UPDATE, its own transaction)",
            per(d.claim),
            per(d.publish),
            per(d.mark),
        ));
        report.push(off_row);
        report.push(on_row);
    }
}

// ------------------------------------------------------------------ statement counting

/// A TCP proxy to PostgreSQL that counts the statements its clients send: each
/// simple Query (`Q`) and each Execute (`E`) of the extended protocol is one. The
/// connections through it must not ask for TLS.
struct StatementCounter {
    port: u16,
    count: Arc<AtomicU64>,
}

impl StatementCounter {
    async fn start(upstream: String) -> StatementCounter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL at {upstream}: {e}"));
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                tokio::spawn(forward(client, server, counted.clone()));
            }
        });
        StatementCounter { port, count }
    }

    fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

/// Copies `client` to `server` and back, counting the client's statements.
async fn forward(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    count: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    let mut pending = Vec::new();
    // the first messages (the startup message, a TLS request) have no type byte
    let mut started = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from_client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to_server.write_all(&buf[..n]).await.is_err() {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        loop {
            let rest = &pending[at..];
            if !started {
                let Some(len) = rest.get(..4) else { break };
                let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
                if rest.len() < len || len < 8 {
                    break;
                }
                let code = u32::from_be_bytes(rest[4..8].try_into().unwrap());
                // SSLRequest and GSSENCRequest come before the startup message
                started = code != 80_877_103 && code != 80_877_104;
                at += len;
            } else {
                if rest.len() < 5 {
                    break;
                }
                let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
                if rest.len() < 1 + len {
                    break;
                }
                if matches!(rest[0], b'Q' | b'E') {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                at += 1 + len;
            }
        }
        pending.drain(..at);
    }
    let _ = to_server.shutdown().await;
}

/// Counted once per run, on the first runtime.
static COUNTED_ONCE: AtomicBool = AtomicBool::new(false);

/// The statements per message of each handler, and per batch of each relay loop, on
/// a pool through a [`StatementCounter`].
async fn count_statements(report: &mut Report, js: &jetstream::Context) {
    let base = pg_options();
    let counter = StatementCounter::start(format!("{}:{}", base.get_host(), base.get_port())).await;
    let pool = pg_pool(
        base.host("127.0.0.1")
            .port(counter.port)
            .ssl_mode(PgSslMode::Disable),
    )
    .await;
    let relay = Relay::new(
        PostgresOutbox::new(pool.clone(), "bench_outbox").unwrap(),
        MemoryPublisher::new(),
    );
    let prefix = run_prefix();
    let mut per_message = Vec::new();
    for side in 0..4 {
        // the first messages prepare the statements on the connection; count after
        let run = async |i: u64| {
            let key = format!("{prefix}-c{side}-{i}");
            match side {
                0 => raw_paid(&pool, &key).await,
                1 => framework_paid(&pool, key).await,
                2 => framework_paid_with_outbox(&pool, key, None).await,
                _ => framework_paid_with_outbox(&pool, key, Some(&relay)).await,
            }
        };
        for i in 0..20 {
            run(i).await;
        }
        let before = counter.get();
        for i in 20..20 + COUNTED {
            run(i).await;
        }
        per_message.push((counter.get() - before) as f64 / COUNTED as f64);
    }
    let added = per_message[2] - per_message[1];
    report.note(format!(
        "postgres: statements per message, counted at the wire (the Query and Execute \
         messages the client sent through a counting proxy, {COUNTED} sequential messages \
         each): hand-written {:.2} (BEGIN, dedup INSERT, business INSERT, outbox INSERT, \
         COMMIT), framework without the outbox {:.2} (BEGIN, claim, business INSERT, \
         completion UPDATE, COMMIT), with it {:.2}, with it and the dispatch {:.2} (the \
         dispatch's claim and mark, each its own transaction): the outbox adds {added:.2} \
         (target at most 1: {})",
        per_message[0],
        per_message[1],
        per_message[2],
        per_message[3],
        if added <= 1.0 { "met" } else { "NOT met" }
    ));

    // the relay loops: 1000 rows each, per batch of 100
    let db = RelayDb::Postgres(pool.clone());
    let rows = 1000;
    let publisher = Arc::new(JetStreamPublisher::new(js.clone()));
    let mut per_batch = Vec::new();
    for side in 0..2 {
        db.reset().await;
        db.prefill(rows, &format!("{prefix}-cr{side}")).await;
        let before = counter.get();
        let sent = match side {
            0 => db.raw_drain(js, &mut LoopPhases::default()).await,
            _ => {
                let relay = Relay::shared(Arc::from(db.outbox()), publisher.clone());
                relay.drain().await.unwrap().sent as u64
            }
        };
        assert_eq!(sent, rows);
        per_batch.push((counter.get() - before) as f64 / (rows as f64 / BATCH as f64));
    }
    db.reset().await;
    report.note(format!(
        "postgres: relay statements per batch of {BATCH}, counted the same way over \
         {rows} rows (the last, empty pass included): hand-written {:.2} (BEGIN, SELECT … \
         FOR UPDATE SKIP LOCKED, UPDATE, COMMIT: one transaction), Relay {:.2} (the claim, \
         an UPDATE … RETURNING, and the mark, an UPDATE: two transactions)",
        per_batch[0], per_batch[1],
    ));
    pool.close().await;
}

// ------------------------------------------------------------------ the relay

/// One pass of the hand-written relay on MySQL or SQLite (an `IN` list of ids):
/// how many rows it sent. `$subject` turns the destination column into a `String`.
macro_rules! raw_pass {
    ($pool:expr, $sql:expr, $js:expr, $phases:expr, $subject:expr) => {{
        let sql = $sql;
        let started = Instant::now();
        let mut tx = $pool.begin_with(sql.begin).await.unwrap();
        let rows: Vec<(Vec<u8>, String, Vec<u8>)> = sqlx::query(sql.select)
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let subject = $subject(r.get(1)).expect("a UTF-8 subject");
                (r.get(0), subject, r.get(2))
            })
            .collect();
        let n = rows.len();
        if n == 0 {
            tx.commit().await.unwrap();
            n
        } else {
            let selected = Instant::now();
            let ids: Vec<Vec<u8>> = rows.iter().map(|r| r.0.clone()).collect();
            publish_batch($js, rows).await;
            let published = Instant::now();
            let list = vec!["?"; ids.len()].join(", ");
            let mut q = sqlx::query(AssertSqlSafe(format!("{}({list})", sql.update)));
            for id in ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
            $phases.add(started, selected, published, n);
            n
        }
    }};
}

/// A database the relay cases run on, with its outbox table of this run.
#[derive(Clone)]
enum RelayDb {
    /// the table `bench_relay_outbox` of this run's schema
    Postgres(PgPool),
    /// the table `idempotent_bench_outbox_<pid>` of the database
    MySql(MySqlPool),
    /// the table `bench_relay_outbox` of a file in the run's directory
    Sqlite(SqlitePool),
}

fn mysql_table() -> &'static str {
    named("idempotent_bench_outbox_{pid}")
}

/// The SQL of each hand-written relay step on one database.
struct RawSql {
    select: &'static str,
    /// the `UPDATE`, up to its `id` list
    update: &'static str,
    begin: &'static str,
}

impl RelayDb {
    async fn connect(name: &str, pg: Option<&PgPool>, sqlite_path: &str) -> RelayDb {
        match name {
            "postgres" => RelayDb::Postgres(pg.expect("the run's pool").clone()),
            "mysql" => {
                let url = mysql_url();
                let options: MySqlConnectOptions = url
                    .parse()
                    .unwrap_or_else(|e| support::fail(format!("IDEMPOTENT_MYSQL_URL {url}: {e}")));
                let pool = MySqlStore::open_pool(MySqlPoolOptions::new(), options)
                    .await
                    .unwrap_or_else(|e| support::fail(e));
                let db = RelayDb::MySql(pool);
                db.migrate().await;
                db
            }
            _ => {
                let options = SqliteConnectOptions::new()
                    .filename(sqlite_path)
                    .create_if_missing(true);
                let pool = SqliteStore::open_pool(SqlitePoolOptions::new(), options)
                    .await
                    .unwrap_or_else(|e| support::fail(e));
                let db = RelayDb::Sqlite(pool);
                db.migrate().await;
                db
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            RelayDb::Postgres(_) => "postgres",
            RelayDb::MySql(_) => "mysql",
            RelayDb::Sqlite(_) => "sqlite",
        }
    }

    fn outbox(&self) -> Box<dyn OutboxStore> {
        match self {
            RelayDb::Postgres(p) => {
                Box::new(PostgresOutbox::new(p.clone(), "bench_relay_outbox").unwrap())
            }
            RelayDb::MySql(p) => Box::new(MySqlOutbox::new(p.clone(), mysql_table()).unwrap()),
            RelayDb::Sqlite(p) => {
                Box::new(SqliteOutbox::new(p.clone(), "bench_relay_outbox").unwrap())
            }
        }
    }

    async fn migrate(&self) {
        match self {
            RelayDb::Postgres(p) => PostgresOutbox::new(p.clone(), "bench_relay_outbox")
                .unwrap()
                .migrate()
                .await
                .unwrap(),
            RelayDb::MySql(p) => MySqlOutbox::new(p.clone(), mysql_table())
                .unwrap()
                .migrate()
                .await
                .unwrap(),
            RelayDb::Sqlite(p) => SqliteOutbox::new(p.clone(), "bench_relay_outbox")
                .unwrap()
                .migrate()
                .await
                .unwrap(),
        }
    }

    fn table(&self) -> &'static str {
        match self {
            RelayDb::MySql(_) => mysql_table(),
            _ => "bench_relay_outbox",
        }
    }

    async fn exec(&self, stmt: String) {
        let done = match self {
            RelayDb::Postgres(p) => sqlx::query(AssertSqlSafe(stmt.clone()))
                .execute(p)
                .await
                .map(drop),
            RelayDb::MySql(p) => sqlx::query(AssertSqlSafe(stmt.clone()))
                .execute(p)
                .await
                .map(drop),
            RelayDb::Sqlite(p) => sqlx::query(AssertSqlSafe(stmt.clone()))
                .execute(p)
                .await
                .map(drop),
        };
        done.unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }

    /// Empties the table, so that every round starts from the same state.
    async fn reset(&self) {
        let t = self.table();
        match self {
            RelayDb::Sqlite(_) => self.exec(format!("DELETE FROM \"{t}\"")).await,
            RelayDb::MySql(_) => self.exec(format!("TRUNCATE TABLE `{t}`")).await,
            RelayDb::Postgres(_) => self.exec(format!("TRUNCATE TABLE \"{t}\"")).await,
        }
    }

    /// Writes `rows` pending messages, as one execution emitting them would (one
    /// transaction, multi-row `INSERT`s), then refreshes the planner's statistics.
    async fn prefill(&self, rows: u64, key: &str) {
        let mut outbox = Outbox::new();
        outbox.bind(&RecordKey::new("bench-relay", key).unwrap());
        for i in 0..rows {
            outbox.emit(subject(self.name()), payload(&format!("{key}-{i}")));
        }
        let t = self.table();
        match self {
            RelayDb::Postgres(p) => {
                let mut tx = p.begin().await.unwrap();
                tx.enqueue_in_tx(t, &outbox).await.unwrap();
                tx.commit().await.unwrap();
                self.exec(format!("ANALYZE \"{t}\"")).await;
            }
            RelayDb::MySql(p) => {
                let mut tx = p.begin().await.unwrap();
                tx.enqueue_in_tx(t, &outbox).await.unwrap();
                tx.commit().await.unwrap();
                self.exec(format!("ANALYZE TABLE `{t}`")).await;
            }
            RelayDb::Sqlite(p) => {
                let mut tx = p.begin().await.unwrap();
                tx.enqueue_in_tx(t, &outbox).await.unwrap();
                tx.commit().await.unwrap();
                self.exec(format!("ANALYZE \"{t}\"")).await;
            }
        }
    }

    fn raw_sql(&self) -> RawSql {
        match self {
            RelayDb::Postgres(_) => RawSql {
                begin: "BEGIN",
                select: "SELECT id, destination, payload FROM bench_relay_outbox \
                         WHERE status = 0 ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED",
                update: "UPDATE bench_relay_outbox SET status = 1, \
                         sent_us = floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8 \
                         WHERE id = ANY($1)",
            },
            RelayDb::MySql(_) => RawSql {
                begin: "BEGIN",
                select: named(
                    "SELECT id, destination, payload FROM idempotent_bench_outbox_{pid} \
                     WHERE status = 0 ORDER BY seq LIMIT 100 FOR UPDATE SKIP LOCKED",
                ),
                update: named(
                    "UPDATE idempotent_bench_outbox_{pid} SET status = 1, \
                     sent_us = TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) \
                     WHERE id IN ",
                ),
            },
            // no row locks: the write lock, taken at BEGIN IMMEDIATE, keeps other
            // relays out
            RelayDb::Sqlite(_) => RawSql {
                begin: "BEGIN IMMEDIATE",
                select: "SELECT id, destination, payload FROM bench_relay_outbox \
                         WHERE status = 0 ORDER BY seq LIMIT 100",
                update: "UPDATE bench_relay_outbox SET status = 1, \
                         sent_us = CAST(unixepoch('subsec') * 1000000 AS INTEGER) WHERE id IN ",
            },
        }
    }

    /// The hand-written relay until a pass finds nothing: how many rows it sent.
    async fn raw_drain(&self, js: &jetstream::Context, phases: &mut LoopPhases) -> u64 {
        let mut sent = 0;
        loop {
            let n = match self {
                RelayDb::Postgres(p) => raw_pass_pg(p, &self.raw_sql(), js, phases).await,
                RelayDb::MySql(p) => raw_pass!(p, self.raw_sql(), js, phases, String::from_utf8),
                RelayDb::Sqlite(p) => raw_pass!(p, self.raw_sql(), js, phases, Ok::<_, ()>),
            };
            if n == 0 {
                return sent;
            }
            sent += n as u64;
        }
    }

    /// Drops the MySQL table; PostgreSQL's goes with the run's schema, SQLite's with
    /// the run's directory.
    async fn drop_table(&self) {
        if let RelayDb::MySql(_) = self {
            self.exec(format!("DROP TABLE IF EXISTS `{}`", mysql_table()))
                .await
        }
    }
}

/// Publishes one batch of `(id, subject, payload)` with the id in `Nats-Msg-Id`, all
/// at once, and waits for every ack.
async fn publish_batch(js: &jetstream::Context, rows: Vec<(Vec<u8>, String, Vec<u8>)>) {
    let acks = join_all(rows.into_iter().map(|(id, subject, payload)| async move {
        let id = Uuid::from_slice(&id).expect("a 16-byte id");
        let mut headers = HeaderMap::new();
        headers.insert(MESSAGE_ID_HEADER, id.to_string().as_str());
        js.publish_with_headers(subject, headers, payload.into())
            .await?
            .await
    }))
    .await;
    for ack in acks {
        let ack = ack.unwrap_or_else(|e| panic!("publishing to JetStream: {e}"));
        assert!(!ack.duplicate, "every id is new");
    }
}

/// One pass of the hand-written relay on PostgreSQL: how many rows it sent.
async fn raw_pass_pg(
    pool: &PgPool,
    sql: &RawSql,
    js: &jetstream::Context,
    phases: &mut LoopPhases,
) -> usize {
    let started = Instant::now();
    let mut tx = pool.begin().await.unwrap();
    let rows: Vec<(Vec<u8>, String, Vec<u8>)> = sqlx::query(sql.select)
        .fetch_all(&mut *tx)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let n = rows.len();
    if n == 0 {
        tx.commit().await.unwrap();
        return 0;
    }
    let selected = Instant::now();
    let ids: Vec<Vec<u8>> = rows.iter().map(|r| r.0.clone()).collect();
    publish_batch(js, rows).await;
    let published = Instant::now();
    sqlx::query(sql.update)
        .bind(ids)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    phases.add(started, selected, published, n);
    n
}

/// The time a relay loop spent in each phase, summed over its passes that found rows,
/// and its time in all.
#[derive(Default, Clone, Copy)]
struct LoopPhases {
    batches: u64,
    /// the claim (the framework), `BEGIN` and the `SELECT` (the hand-written loop)
    claim: Duration,
    /// from the first publish of a batch to its last ack
    publish: Duration,
    /// the mark (the framework), the `UPDATE` and the `COMMIT` (the hand-written loop)
    mark: Duration,
    /// the drains, from start to end
    wall: Duration,
}

impl LoopPhases {
    fn add(&mut self, started: Instant, claimed: Instant, published: Instant, _rows: usize) {
        self.batches += 1;
        self.claim += claimed - started;
        self.publish += published - claimed;
        self.mark += published.elapsed();
    }

    fn per_batch(&self) -> String {
        let b = self.batches.max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / b;
        format!(
            "claim {:.2} ms, publish {:.2} ms, mark {:.2} ms, {:.2} ms in all",
            ms(self.claim),
            ms(self.publish),
            ms(self.mark),
            ms(self.wall)
        )
    }
}

/// An [`OutboxStore`] and a [`Publisher`] that time the relay's phases around the
/// ones they wrap: its claims that found rows, its marks, and the time some publish
/// of a batch is in flight.
#[derive(Debug)]
struct Timed {
    store: Box<dyn OutboxStore>,
    publisher: Arc<dyn Publisher>,
    state: Mutex<TimedState>,
}

#[derive(Debug, Default)]
struct TimedState {
    batches: u64,
    claim: Duration,
    mark: Duration,
    publish: Duration,
    in_flight: usize,
    publishing_since: Option<Instant>,
}

impl Timed {
    fn phases(&self, wall: Duration) -> LoopPhases {
        let s = self.state.lock().unwrap();
        LoopPhases {
            batches: s.batches,
            claim: s.claim,
            publish: s.publish,
            mark: s.mark,
            wall,
        }
    }
}

#[async_trait::async_trait]
impl Publisher for Timed {
    async fn publish(
        &self,
        message: &idempotent_runtime::outbox::OutgoingMessage,
    ) -> Result<(), idempotent_runtime::outbox::PublishError> {
        {
            let mut s = self.state.lock().unwrap();
            if s.in_flight == 0 {
                s.publishing_since = Some(Instant::now());
            }
            s.in_flight += 1;
        }
        let result = self.publisher.publish(message).await;
        let mut s = self.state.lock().unwrap();
        s.in_flight -= 1;
        if s.in_flight == 0
            && let Some(since) = s.publishing_since.take()
        {
            s.publish += since.elapsed();
        }
        result
    }
}

#[async_trait::async_trait]
impl OutboxStore for Timed {
    async fn claim_due(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<idempotent_runtime::outbox::ClaimedRow>, StoreError> {
        let started = Instant::now();
        let rows = self.store.claim_due(owner, limit, lease).await?;
        if !rows.is_empty() {
            let mut s = self.state.lock().unwrap();
            s.batches += 1;
            s.claim += started.elapsed();
        }
        Ok(rows)
    }

    async fn claim_ids(
        &self,
        owner: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<idempotent_runtime::outbox::ClaimedRow>, StoreError> {
        let started = Instant::now();
        let rows = self.store.claim_ids(owner, ids, lease).await?;
        if !rows.is_empty() {
            let mut s = self.state.lock().unwrap();
            s.batches += 1;
            s.claim += started.elapsed();
        }
        Ok(rows)
    }

    async fn mark_sent(&self, leases: &[RowLease]) -> Result<Vec<Fence>, StoreError> {
        let started = Instant::now();
        let fences = self.store.mark_sent(leases).await?;
        self.state.lock().unwrap().mark += started.elapsed();
        Ok(fences)
    }

    async fn mark_failed(
        &self,
        lease: &RowLease,
        error: &str,
        retry: Retry,
    ) -> Result<Fence, StoreError> {
        self.store.mark_failed(lease, error, retry).await
    }

    async fn purge_sent(&self, older_than: Duration, batch: usize) -> Result<u64, StoreError> {
        self.store.purge_sent(older_than, batch).await
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        self.store.stats().await
    }

    async fn list(
        &self,
        status: RowStatus,
        after: Option<i64>,
        limit: usize,
    ) -> Result<OutboxPage, StoreError> {
        self.store.list(status, after, limit).await
    }

    async fn retry_dead(&self, id: Uuid) -> Result<bool, StoreError> {
        self.store.retry_dead(id).await
    }
}

/// Relay throughput on `db`: `rows` pending rows drained by the hand-written loop and
/// by `Relay::drain`, interleaved round by round, each round on a table emptied and
/// filled again.
async fn relay_cases(
    report: &mut Report,
    runtime: &'static str,
    db: &RelayDb,
    js: &jetstream::Context,
    rows: u64,
) {
    let mut raw_phases = LoopPhases::default();
    let timed = Arc::new(Timed {
        store: db.outbox(),
        publisher: Arc::new(JetStreamPublisher::new(js.clone())),
        state: Mutex::default(),
    });
    let relay = Relay::shared(timed.clone(), timed.clone()).batch_size(BATCH);
    let mut relay_wall = Duration::ZERO;
    let mut c = Comparison {
        raw: Vec::new(),
        framework: Vec::new(),
        cpu: None,
    };
    for round in 0..rounds() {
        db.reset().await;
        db.prefill(rows, &format!("{}-rr{round}", run_prefix()))
            .await;
        let started = Instant::now();
        let sent = db.raw_drain(js, &mut raw_phases).await;
        raw_phases.wall += started.elapsed();
        c.raw.push(rows as f64 / started.elapsed().as_secs_f64());
        assert_eq!(sent, rows, "the hand-written relay sends every row");

        db.reset().await;
        db.prefill(rows, &format!("{}-rf{round}", run_prefix()))
            .await;
        let started = Instant::now();
        let pass = relay.drain().await.unwrap();
        relay_wall += started.elapsed();
        c.framework
            .push(rows as f64 / started.elapsed().as_secs_f64());
        assert_eq!(pass.sent as u64, rows, "the relay sends every row");
    }
    db.reset().await;
    let row = Row::new(
        db.name(),
        format!("relay → NATS JetStream, {rows} rows"),
        runtime,
        match db {
            RelayDb::Sqlite(_) => "hand-written BEGIN IMMEDIATE loop",
            _ => "hand-written SKIP LOCKED loop",
        },
        &c,
        Some(1.0),
    );
    let rate = row.framework.median;
    report.push(row);
    report.note(format!(
        "{} ({runtime}): Relay {rate:.0} msg/s, median (target ≥ {RELAY_TARGET:.0}: {}); per \
         batch of {BATCH}, mean over the rounds: hand-written {}; Relay {}",
        db.name(),
        if rate >= RELAY_TARGET {
            "met"
        } else {
            "NOT met"
        },
        raw_phases.per_batch(),
        timed.phases(relay_wall).per_batch(),
    ));
}

// ------------------------------------------------------------------ entry

/// The JetStream stream of this run.
fn stream() -> &'static str {
    named("IDEMPOTENT_BENCH_{pid}")
}

/// The outbox cases on the databases `dbs`, on the current runtime: the handler cases
/// (with PostgreSQL) with `n` messages per side, the relay cases with `n / rounds`
/// rows per round and side.
pub async fn cases(
    report: &mut Report,
    runtime: &'static str,
    dbs: &[String],
    n: u64,
    sqlite_path: &str,
) {
    let client = async_nats::connect(nats_url().as_str())
        .await
        .unwrap_or_else(|e| support::fail(format!("NATS at {}: {e}", nats_url())));
    let js = jetstream::new(client);
    create_stream(&js)
        .await
        .unwrap_or_else(|e| support::fail(e));

    let pg = if dbs.iter().any(|d| d == "postgres") {
        let pool = pg_setup().await;
        handler_cases(report, runtime, &pool, n).await;
        if !COUNTED_ONCE.swap(true, Ordering::SeqCst) {
            count_statements(report, &js).await;
        }
        Some(pool)
    } else {
        None
    };
    let rows = (n / rounds() as u64).max(BATCH as u64);
    for name in dbs {
        let db = RelayDb::connect(name, pg.as_ref(), sqlite_path).await;
        relay_cases(report, runtime, &db, &js, rows).await;
        db.drop_table().await;
    }
    if let Some(pool) = pg {
        exec_pg(
            &pool,
            format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", schema()),
        )
        .await;
        pool.close().await;
    }
    let _ = js.delete_stream(stream()).await;
}
