//! Throughput of `#[idempotent]` beside a hand-written raw baseline, per store.
//!
//! Every case runs the raw baseline and the framework in the same process, interleaved
//! in rounds (raw, framework, raw, framework, …; 5 unless `--rounds` asks for more) so
//! that drift of the machine or the server hits both alike. Each figure is the median
//! of the rounds, with their minimum and maximum: messages per second of each side, and
//! the ratio framework / baseline of each round (the median ratio is the median of the
//! rounds' ratios, not the ratio of the two medians). Each case runs on a
//! current-thread and on a multi-thread tokio runtime. The table is written to
//! `BENCHMARKS.md`. On Redis, the peer (AWS Lambda Powertools' idempotency utility, in
//! Python) runs beside the framework the same way (`examples/support/powertools/`).
//!
//! ```sh
//! cargo run --release -p idempotent-examples --example bench --features stores
//! cargo run --release -p idempotent-examples --example bench --features stores -- \
//!     --stores memory,redis --messages 5000 --scale 0 --out /tmp/bench.md
//! ```
//!
//! Options: `--stores` (comma list of memory, redis, mysql, postgres, sqlite, or
//! `none`; default all), `--outbox` (comma list of postgres, mysql, sqlite: the outbox
//! cases on those databases, see below; default none), `--messages N` per case and
//! runtime, split over the rounds (default 20 000), `--rounds N` (at least and by
//! default 5), `--scale N` existing records for the scale cases (default 1 000 000; 0
//! skips them), `--out PATH` (default `BENCHMARKS.md`). Servers come from
//! `IDEMPOTENT_REDIS_URL`, `IDEMPOTENT_MYSQL_URL`, `IDEMPOTENT_POSTGRES_URL` and
//! `IDEMPOTENT_NATS_URL` with the local defaults; a chosen store whose server does not
//! answer stops the program before it measures anything.
//!
//! The outbox cases (`examples/support/outbox_bench.rs`) need NATS with JetStream. With
//! PostgreSQL among them: a transactional handler that writes a row and emits a message
//! through the outbox, beside the same handler without it and beside the hand-written
//! loop, with the dispatch after the commit off and on, and the statements each sends
//! per message. On each database listed: `Relay` draining `messages / rounds` pending
//! rows to JetStream, beside a hand-written `FOR UPDATE SKIP LOCKED` relay loop.
//!
//! ```sh
//! cargo run --release -p idempotent-examples --example bench --features stores -- \
//!     --stores none --outbox postgres,mysql,sqlite --out /tmp/outbox.md
//! ```

mod support;

#[path = "support/outbox_bench.rs"]
mod outbox_bench;

use idempotent_runtime::redis::{self, AsyncCommands, aio::ConnectionManager};
use idempotent_runtime::sqlx;
use idempotent_runtime::store::coalesce::Coalesced;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion};
use idempotent_runtime::{
    Error, Idempotency, MemoryStore, MySqlStore, PostgresStore, RecordKey, RedisStore, SqliteStore,
    Store, idempotent,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};

// ------------------------------------------------------------ allocation counting

/// Counts live heap bytes, to measure memory per record of the memory store.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ------------------------------------------------------------------ options

struct Options {
    stores: Vec<String>,
    outbox: Vec<String>,
    messages: u64,
    rounds: usize,
    scale: u64,
    out: String,
}

const ALL_STORES: [&str; 5] = ["memory", "redis", "mysql", "postgres", "sqlite"];
const DEFAULT_MESSAGES: u64 = 20_000;
/// Rounds per case unless `--rounds` says more: raw and framework alternate, one round
/// of each at a time.
const DEFAULT_ROUNDS: usize = 5;
const DEFAULT_SCALE: u64 = 1_000_000;

impl Options {
    /// The command that runs this benchmark with these options.
    fn command(&self) -> String {
        let mut cmd =
            "cargo run --release -p idempotent-examples --example bench --features stores"
                .to_owned();
        let mut args = Vec::new();
        if self.stores.is_empty() {
            args.push("--stores none".to_owned());
        } else if self.stores != ALL_STORES {
            args.push(format!("--stores {}", self.stores.join(",")));
        }
        if !self.outbox.is_empty() {
            args.push(format!("--outbox {}", self.outbox.join(",")));
        }
        if self.messages != DEFAULT_MESSAGES {
            args.push(format!("--messages {}", self.messages));
        }
        if self.rounds != DEFAULT_ROUNDS {
            args.push(format!("--rounds {}", self.rounds));
        }
        if self.scale != DEFAULT_SCALE {
            args.push(format!("--scale {}", self.scale));
        }
        if !args.is_empty() {
            cmd.push_str(" -- ");
            cmd.push_str(&args.join(" "));
        }
        cmd
    }
}

/// What the rows `vs the peer` compare (written when Redis is among the stores).
const PEER: &str = "Rows `vs the peer` take AWS Lambda Powertools' idempotency utility (Python,
`RedisCachePersistenceLayer` on the same Redis, its local cache off, run outside
Lambda by `examples/support/powertools/run.sh`, which creates its virtual environment)
as the baseline: each round runs the peer's first deliveries, then duplicates of the
same keys, in a process of its own with as many threads as the framework has tasks,
then the framework's on as many keys; both sides' body executions are checked (every
key once, no duplicate).

";

/// What bounds the ratios below the targets, measured on a 2-core machine with the
/// services on loopback (written under every table).
const BOUNDS: &str = "
## Where the framework pays more than the baseline

- **Redis, first delivery.** The baseline's two steps are plain `SET`s; the
  framework's are calls of a Lua function (`FCALL`) that reads the record, checks owner
  and lease and writes it in one atomic step: that is what fences claims and makes
  completions compare-and-set. Measured apart from this program (2026-12-02, Redis
  7.0.15 on loopback, one client timing each call, 20 000 calls of each command
  interleaved, median round trip): `SET NX PX` 25.9 µs, the claim `FCALL` of a new key
  32.8 µs, a function that only returns 1 24.0 µs (the same as `PING`: calling a
  function, and passing it a key and three arguments, costs under 1 µs), a function
  doing one `SET NX PX` 29.9 µs, with `GET` + `TIME` + `SET` 32.5 µs. The extra time is
  spent inside the function, in its `redis.call`s: each goes through the server's
  command dispatch again and its reply is converted to Lua values, about 4 µs for the
  inner `SET`; `TIME` and packing the record add 1–3 µs. Turning propagation off
  (`redis.set_repl`) or `redis.setresp(3)` changes nothing measurable; `EVALSHA` of
  the same code is 6 µs slower than `FCALL` (a script defines its local functions
  again on every call). `INFO commandstats` agrees: 9.4 µs per claim against 0.9 µs
  for the function that returns 1 (on a loaded machine; 5.1 µs on a quiet one). A
  plain `SET NX` claim cannot replace the function: the record holds the lease
  deadline and the fencing token in the server's microseconds (`TIME`), which a plain
  command cannot write, and a token from the consumer's clock could be smaller than an
  earlier claim's. With 32 tasks the single Redis thread, sharing two cores with the
  client, is the bound.
