//! The cost of `RedisStore::with_replica_ack` per message: a private Redis master with
//! one replica on loopback, messages handled one at a time (claim, an empty handler,
//! completion) by a store without and with `WAIT 1` after the claim and the completion.
//!
//! ```sh
//! cargo run --release -p idempotent-examples --example replica_ack_bench --features redis
//! cargo run --release -p idempotent-examples --example replica_ack_bench --features redis -- \
//!     --messages 2000 --rounds 9 --timeout-ms 200
//! ```
//!
//! The two stores run in the same process on the same pair, interleaved round by round
//! (without, with, without, with, …); the rounds are short (500 messages, a few tens of
//! milliseconds) and many, so that the load of a shared machine hits both alike.
//! Printed: each round's time per message, then per store the median of the rounds with
//! the lowest and highest and how many claims and completions `WAIT` did not see
//! acknowledged within its timeout (such a claim fails closed, as a consumer would see
//! it, and counts as a message), and the median of the rounds' differences
//! (with − without).
//! Options: `--messages N` per round and store (default 500), `--rounds N` (at least 5,
//! default 31), `--timeout-ms N` the `WAIT` timeout (default 100). Needs
//! `redis-server` on PATH: the program starts the master and the replica itself, in a
//! temporary directory, and stops them when it ends.

use idempotent_runtime::redis::{self, aio::ConnectionManager};
use idempotent_runtime::{
    Error, Idempotency, Outcome, RedisStore, ReplicaAck, StoreErrorKind, observe,
};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Options {
    messages: usize,
    rounds: usize,
    timeout: Duration,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        messages: 500,
        rounds: 31,
        timeout: Duration::from_millis(100),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(format!("{a} needs a number"))
        };
        match a.as_str() {
            "--messages" => o.messages = value()?.max(1) as usize,
            "--rounds" => o.rounds = (value()? as usize).max(5),
            "--timeout-ms" => o.timeout = Duration::from_millis(value()?.max(1)),
            _ => {
                return Err(format!(
                    "unknown argument {a:?}; usage: replica_ack_bench [--messages N] [--rounds N] [--timeout-ms N]"
                ));
            }
        }
    }
    Ok(o)
}

/// A `redis-server` of this program, in its own directory; killed when dropped.
struct Server {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Server {
    fn start(args: &[&str]) -> Result<Server, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let dir = std::env::temp_dir().join(format!(
            "idempotent-replica-ack-bench-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it on PATH?): {e}"))?;
        Ok(Server { port, dir, child })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection once the server answers (within 10 s).
    async fn connect(&self) -> Result<ConnectionManager, String> {
        let client = redis::Client::open(self.url()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ConnectionManager::new(client.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "redis-server on port {} did not answer: {e}",
                        self.port
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A field of `INFO replication`.
async fn replication(conn: &mut ConnectionManager, field: &str) -> Option<String> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await
        .ok()?;
    info.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

/// Messages whose claim `WAIT` did not see acknowledged in time (they failed closed,
/// as a consumer would see them), and completions it did not (`unrecorded`).
#[derive(Default, Clone, Copy)]
struct Misses {
    claims: u64,
    completions: u64,
}

/// Microseconds per message of `messages` messages handled one at a time (a message
/// whose claim fails closed counts, with the time it took).
async fn round(
    h: &Idempotency,
    tag: &str,
    messages: usize,
    misses: &mut Misses,
) -> Result<f64, String> {
    let start = Instant::now();
    for m in 0..messages {
        let key = format!("{tag}-{m}");
        match observe(h.run(key.as_str(), async { Ok::<_, Error>(m) })).await {
            (Ok(_), Some(Outcome::Unrecorded)) => misses.completions += 1,
            (Ok(_), _) => {}
            (Err(Error::Store(e)), _) if e.kind() == StoreErrorKind::NotReplicated => {
                misses.claims += 1
            }
            (Err(e), _) => {
                let source = std::error::Error::source(&e).map(|s| format!(": {s}"));
                return Err(format!("{e}{}", source.unwrap_or_default()));
            }
        }
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / messages as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn span(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

async fn run(o: Options) -> Result<(), String> {
    let master = Server::start(&[])?;
    let mut m = master.connect().await?;
    let replica = Server::start(&["--replicaof", "127.0.0.1", &master.port.to_string()])?;
    let mut r = replica.connect().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while replication(&mut r, "master_link_status").await.as_deref() != Some("up")
        || replication(&mut m, "connected_slaves").await.as_deref() != Some("1")
    {
        if Instant::now() > deadline {
            return Err("the replica did not connect to the master within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut m)
        .await
        .map_err(|e| e.to_string())?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(str::to_owned))
        .unwrap_or_default();

    let plain = RedisStore::from_connection_manager(m.clone());
    let acked = plain
        .clone()
        .with_replica_ack(ReplicaAck::new(1, o.timeout));
    let handlers = [
        (
            "without",
            Idempotency::new("replica-ack-bench").shared_store(Arc::new(plain)),
        ),
        (
            "with WAIT 1",
            Idempotency::new("replica-ack-bench").shared_store(Arc::new(acked)),
        ),
    ];
    println!(
        "Redis {version}, master :{} and one replica :{} on loopback; {} rounds of {} messages \
         per store, one message at a time (claim, empty handler, completion); WAIT timeout {} ms; \
         {} build",
        master.port,
        replica.port,
        o.rounds,
        o.messages,
        o.timeout.as_millis(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    // a warm-up round each, not counted (connections, the function library's loading)
    let mut misses = [Misses::default(); 2];
    for (i, (name, h)) in handlers.iter().enumerate() {
        round(
            h,
            &format!("warm-{i}"),
            o.messages.min(200),
            &mut Misses::default(),
        )
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    }
    let mut us: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for n in 0..o.rounds {
        let mut line = format!("round {}:", n + 1);
        for (i, (name, h)) in handlers.iter().enumerate() {
            let t = round(h, &format!("r{n}-{i}"), o.messages, &mut misses[i])
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            us[i].push(t);
            line.push_str(&format!(" {name} {t:.1} µs"));
        }
        println!("{line}");
    }
    println!();
    for (i, (name, _)) in handlers.iter().enumerate() {
        let (lo, hi) = span(&us[i]);
        println!(
            "{name}: median {:.1} µs per message (min {lo:.1}, max {hi:.1}); claims not \
             acknowledged in time {}, completions {}",
            median(&us[i]),
            misses[i].claims,
            misses[i].completions
        );
    }
    let diff: Vec<f64> = us[1].iter().zip(&us[0]).map(|(w, wo)| w - wo).collect();
    let (lo, hi) = span(&diff);
    println!(
        "WAIT cost (with − without, per round): median {:.1} µs per message (min {lo:.1}, max {hi:.1})",
        median(&diff)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("replica_ack_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(o).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replica_ack_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
