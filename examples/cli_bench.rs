//! Throughput and peak memory of the `idempotent` command over many records: `stats`
//! and a full `list --format json`, on Redis and on PostgreSQL.
//!
//! ```sh
//! cargo build --release -p idempotent-cli --features redis,postgres
//! cargo run --release -p idempotent-examples --example cli_bench --features stores
//! cargo run --release -p idempotent-examples --example cli_bench --features stores -- \
//!     --stores redis --records 200000 --rounds 3
//! ```
//!
//! Each store gets records of its own (a key prefix, a table), written once per size:
//! first `--small` records (default 100 000), then `--records` (default 1 000 000),
//! so that peak memory can be compared across sizes. Every command runs `--rounds`
//! times (default 5); the program prints the median and the range of records per
//! second, and the peak resident memory of the command (`VmHWM` of the process, read
//! from `/proc` while it runs: Linux only). The records are removed at the end.
//! `--bin PATH` names the command (default `target/release/idempotent`). A command that
//! does not run, or a chosen store whose server does not answer, stops the program
//! before it writes any record.

mod support;

use idempotent_runtime::redis::{self, aio::ConnectionManager};
use idempotent_runtime::sqlx::{self, AssertSqlSafe, postgres::PgPoolOptions};
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion};
use idempotent_runtime::{RecordKey, RedisStore, Store};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Options {
    stores: Vec<String>,
    records: u64,
    small: u64,
    rounds: usize,
    bin: String,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        stores: vec!["redis".into(), "postgres".into()],
        records: 1_000_000,
        small: 100_000,
        rounds: 5,
        bin: "target/release/idempotent".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--stores" => o.stores = value()?.split(',').map(str::to_owned).collect(),
            "--records" => o.records = value()?.parse().map_err(|e| format!("--records: {e}"))?,
            "--small" => o.small = value()?.parse().map_err(|e| format!("--small: {e}"))?,
            "--rounds" => o.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--bin" => o.bin = value()?,
            "-h" | "--help" => {
                return Err("usage: cli_bench [--stores redis,postgres] [--records N] \
                            [--small N] [--rounds N] [--bin PATH]"
                    .into());
            }
            other => return Err(format!("unknown option {other}; see --help")),
        }
    }
    if o.rounds == 0 || o.small > o.records {
        return Err("--rounds must be at least 1 and --small at most --records".into());
    }
    Ok(o)
}

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// Checks that the server of every chosen store answers and that the command runs.
async fn preflight(o: &Options) -> Result<(), String> {
    use sqlx::Connection;
    if o.stores.iter().any(|s| s == "redis") {
        let url = env_url("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:6379");
        support::Server::redis(&url)
            .reach(RedisStore::connect(&url))
            .await?;
    }
    if o.stores.iter().any(|s| s == "postgres") {
        let url = env_url(
            "IDEMPOTENT_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        );
        let conn = support::Server::postgres(&url)
            .reach(sqlx::PgConnection::connect(&url))
            .await?;
        let _ = conn.close().await;
    }
    match Command::new(&o.bin).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Err(format!("{} --version failed: {}", o.bin, out.status)),
        Err(e) => {
            return Err(format!(
                "cannot run {} ({e}): build it with `cargo build --release -p idempotent-cli \
                 --features redis,postgres` or pass --bin",
                o.bin
            ));
        }
    }
    Ok(())
}

/// One run of the command: wall time, lines written to stdout, peak resident memory.
struct Measured {
    secs: f64,
    lines: u64,
    peak_kib: u64,
}

/// Runs the command with `args`, counting its stdout lines and polling its `VmHWM`.
fn measure(bin: &str, args: &[&str]) -> Measured {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {bin}: {e}; build it first with `cargo build --release -p idempotent-cli --features redis,postgres` or pass --bin")
        });
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut lines = 0u64;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return lines,
                Ok(n) => lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            }
        }
    });
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path)
            && let Some(line) = s.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let secs = start.elapsed().as_secs_f64();
    let lines = reader.join().expect("stdout reader");
    assert!(status.success(), "{bin} {args:?} failed: {status}");
    Measured {
        secs,
        lines,
        peak_kib,
    }
}

/// Median, minimum and maximum.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Writes `from..to` records through the library: one scope per ten thousand keys,
/// nine in ten completed with a small output, the rest left in progress.
async fn seed_redis(store: &RedisStore, from: u64, to: u64) {
    let mut tasks = Vec::new();
    let chunk = 2000;
    let mut at = from;
    while at < to {
        let end = (at + chunk).min(to);
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let keys: Vec<RecordKey> = (at..end)
                .map(|i| {
                    RecordKey::new(&format!("bench::scope{}", i / 10_000), &format!("m-{i}"))
                        .unwrap()
                })
                .collect();
            let reqs: Vec<ClaimRequest<'_>> = keys
                .iter()
                .map(|k| ClaimRequest {
                    key: k,
                    lease: Duration::from_secs(3600),
                    ttl: Duration::from_secs(86_400),
                    fingerprint: None,
                    max_attempts: None,
                })
                .collect();
            let outcomes = store.claim_batch(&reqs).await.expect("claim batch");
            let done: Vec<Completion<'_>> = keys
                .iter()
                .zip(&outcomes)
                .enumerate()
                .filter(|(i, _)| i % 10 != 0)
                .map(|(_, (k, o))| match o {
                    ClaimOutcome::Acquired { token, .. } => Completion {
                        key: k,
                        token: *token,
                        output: Some(b"\"ok\""),
                        ttl: Duration::from_secs(86_400),
                    },
                    other => panic!("seeding: expected Acquired, got {other:?}"),
                })
                .collect();
            store.complete_batch(&done).await.expect("complete batch");
        }));
        at = end;
        if tasks.len() >= 8 {
            for t in tasks.drain(..) {
                t.await.expect("seed task");
            }
        }
    }
    for t in tasks {
        t.await.expect("seed task");
    }
}