- **MySQL / MariaDB, 16 tasks.** A claim is one `CALL` of the claim procedure (a read,
  then the insert or takeover, then one result row) where the baseline sends one
  `INSERT`; in the slow query log of one run the `CALL` averaged 1.5 ms of server time
  and the `INSERT` 1.0 ms, both including the commit's log flush. A procedure that
  inserts first stayed within the noise for first deliveries and slowed duplicates.
- **SQLite, sequential first delivery.** A claim reads, then inserts (two statements to
  the baseline's one), so that a duplicate is answered by one read without waiting for
  the single writer connection (it reads there only when the connection is free):
  duplicates run at 1.7–1.9 × the baseline. Inserting first
  measured 0.80–1.05 for first deliveries and 0.75–0.95 for duplicates.
- **PostgreSQL, 16 tasks.** A claim is one statement that reads and then inserts or
  takes over (a CTE), heavier than the baseline's plain `INSERT`.
- Disk flushes dominate every SQL case (each commit waits for its log flush), so the
  SQL ratios move by ±0.1 from run to run on a shared machine.
";

fn options() -> Result<Options, String> {
    let mut o = Options {
        stores: ALL_STORES.map(String::from).to_vec(),
        outbox: Vec::new(),
        messages: DEFAULT_MESSAGES,
        rounds: DEFAULT_ROUNDS,
        scale: DEFAULT_SCALE,
        out: "BENCHMARKS.md".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--stores" => {
                o.stores = match value()?.as_str() {
                    "none" => Vec::new(),
                    list => list.split(',').map(str::to_owned).collect(),
                }
            }
            "--outbox" => o.outbox = value()?.split(',').map(str::to_owned).collect(),
            "--messages" => {
                o.messages = value()?.parse().map_err(|e| format!("--messages: {e}"))?
            }
            "--rounds" => o.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--scale" => o.scale = value()?.parse().map_err(|e| format!("--scale: {e}"))?,
            "--out" => o.out = value()?,
            "-h" | "--help" => {
                return Err(
                    "usage: bench [--stores memory,redis,mysql,postgres,sqlite|none] \
                            [--outbox postgres,mysql,sqlite] [--messages N] [--rounds N] \
                            [--scale N] [--out PATH]"
                        .into(),
                );
            }
            other => return Err(format!("unknown option {other}; see --help")),
        }
    }
    for s in &o.stores {
        if !ALL_STORES.contains(&s.as_str()) {
            return Err(format!("unknown store {s}"));
        }
    }
    for d in &o.outbox {
        if !outbox_bench::DATABASES.contains(&d.as_str()) {
            return Err(format!("--outbox: unknown database {d}"));
        }
    }
    if o.rounds < DEFAULT_ROUNDS {
        return Err(format!("--rounds: at least {DEFAULT_ROUNDS}"));
    }
    o.messages = o.messages.max(1000);
    Ok(o)
}

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Checks that the server of every chosen store (and of the outbox cases: their
/// databases and NATS) answers, before anything is measured.
async fn reach_servers(stores: &[String], outbox: &[String]) -> Result<(), String> {
    use sqlx::Connection;
    if !outbox.is_empty() {
        outbox_bench::reach_nats().await?;
    }
    for name in stores.iter().chain(outbox) {
        match name.as_str() {
            "redis" => {
                let url = env_url("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:6379");
                support::Server::redis(&url)
                    .reach(RedisStore::connect(&url))
                    .await?;
            }
            "mysql" => {
                let url = env_url("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
                let conn = support::Server::mysql(&url)
                    .reach(sqlx::MySqlConnection::connect(&url))
                    .await?;
                let _ = conn.close().await;
            }
            "postgres" => {
                let url = env_url(
                    "IDEMPOTENT_POSTGRES_URL",
                    "postgres://postgres@127.0.0.1:5432/test",
                );
                let conn = support::Server::postgres(&url)
                    .reach(sqlx::PgConnection::connect(&url))
                    .await?;
                let _ = conn.close().await;
            }
            _ => {}
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ results

/// Rounds per case (`--rounds`), set once before the first case.
static ROUNDS: AtomicUsize = AtomicUsize::new(DEFAULT_ROUNDS);

fn rounds() -> usize {
    ROUNDS.load(Ordering::Relaxed)
}

/// The median, minimum and maximum of one figure over the rounds.
#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// Messages per second of each round, of the baseline and of the framework; round `i`
/// of one ran next to round `i` of the other.
struct Comparison {
    raw: Vec<f64>,
    framework: Vec<f64>,
    /// CPU per message of each round, where measured: of each side, in this process
    /// and in the local store servers
    cpu: Option<CpuSplit>,
}

/// CPU microseconds per message, round by round: (this process, the servers).
#[derive(Default)]
struct CpuSplit {
    raw: Vec<(f64, f64)>,
    framework: Vec<(f64, f64)>,
}

/// CPU seconds so far of this process and of the store servers running on this
/// machine (`redis-server`, `postgres`, `mariadbd`, `mysqld`), every thread, from the
/// scheduler's nanosecond counts (`/proc/PID/task/TID/schedstat`). Server processes
/// that exit between two readings take their time with them.
fn cpu_seconds() -> (f64, f64) {
    fn of(pid: &str) -> f64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0.0;
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .sum::<f64>()
            / 1e9
    }
    let me = std::process::id().to_string();
    let (own, mut servers) = (of(&me), 0.0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(
            comm.trim(),
            "redis-server" | "postgres" | "mariadbd" | "mysqld"
        ) {
            servers += of(&pid);
        }
    }
    (own, servers)
}

impl Comparison {
    fn ratios(&self) -> Vec<f64> {
        self.raw
            .iter()
            .zip(&self.framework)
            .map(|(r, f)| f / r)
            .collect()
    }
}

struct Row {
    store: &'static str,
    case: String,
    runtime: &'static str,
    raw_label: &'static str,
    raw: Summary,
    framework: Summary,
    /// framework / baseline, round by round
    ratio: Summary,
    /// minimum median framework/raw ratio this case must reach, if any
    target: Option<f64>,
    /// medians of CPU µs per message: baseline here, baseline in the servers,
    /// framework here, framework in the servers
    cpu: Option<[Summary; 4]>,
}

impl Row {
    fn new(
        store: &'static str,
        case: String,
        runtime: &'static str,
        raw_label: &'static str,
        c: &Comparison,
        target: Option<f64>,
    ) -> Row {
        Row {
            store,
            case,
            runtime,
            raw_label,
            raw: Summary::of(&c.raw),
            framework: Summary::of(&c.framework),
            ratio: Summary::of(&c.ratios()),
            target,
            cpu: c.cpu.as_ref().map(|cpu| {
                let of = |side: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
                    Summary::of(&side.iter().map(f).collect::<Vec<_>>())
                };
                [
                    of(&cpu.raw, |c| c.0),
                    of(&cpu.raw, |c| c.1),
                    of(&cpu.framework, |c| c.0),
                    of(&cpu.framework, |c| c.1),
                ]
            }),
        }
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn push(&mut self, r: Row) {
        let met = match r.target {
            Some(t) if r.ratio.median >= t => format!("≥ {t:.2} met"),
            Some(t) => format!("≥ {t:.2} NOT met"),
            None => String::new(),
        };
        println!(
            "{:<9} {:<44} {:<8} {:>9.0}/s ({:.0}–{:.0}) {:>9.0}/s ({:.0}–{:.0})  ×{:.2} ({:.2}–{:.2}) {met}",
            r.store,
            r.case,
            r.runtime,
            r.raw.median,
            r.raw.min,
            r.raw.max,
            r.framework.median,
            r.framework.min,
            r.framework.max,
            r.ratio.median,
            r.ratio.min,
            r.ratio.max,
        );
        self.rows.push(r);
    }

    fn note(&mut self, n: String) {
        println!("  {n}");
        self.notes.push(n);
    }
}

// ------------------------------------------------------------------ timing

static RUN: AtomicU64 = AtomicU64::new(0);

/// A prefix no earlier run used, so every key is fresh.
fn run_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{}{nanos:x}-{}",
        *RAW_PREFIX,
        RUN.fetch_add(1, Ordering::Relaxed)
    )
}

/// The names this run gives its tables and keys carry the process id, so that runs
/// sharing a server (a run's clean-up drops its tables and deletes its keys) never
/// touch each other's.
fn named(base: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap();
    if let Some((_, n)) = names.iter().find(|(b, _)| b == base) {
        return n;
    }
    let name: &'static str = base
        .replace("{pid}", &std::process::id().to_string())
        .leak();
    names.push((base.to_owned(), name));
    name
}

/// The framework's dedup table in the SQL databases; dropped when the run ends.
static BENCH_TABLE: LazyLock<&str> = LazyLock::new(|| named("idempotent_bench_{pid}"));
/// The prefix of the framework's Redis keys (the store's key prefix).
static REDIS_PREFIX: LazyLock<&str> = LazyLock::new(|| named("idempotent-bench-{pid}:"));
/// The prefix of every message id, hence of the baseline's Redis keys.
static RAW_PREFIX: LazyLock<&str> = LazyLock::new(|| named("idempotent-bench-raw-{pid}:"));

/// A statement on the baseline's table, `bench_raw_{pid}`.
fn raw_sql(statement: &'static str) -> &'static str {
    named(statement)
}

/// Removes what a run wrote: the Redis keys under both prefixes, the SQL tables (and
/// MySQL's claim procedure). A run never touches the default table or key prefix, so
/// it can be pointed at a database that holds real records.
async fn clean_up(raw: &Raw) {
    let started = Instant::now();
    match raw {
        Raw::Redis(c) => {
            let mut c = c.clone();
            let mut removed = 0u64;
            for pattern in [format!("{}*", *REDIS_PREFIX), format!("{}*", *RAW_PREFIX)] {
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut c)
                        .await
                        .expect("SCAN the benchmark's keys");
                    if !keys.is_empty() {
                        removed += keys.len() as u64;
                        let _: () = redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async(&mut c)
                            .await
                            .expect("UNLINK the benchmark's keys");
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            println!(
                "  redis: removed {removed} benchmark keys in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return;
        }
        Raw::MySql(p) => {
            for stmt in [
                format!("DROP PROCEDURE IF EXISTS {}_claim_v2", *BENCH_TABLE),
                format!("DROP TABLE IF EXISTS {}", *BENCH_TABLE),
                raw_sql("DROP TABLE IF EXISTS bench_raw_{pid}").to_owned(),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(stmt))
                    .execute(p)
                    .await
                    .expect("drop the benchmark's MySQL objects");
            }
        }
        Raw::Postgres(p) => {
            for stmt in [
                format!("DROP TABLE IF EXISTS {}", *BENCH_TABLE),
                raw_sql("DROP TABLE IF EXISTS bench_raw_{pid}").to_owned(),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(stmt))
                    .execute(p)
                    .await
                    .expect("drop the benchmark's PostgreSQL tables");
            }
        }
        // a file in the run's temporary directory, removed with it
        Raw::Sqlite(_) => return,
    }
    println!(
        "  {}: dropped the benchmark's tables in {:.1} s",
        raw.name(),
        started.elapsed().as_secs_f64()
    );
}

/// Runs [`rounds`] rounds of `raw` then `framework`; each call runs round `i` of its
/// side and returns its messages per second.
async fn interleave(
    mut raw: impl AsyncFnMut(usize) -> f64,
    mut framework: impl AsyncFnMut(usize) -> f64,
) -> Comparison {
    let mut c = Comparison {
        raw: Vec::with_capacity(rounds()),
        framework: Vec::with_capacity(rounds()),
        cpu: None,
    };
    for round in 0..rounds() {
        c.raw.push(raw(round).await);
        c.framework.push(framework(round).await);
    }
    c
}

/// Runs `raw` and `framework` over `n` messages each, split over [`rounds`]
/// interleaved rounds, with `tasks` concurrent workers; measures the CPU each side
/// spends per message, here and in the servers.
async fn compare<R, RF, F, FF>(n: u64, tasks: u64, raw: R, framework: F) -> Comparison
where
    R: Fn(String) -> RF + Clone + Send + Sync + 'static,
    RF: Future<Output = ()> + Send,
    F: Fn(String) -> FF + Clone + Send + Sync + 'static,
    FF: Future<Output = ()> + Send,
{
    let per_round = n / rounds() as u64;
    let mut c = Comparison {
        raw: Vec::with_capacity(rounds()),
        framework: Vec::with_capacity(rounds()),
        cpu: Some(CpuSplit::default()),
    };
    let measured = async |prefix: String, side: bool| {
        let before = cpu_seconds();
        let t = if side {
            drive(per_round, tasks, prefix, framework.clone()).await
        } else {
            drive(per_round, tasks, prefix, raw.clone()).await
        };
        let after = cpu_seconds();
        let us = |a: f64, b: f64| (a - b) * 1e6 / per_round as f64;
        (
            per_round as f64 / t.as_secs_f64(),
            (us(after.0, before.0), us(after.1, before.1)),
        )
    };
    for round in 0..rounds() {
        let (rate, cpu) = measured(format!("{}-r{round}", run_prefix()), false).await;
        c.raw.push(rate);
        c.cpu.as_mut().unwrap().raw.push(cpu);
        let (rate, cpu) = measured(format!("{}-f{round}", run_prefix()), true).await;
        c.framework.push(rate);
        c.cpu.as_mut().unwrap().framework.push(cpu);
    }
    c
}

/// Calls `f` with `n` distinct keys from `tasks` concurrent tasks.
async fn drive<G, GF>(n: u64, tasks: u64, prefix: String, f: G) -> Duration
where
    G: Fn(String) -> GF + Clone + Send + Sync + 'static,
    GF: Future<Output = ()> + Send,
{
    let start = Instant::now();
    if tasks == 1 {
        for i in 0..n {
            f(format!("{prefix}-{i}")).await;
        }
    } else {
        let mut set = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let f = f.clone();
            let prefix = prefix.clone();
            set.spawn(async move {
                let mut i = t;
                while i < n {
                    f(format!("{prefix}-{i}")).await;
                    i += tasks;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("benchmark task");
        }
    }
    start.elapsed()
}

// ------------------------------------------------------------------ handlers

#[derive(Debug)]
struct BenchError(#[allow(dead_code)] Error);

impl From<Error> for BenchError {
    fn from(e: Error) -> Self {
        BenchError(e)
    }
}

/// Executions of [`body`], to check that a case ran each key's body once.
static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

/// The business body of every case: nothing but its output.
async fn body(key: &str) -> Result<u32, BenchError> {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    Ok(key.len() as u32)
}

static MEMORY: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

/// The store of the shared-store cases. Each runtime flavour connects its own stores
/// (connections belong to the runtime that made them), so this is a swappable slot;
/// stores put here live for the rest of the run.
static CURRENT: RwLock<Option<&'static dyn Store>> = RwLock::new(None);

fn current() -> &'static dyn Store {
    CURRENT.read().unwrap().expect("a store is selected")
}

fn select(store: Arc<dyn Store>) -> Arc<dyn Store> {
    let leaked: &'static Arc<dyn Store> = Box::leak(Box::new(store.clone()));
    *CURRENT.write().unwrap() = Some(&**leaked);
    store
}

#[idempotent(key = "key", store = MEMORY, scope = "bench-memory")]
async fn on_memory(key: &str) -> Result<u32, BenchError> {
    body(key).await
}

#[idempotent(key = "key", store = current(), scope = "bench")]
async fn on_message(key: &str) -> Result<u32, BenchError> {
    body(key).await
}

// ------------------------------------------------------------------ memory

async fn memory_cases(report: &mut Report, runtime: &'static str, n: u64) {
    // framework overhead: the attribute + protocol around a body that does nothing
    let c = compare(
        n * 10,
        1,
        |k: String| async move {
            std::hint::black_box(body(&k).await.unwrap());
        },
        |k: String| async move {
            std::hint::black_box(on_memory(&k).await.unwrap());
        },
    )
    .await;
    let row = Row::new(
        "memory",
        "first delivery, sequential".into(),
        runtime,
        "body called directly",
        &c,
        None,
    );
    let overhead_ns = (1e9 / row.framework.median - 1e9 / row.raw.median).max(0.0);
    report.push(row);
    report.note(format!(
        "memory ({runtime}): framework overhead {overhead_ns:.0} ns per message, from the medians (target < 1000 ns: {})",
        if overhead_ns < 1000.0 { "met" } else { "NOT met" }
    ));
}

async fn memory_per_record(report: &mut Report) {
    let store = MemoryStore::new();
    let n = 200_000u32;
    let keys: Vec<RecordKey> = (0..n)
        .map(|i| RecordKey::new("s", format!("order-{i:08}").as_str()).unwrap())
        .collect();
    let before = LIVE.load(Ordering::SeqCst);
    fill(&store, &keys, b"12").await;
    let per = (LIVE.load(Ordering::SeqCst) - before) as f64 / f64::from(n);
    // scope (1 B), its length byte, the key (14 B) and the output (2 B)
    let payload = 18.0;
    report.note(format!(
        "memory: {per:.0} bytes per completed record, {payload:.0} of them scope, key and output: \
         {:.0} bytes of overhead (target ≤ 200: {})",
        per - payload,
        if per - payload <= 200.0 {
            "met"
        } else {
            "NOT met"
        }
    ));
}

/// Completes `keys` in `store` through the batch operations, 1000 at a time.
async fn fill(store: &dyn Store, keys: &[RecordKey], output: &[u8]) {
    for chunk in keys.chunks(1000) {
        let reqs: Vec<ClaimRequest<'_>> = chunk
            .iter()
            .map(|k| ClaimRequest {
                key: k,
                lease: Duration::from_secs(60),
                ttl: Duration::from_secs(7 * 24 * 3600),
                fingerprint: None,
                max_attempts: None,
            })
            .collect();
        let outcomes = store.claim_batch(&reqs).await.expect("claim batch");
        let done: Vec<Completion<'_>> = chunk
            .iter()
            .zip(&outcomes)
            .filter_map(|(k, o)| match o {
                ClaimOutcome::Acquired { token, .. } => Some(Completion {
                    key: k,
                    token: *token,
                    output: Some(output),
                    ttl: Duration::from_secs(7 * 24 * 3600),
                }),
                _ => None,
            })
            .collect();
        store.complete_batch(&done).await.expect("complete batch");
    }
}

// ------------------------------------------------------------------ shared stores

/// The classic unique-key claim: `INSERT` the id with status 0, run the body, `UPDATE`
/// it to status 1 with the output.
macro_rules! sql_first {
    ($pool:expr, $k:expr, $insert:literal, $update:literal) => {{
        sqlx::query(raw_sql($insert))
            .bind($k)
            .execute($pool)
            .await
            .unwrap();
        let out = body($k).await.unwrap();
        sqlx::query(raw_sql($update))
            .bind(out.to_string().into_bytes())
            .bind($k)
            .execute($pool)
            .await
            .unwrap();
    }};
}

/// The classic duplicate: the `INSERT` finds the id taken and inserts nothing, then a
/// `SELECT` reads the status and output.
macro_rules! sql_duplicate {
    ($pool:expr, $k:expr, $insert:literal, $select:literal) => {{
        let r = sqlx::query(raw_sql($insert))
            .bind($k)
            .execute($pool)
            .await
            .unwrap();
        assert_eq!(r.rows_affected(), 0);
        let row = sqlx::query(raw_sql($select))
            .bind($k)
            .fetch_one($pool)
            .await
            .unwrap();
        std::hint::black_box(row);
    }};
}

/// Inserts completed rows `old-{i}` for `range` into the raw table, `per` rows a statement.
macro_rules! sql_prefill {
    ($pool:expr, $prefix:expr, $range:expr, $per:expr) => {{
        for chunk in $range.collect::<Vec<_>>().chunks($per) {
            let mut qb = sqlx::QueryBuilder::new(raw_sql(
                "INSERT INTO bench_raw_{pid} (message_id, status, output) ",
            ));
            qb.push_values(chunk, |mut b, i| {
                b.push_bind(format!("{}-raw-old-{i}", $prefix))
                    .push_bind(1)
                    .push_bind(b"12".to_vec());
            });
            qb.build().execute($pool).await.unwrap();
        }
    }};
}

/// The hand-written baseline of one store: the classic two-step claim/complete.
#[derive(Clone)]
enum Raw {
    Redis(ConnectionManager),
    MySql(sqlx::MySqlPool),
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Raw {
    fn name(&self) -> &'static str {
        match self {
            Raw::Redis(_) => "redis",
            Raw::MySql(_) => "mysql",
            Raw::Postgres(_) => "postgres",
            Raw::Sqlite(_) => "sqlite",
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Raw::Redis(_) => "SET NX PX + SET XX PX",
            _ => "INSERT claim + UPDATE complete",
        }
    }

    fn dup_label(&self) -> &'static str {
        match self {
            Raw::Redis(_) => "SET NX (fails) + GET",
            _ => "INSERT (duplicate key) + SELECT",
        }
    }

    async fn setup(&self) {
        match self {
            Raw::Redis(_) => {}
            Raw::MySql(p) => {
                sqlx::query(raw_sql("CREATE TABLE IF NOT EXISTS bench_raw_{pid} (message_id VARCHAR(200) PRIMARY KEY, status INT NOT NULL, output VARBINARY(255))"))
                    .execute(p).await.unwrap();
            }
            Raw::Postgres(p) => {
                sqlx::query(raw_sql("CREATE TABLE IF NOT EXISTS bench_raw_{pid} (message_id VARCHAR(200) PRIMARY KEY, status INT NOT NULL, output BYTEA)"))
                    .execute(p).await.unwrap();
            }
            Raw::Sqlite(p) => {
                sqlx::query(raw_sql("CREATE TABLE IF NOT EXISTS bench_raw_{pid} (message_id TEXT PRIMARY KEY, status INT NOT NULL, output BLOB)"))
                    .execute(p).await.unwrap();
            }
        }
    }

    /// Claim, run the body, complete: two round trips.
    async fn first(&self, k: &str) {
        match self {
            Raw::Redis(c) => {
                let mut c = c.clone();
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(k)
                    .arg("0")
                    .arg("NX")
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert!(claimed.is_some());
                let out = body(k).await.unwrap();
                let _: Option<String> = redis::cmd("SET")
                    .arg(k)
                    .arg(out)
                    .arg("XX")
                    .arg("PX")
                    .arg(604_800_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
            Raw::MySql(p) => sql_first!(
                p,
                k,
                "INSERT INTO bench_raw_{pid} (message_id, status) VALUES (?, 0)",
                "UPDATE bench_raw_{pid} SET status = 1, output = ? WHERE message_id = ?"
            ),
            Raw::Postgres(p) => sql_first!(
                p,
                k,
                "INSERT INTO bench_raw_{pid} (message_id, status) VALUES ($1, 0)",
                "UPDATE bench_raw_{pid} SET status = 1, output = $1 WHERE message_id = $2"
            ),
            Raw::Sqlite(p) => sql_first!(
                p,
                k,
                "INSERT INTO bench_raw_{pid} (message_id, status) VALUES (?, 0)",
                "UPDATE bench_raw_{pid} SET status = 1, output = ? WHERE message_id = ?"
            ),
        }
    }

    /// The duplicate of a completed key: the claim fails, then the output is read.
    async fn duplicate(&self, k: &str) {
        match self {
            Raw::Redis(c) => {
                let mut c = c.clone();
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(k)
                    .arg("0")
                    .arg("NX")
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert!(claimed.is_none());
                let out: Option<String> = c.get(k).await.unwrap();
                std::hint::black_box(out.expect("completed"));
            }
            Raw::MySql(p) => sql_duplicate!(
                p,
                k,
                "INSERT IGNORE INTO bench_raw_{pid} (message_id, status) VALUES (?, 0)",
                "SELECT status, output FROM bench_raw_{pid} WHERE message_id = ?"
            ),
            Raw::Postgres(p) => sql_duplicate!(
                p,
                k,
                "INSERT INTO bench_raw_{pid} (message_id, status) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                "SELECT status, output FROM bench_raw_{pid} WHERE message_id = $1"
            ),
            Raw::Sqlite(p) => sql_duplicate!(
                p,
                k,
                "INSERT INTO bench_raw_{pid} (message_id, status) VALUES (?, 0) ON CONFLICT DO NOTHING",
                "SELECT status, output FROM bench_raw_{pid} WHERE message_id = ?"
            ),
        }
    }
}

/// Connects the store `name` and its raw baseline on the current runtime.
async fn connect(name: &str, sqlite_path: &str) -> (Arc<dyn Store>, Raw) {
    match name {
        "redis" => {
            let url = env_url("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:6379");
            let client = redis::Client::open(url.as_str()).expect("redis url");
            let conn = ConnectionManager::new(client)
                .await
                .unwrap_or_else(|e| panic!("Redis at {url} (IDEMPOTENT_REDIS_URL): {e}"));
            let store = RedisStore::connect(&url)
                .await
                .expect("redis store")
                .with_prefix(*REDIS_PREFIX);
            (Arc::new(store), Raw::Redis(conn))
        }
        "mysql" => {
            let url = env_url("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
            let store = MySqlStore::connect_with_table(&url, *BENCH_TABLE)
                .await
                .unwrap_or_else(|e| panic!("MySQL at {url} (IDEMPOTENT_MYSQL_URL): {e}"));
            let raw = Raw::MySql(store.pool().clone());
            (Arc::new(store), raw)
        }
        "postgres" => {
            let url = env_url(
                "IDEMPOTENT_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            );
            let store = PostgresStore::connect_with_table(&url, *BENCH_TABLE)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {url} (IDEMPOTENT_POSTGRES_URL): {e}"));
            let raw = Raw::Postgres(store.pool().clone());
            (Arc::new(store), raw)
        }
        "sqlite" => {
            let url = format!("sqlite://{sqlite_path}?mode=rwc");
            let store = SqliteStore::connect_with_table(&url, *BENCH_TABLE)
                .await
                .expect("sqlite store");
            let raw = Raw::Sqlite(store.pool().clone());
            (Arc::new(store), raw)
        }
        other => unreachable!("store {other}"),
    }
}

fn static_name(name: &str) -> &'static str {
    match name {
        "redis" => "redis",
        "mysql" => "mysql",
        "postgres" => "postgres",
        _ => "sqlite",
    }
}

/// First deliveries, duplicates and concurrent first deliveries on one store.
async fn store_cases(
    report: &mut Report,
    runtime: &'static str,
    name: &str,
    store: Arc<dyn Store>,
    raw: Raw,
    n: u64,
    label: &str,
) -> Vec<f64> {
    let store_name = static_name(name);
    let redis = matches!(raw, Raw::Redis(_));
    select(store.clone());

    let raw_first = {
        let raw = raw.clone();
        move |k: String| {
            let raw = raw.clone();
            async move { raw.first(&k).await }
        }
    };
    let fw_first = |k: String| async move {
        on_message(&k).await.unwrap();
    };
    let c = compare(n, 1, raw_first.clone(), fw_first).await;
    let sequential = c.framework.clone();
    report.push(Row::new(
        store_name,
        format!("first delivery, sequential{label}"),
        runtime,
        raw.label(),
        &c,
        Some(if redis { 0.85 } else { 0.80 }),
    ));

    // duplicates: complete m keys both ways, then deliver them again round-robin
    let m = n.clamp(1000, 5000);
    let prefix = run_prefix();
    for i in 0..m {
        raw.first(&format!("{prefix}-raw-{i}")).await;
        on_message(&format!("{prefix}-fw-{i}")).await.unwrap();
    }
    let index = move |k: &str| k.rsplit('-').next().unwrap().parse::<u64>().unwrap() % m;
    let raw_dup = {
        let raw = raw.clone();
        let prefix = prefix.clone();
        move |k: String| {
            let raw = raw.clone();
            let key = format!("{prefix}-raw-{}", index(&k));
            async move { raw.duplicate(&key).await }
        }
    };
    let fw_dup = move |k: String| {
        let key = format!("{prefix}-fw-{}", index(&k));
        async move {
            on_message(&key).await.unwrap();
        }
    };
    let c = compare(n, 1, raw_dup, fw_dup).await;
    report.push(Row::new(
        store_name,
        format!("duplicate, sequential{label}"),
        runtime,
        raw.dup_label(),
        &c,
        redis.then_some(1.5),
    ));

    let tasks = if redis { 32 } else { 16 };
    let c = compare(n * 2, tasks, raw_first.clone(), fw_first).await;
    report.push(Row::new(
        store_name,
        format!("first delivery, {tasks} tasks{label}"),
        runtime,
        raw.label(),
        &c,
        Some(0.80),
    ));

    // the same with the store's single steps coalesced into batch calls
    select(Arc::new(Coalesced::new(store.clone())));
    let c = compare(n * 2, tasks, raw_first, fw_first).await;
    select(store.clone());
    report.push(Row::new(
        store_name,
        format!("first delivery, {tasks} tasks, coalesced{label}"),
        runtime,
        raw.label(),
        &c,
        Some(1.0),
    ));

    if redis {
        for workers in [1, 32] {
            powertools_cases(report, runtime, n, workers, label).await;
        }
    }

    if redis {
        // batches of 64 through run_batch, against the framework one message at a
        // time, interleaved like every other case
        let batches = Idempotency::new("bench-batch").shared_store(store.clone());
        let per_round = (n / rounds() as u64 / 64).max(2) * 64;
        let c = interleave(
            async |round| {
                let prefix = format!("{}-s{round}", run_prefix());
                let t = drive(per_round, 1, prefix, fw_first).await;
                per_round as f64 / t.as_secs_f64()
            },
            async |round| {
                let prefix = format!("{}-b{round}", run_prefix());
                let start = Instant::now();
                for b in 0..per_round / 64 {
                    let msgs: Vec<String> = (0..64).map(|i| format!("{prefix}-{b}-{i}")).collect();
                    let results: Vec<Result<u32, BenchError>> =
                        batches.run_batch(&msgs, |m| m.as_str(), |m| body(m)).await;
                    assert!(results.iter().all(Result::is_ok));
                }
                per_round as f64 / start.elapsed().as_secs_f64()
            },
        )
        .await;
        report.push(Row::new(
            store_name,
            format!("batch of 64{label}"),
            runtime,
            "framework, one message at a time",
            &c,
            Some(5.0),
        ));
    }
    sequential
}

/// The peer: AWS Lambda Powertools' idempotency utility (Python,
/// `RedisCachePersistenceLayer`) on the same Redis, run by
/// `examples/support/powertools/run.sh` (which creates its virtual environment), with
/// `workers` threads. Each round runs the peer's first deliveries and duplicates of
/// `n / rounds` keys, then the framework's on as many keys with as many tasks; the rows
/// compare the framework against the peer. The body's executions are checked on both
/// sides: every key once, no duplicate.
async fn powertools_cases(
    report: &mut Report,
    runtime: &'static str,
    n: u64,
    workers: u64,
    label: &str,
) {
    let per_round = n / rounds() as u64;
    let url = env_url("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:6379");
    let mut first = Comparison {
        raw: Vec::new(),
        framework: Vec::new(),
        cpu: None,
    };
    let mut duplicate = Comparison {
        raw: Vec::new(),
        framework: Vec::new(),
        cpu: None,
    };
    for round in 0..rounds() {
        let prefix = format!("{}-pt{round}", run_prefix());
        let (peer_first, peer_dup) = powertools_round(&url, per_round, workers, &prefix).await;
        first.raw.push(peer_first);
        duplicate.raw.push(peer_dup);

        let prefix = format!("{}-pf{round}", run_prefix());
        let before = BODY_RUNS.load(Ordering::Relaxed);
        let fw = |k: String| async move {
            on_message(&k).await.unwrap();
        };
        let t = drive(per_round, workers, prefix.clone(), fw).await;
        first.framework.push(per_round as f64 / t.as_secs_f64());
        let t = drive(per_round, workers, prefix, fw).await;
        duplicate.framework.push(per_round as f64 / t.as_secs_f64());
        let runs = BODY_RUNS.load(Ordering::Relaxed) - before;
        assert_eq!(
            runs, per_round,
            "framework body runs: every key once, no duplicate"
        );
    }
    let tasks = match workers {
        1 => "sequential".to_owned(),
        w => format!("{w} tasks"),
    };
    for (case, c) in [("first delivery", &first), ("duplicate", &duplicate)] {
        report.push(Row::new(
            "redis",
            format!("{case}, {tasks}, vs the peer{label}"),
            runtime,
            "Powertools 3.37 (Python)",
            c,
            None,
        ));
    }
}

/// One run of the peer's script: messages per second of its first deliveries and of
/// its duplicates.
async fn powertools_round(url: &str, messages: u64, workers: u64, prefix: &str) -> (f64, f64) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/support/powertools/run.sh");
    let out = tokio::process::Command::new(script)
        .args(["--url", url, "--prefix", prefix])
        .args([
            "--messages",
            &messages.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .unwrap_or_else(|e| {
            support::fail(format!("{script}: {e} (python3 is needed for the peer)"))
        });
    if !out.status.success() {
        support::fail(format!("{script} failed: {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = |case: &str, executions: u64| -> f64 {
        let line = text
            .lines()
            .find(|l| l.split(' ').next() == Some(case))
            .unwrap_or_else(|| support::fail(format!("{script}: no `{case}` line in {text:?}")));
        let f: Vec<&str> = line.split(' ').collect();
        let (seconds, runs): (f64, u64) =
            match (f.get(3).map(|s| s.parse()), f.get(4).map(|s| s.parse())) {
                (Some(Ok(s)), Some(Ok(r))) => (s, r),
                _ => support::fail(format!("{script}: unreadable line {line:?}")),
            };
        if runs != executions {
            support::fail(format!(
                "the peer's {case} ran its body {runs} times for {messages} messages (expected {executions})"
            ));
        }
        messages as f64 / seconds
    };
    (rate("first", messages), rate("duplicate", 0))
}

async fn redis_memory_usage(report: &mut Report) {
    let url = env_url("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:6379");
    let store = RedisStore::connect(&url)
        .await
        .expect("redis store")
        .with_prefix(*REDIS_PREFIX);
    let mut conn = ConnectionManager::new(redis::Client::open(url.as_str()).unwrap())
        .await
        .unwrap();
    // a typical order id, as a user's record would hold it
    let key = RecordKey::new("bench", "order-00000001").unwrap();
    fill(&store, std::slice::from_ref(&key), b"12").await;
    let rk = store.redis_key(&key);
    let bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&rk)
        .query_async(&mut conn)
        .await
        .unwrap();
    let raw_key = format!("{}order-00000001", *RAW_PREFIX);
    let _: () = conn.set_ex(&raw_key, "12", 604_800).await.unwrap();
    let raw_bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&raw_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    report.note(format!(
        "redis: MEMORY USAGE of a completed record {} bytes (Redis key {} bytes); a raw `SET key 12 EX` of a similar key: {} bytes",
        bytes.unwrap_or(0),
        rk.len(),
        raw_bytes.unwrap_or(0)
    ));
    clean_up(&Raw::Redis(conn)).await;
}

/// Puts `count` completed records in the store and as many rows in the raw table.
async fn prefill(name: &str, store: &dyn Store, raw: &Raw, count: u64) {
    let start = Instant::now();
    let prefix = run_prefix();
    let mut done = 0;
    while done < count {
        let n = (count - done).min(10_000);
        let keys: Vec<RecordKey> = (done..done + n)
            .map(|i| RecordKey::new("bench", format!("{prefix}-old-{i}").as_str()).unwrap())
            .collect();
        fill(store, &keys, b"12").await;
        match raw {
            Raw::Redis(c) => {
                let mut c = c.clone();
                let mut pipe = redis::pipe();
                for i in done..done + n {
                    pipe.cmd("SET")
                        .arg(format!("{prefix}-raw-old-{i}"))
                        .arg("12")
                        .arg("PX")
                        .arg(604_800_000)
                        .ignore();
                }
                let _: () = pipe.query_async(&mut c).await.unwrap();
            }
            Raw::MySql(p) => sql_prefill!(p, &prefix, done..done + n, 1000),
            Raw::Postgres(p) => sql_prefill!(p, &prefix, done..done + n, 1000),
            // SQLite binds at most 999 parameters per statement
            Raw::Sqlite(p) => sql_prefill!(p, &prefix, done..done + n, 300),
        }
        done += n;
    }
    println!(
        "  {name}: {count} existing records written in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

async fn run_flavour(
    report: &mut Report,
    runtime: &'static str,
    opts: &Options,
    sqlite_path: &str,
) {
    let n = opts.messages;
    for name in &opts.stores {
        match name.as_str() {
            "memory" => memory_cases(report, runtime, n).await,
            store_name => {
                let (store, raw) = connect(store_name, sqlite_path).await;
                raw.setup().await;
                let empty = store_cases(
                    report,
                    runtime,
                    store_name,
                    store.clone(),
                    raw.clone(),
                    n,
                    "",
                )
                .await;
                if opts.scale > 0 && runtime == "multi" {
                    prefill(store_name, &*store, &raw, opts.scale).await;
                    let label = format!(", {}k existing records", opts.scale / 1000);
                    let scaled = store_cases(
                        report,
                        runtime,
                        store_name,
                        store.clone(),
                        raw.clone(),
                        n,
                        &label,
                    )
                    .await;
                    // round i of the full store against round i of the empty one
                    // (measured one after the other, not interleaved)
                    report.push(Row::new(
                        static_name(store_name),
                        format!("framework sequential{label} vs empty"),
                        runtime,
                        "framework, empty store",
                        &Comparison {
                            raw: empty,
                            framework: scaled,
                            cpu: None,
                        },
                        Some(0.8),
                    ));
                }
                clean_up(&raw).await;
            }
        }
    }
    if !opts.outbox.is_empty() {
        let sqlite_outbox = format!("{sqlite_path}-outbox.db");
        outbox_bench::cases(report, runtime, &opts.outbox, n, &sqlite_outbox).await;
    }
}

fn write_markdown(report: &Report, opts: &Options) -> std::io::Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks
"
    );
    let _ = writeln!(
        md,
        "Measured on {date} on a machine with {cores} cores, services on loopback, by\n\
         \n\
         ```sh\n{}\n```\n\
         \n\
         {} messages per case and runtime, split over {rounds} rounds; the raw baseline and the\n\
         framework run in the same process, interleaved round by round (raw, framework, raw,\n\
         framework, …). Every figure is the median of the {rounds} rounds, with the lowest and\n\
         highest round beside it; the ratio is framework / baseline of each round, and its\n\
         median is the median of those {rounds} ratios (not the ratio of the two medians). A\n\
         target is met when the median ratio reaches it. `current` is a current-thread tokio\n\
         runtime, `multi` a multi-thread one with one worker per core. The machine is shared:\n\
         one round can be off by a third, hence medians.\n",
        opts.command(),
        opts.messages,
        rounds = opts.rounds,
    );
    if opts.stores.iter().any(|s| s == "redis") {
        md.push_str(PEER);
    }
    if !opts.outbox.is_empty() {
        md.push_str(outbox_bench::ABOUT);
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "| store | case | runtime | baseline | baseline msg/s | min–max | framework msg/s | min–max | ratio | min–max | target |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for r in &report.rows {
        let target = match r.target {
            Some(t) if r.ratio.median >= t => format!("≥ {t:.2} ✓"),
            Some(t) => format!("≥ {t:.2} ✗"),
            None => "—".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2}–{:.2} | {target} |",
            r.store,
            r.case,
            r.runtime,
            r.raw_label,
            r.raw.median,
            r.raw.min,
            r.raw.max,
            r.framework.median,
            r.framework.min,
            r.framework.max,
            r.ratio.median,
            r.ratio.min,
            r.ratio.max,
        );
    }
    if report.rows.iter().any(|r| r.cpu.is_some()) {
        let _ = writeln!(
            md,
            "\n## CPU per message\n\n\
             Where each side's time goes: CPU microseconds per message in this process (the\n\
             client) and in the store's server processes on this machine, from the\n\
             scheduler's counts of every thread before and after each round; medians of the\n\
             rounds, with min–max. Other load on the machine's servers counts too.\n\n\
             | store | case | runtime | baseline client µs | baseline server µs | framework client µs | framework server µs |\n\
             | --- | --- | --- | ---: | ---: | ---: | ---: |"
        );
        for r in &report.rows {
            let Some(cpu) = &r.cpu else { continue };
            let cell = |s: &Summary| format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.store,
                r.case,
                r.runtime,
                cell(&cpu[0]),
                cell(&cpu[1]),
                cell(&cpu[2]),
                cell(&cpu[3]),
            );
        }
    }
    if !report.notes.is_empty() {
        let _ = writeln!(
            md,
            "
## Notes
"
        );
        for n in &report.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    if !opts.stores.is_empty() {
        md.push_str(BOUNDS);
    }
    std::fs::write(&opts.out, md)
}

fn main() {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(reach_servers(&opts.stores, &opts.outbox))
        .unwrap_or_else(|e| support::fail(e));
    let dir = std::env::temp_dir().join(format!("idempotent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sqlite_path = dir.join("bench.db").display().to_string();
    ROUNDS.store(opts.rounds, Ordering::Relaxed);
    let mut report = Report::default();
    println!(
        "{:<9} {:<44} {:<8} baseline (min–max), framework (min–max), ratio (min–max); medians of {} rounds",
        "store", "case", "runtime", opts.rounds
    );
    for runtime in ["current", "multi"] {
        let rt = match runtime {
            "current" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
        }
        .expect("runtime");
        rt.block_on(run_flavour(&mut report, runtime, &opts, &sqlite_path));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if opts.stores.iter().any(|s| s == "memory") {
        rt.block_on(memory_per_record(&mut report));
    }
    if opts.stores.iter().any(|s| s == "redis") {
        rt.block_on(redis_memory_usage(&mut report));
    }
    let _ = std::fs::remove_dir_all(&dir);
    match write_markdown(&report, &opts) {
        Ok(()) => println!("wrote {}", opts.out),
        Err(e) => {
            eprintln!("could not write {}: {e}", opts.out);
            std::process::exit(1);
        }
    }
}