/// Writes rows `from..to` in the store's table layout with one statement per 100 000.
async fn seed_postgres(pool: &sqlx::PgPool, table: &str, from: u64, to: u64) {
    let mut at = from;
    while at < to {
        let end = (at + 100_000).min(to);
        let stmt = format!(
            "WITH n AS (SELECT floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now_us) \
             INSERT INTO \"{table}\" (scope, message_id, status, retry_times, owner_token, \
                 lease_until_us, expires_at_us, fingerprint, output) \
             SELECT 'bench::scope' || (i / 10000), convert_to('m-' || i, 'UTF8'), \
                 CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END, 1 + i % 3, n.now_us - i, \
                 CASE WHEN i % 10 = 0 THEN n.now_us + 3600000000 END, n.now_us + 86400000000, NULL, \
                 CASE WHEN i % 10 = 0 THEN NULL ELSE '\\x226f6b22'::bytea END \
             FROM generate_series({at}::int8, {}::int8) AS i, n",
            end - 1
        );
        sqlx::query(AssertSqlSafe(stmt))
            .execute(pool)
            .await
            .expect("seed rows");
        at = end;
    }
}

fn report(name: &str, command: &str, records: u64, runs: &[Measured]) {
    let (med, min, max) = summary(runs.iter().map(|m| records as f64 / m.secs).collect());
    let peak = runs.iter().map(|m| m.peak_kib).max().unwrap_or(0);
    println!(
        "| {name} | `{command}` | {records} | {:.0} | {:.0}–{:.0} | {:.1} MiB |",
        med,
        min,
        max,
        peak as f64 / 1024.0
    );
}

/// Runs `stats` and `list --format json` over the `records` records reachable with
/// `global`, `rounds` times each, and prints their rows.
fn bench_size(o: &Options, name: &str, global: &[String], records: u64) {
    for (label, cmd) in [
        ("stats", vec!["stats"]),
        ("list --format json", vec!["--format", "json", "list"]),
    ] {
        let args: Vec<&str> = global
            .iter()
            .map(String::as_str)
            .chain(cmd.iter().copied())
            .collect();
        let runs: Vec<Measured> = (0..o.rounds).map(|_| measure(&o.bin, &args)).collect();
        if label.starts_with("list") {
            for r in &runs {
                assert_eq!(r.lines, records, "the listing printed every record once");
            }
        }
        report(name, label, records, &runs);
    }
}

#[tokio::main]
async fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    preflight(&o).await.unwrap_or_else(|e| support::fail(e));
    println!("| store | command | records | records/s (median) | min–max | peak memory |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    if o.stores.iter().any(|s| s == "redis") {
        let url = env_url("IDEMPOTENT_REDIS_URL", "redis://127.0.0.1:6379");
        let prefix = format!("idempotent-cli-bench-{run}:");
        let store = RedisStore::connect(url.as_str())
            .await
            .expect("Redis for the benchmark")
            .with_prefix(&prefix);
        let global = vec![
            "--store".to_owned(),
            url.clone(),
            "--prefix".into(),
            prefix.clone(),
        ];
        seed_redis(&store, 0, o.small).await;
        bench_size(&o, "Redis", &global, o.small);
        seed_redis(&store, o.small, o.records).await;
        bench_size(&o, "Redis", &global, o.records);
        // remove the records
        let mut conn = ConnectionManager::new(redis::Client::open(url.as_str()).unwrap())
            .await
            .unwrap();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    if o.stores.iter().any(|s| s == "postgres") {
        let url = env_url(
            "IDEMPOTENT_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        );
        let table = format!("idempotent_cli_bench_{run}");
        let store = idempotent_runtime::PostgresStore::connect_with_table(&url, &table)
            .await
            .expect("PostgreSQL for the benchmark");
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .unwrap();
        let global = vec![
            "--store".to_owned(),
            url.clone(),
            "--table".into(),
            table.clone(),
        ];
        seed_postgres(&pool, &table, 0, o.small).await;
        sqlx::query(AssertSqlSafe(format!("ANALYZE \"{table}\"")))
            .execute(&pool)
            .await
            .unwrap();
        bench_size(&o, "PostgreSQL", &global, o.small);
        seed_postgres(&pool, &table, o.small, o.records).await;
        sqlx::query(AssertSqlSafe(format!("ANALYZE \"{table}\"")))
            .execute(&pool)
            .await
            .unwrap();
        bench_size(&o, "PostgreSQL", &global, o.records);
        drop(store);
        sqlx::query(AssertSqlSafe(format!("DROP TABLE \"{table}\"")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
