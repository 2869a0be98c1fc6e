//! The driver: sets up one run per mode (a stream and durable consumer, a private
//! Redis server or a schema / database of its own), starts the worker processes,
//! publishes the orders and their duplicates, injects the faults, waits until the
//! broker has nothing left, stops everything it started, and hands the histories and
//! the final state to the checker. In `pg-outbox` the workers it starts are stage 1,
//! and `pipeline.rs` adds the rest of the pipeline and its checks.

use crate::check::{self, Failover, Fault, FinalState, Report};
use crate::failover::RedisHa;
use crate::history::{self, now_us};
use crate::pipeline::Pipeline;
use crate::{LEASE, Mode, SCOPE};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, PullConsumer, pull},
    message::PublishMessage,
    stream,
};
use idempotent_runtime::sqlx;
use idempotent_runtime::{Idempotency, MySqlStore, PostgresStore, RedisStore, Store};
use idempotent_tests::redis_support::RedisServer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// JetStream redelivers an unacknowledged message after this long.
pub const ACK_WAIT: Duration = Duration::from_secs(2);

/// How much work and how many faults a run has.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: &'static str,
    pub workers: usize,
    pub orders: usize,
    /// Share of orders resent with a new `Nats-Msg-Id`.
    pub duplicates: f64,
    /// Share of orders whose body fails on a message's first delivery.
    pub failures: f64,
    /// Share of orders whose body panics on a message's first delivery.
    pub panics: f64,
    /// Messages published per second (spreads the run so faults meet work in flight).
    pub publish_per_s: u64,
    /// The body's work, in milliseconds (uniform).
    pub work_ms: (u64, u64),
    /// Time between two `kill -9` of a worker, in milliseconds (uniform).
    pub kill_every_ms: (u64, u64),
    /// Redis restarts (Redis mode), spread over the run's progress.
    pub restarts: usize,
    /// Redis failovers (failover modes), spread over the run's progress.
    pub failovers: usize,
    /// How long the replication link is cut before the master is killed, in
    /// milliseconds (uniform).
    pub partition_ms: (u64, u64),
    /// Time between two terminations of the workers' database connections (SQL modes).
    pub cut_every_ms: (u64, u64),
    /// The run fails if the broker still has work after this long.
    pub deadline: Duration,
}

impl Profile {
    pub fn short() -> Profile {
        Profile {
            name: "short",
            workers: 3,
            orders: 300,
            duplicates: 0.3,
            failures: 0.1,
            panics: 0.03,
            publish_per_s: 25,
            work_ms: (50, 300),
            kill_every_ms: (500, 1200),
            restarts: 1,
            failovers: 1,
            partition_ms: (300, 800),
            cut_every_ms: (1000, 2500),
            deadline: Duration::from_secs(90),
        }
    }

    pub fn long() -> Profile {
        Profile {
            name: "long",
            workers: 8,
            orders: 10_000,
            duplicates: 0.3,
            failures: 0.1,
            panics: 0.02,
            publish_per_s: 60,
            work_ms: (50, 300),
            kill_every_ms: (1000, 3000),
            restarts: 2,
            failovers: 2,
            partition_ms: (300, 800),
            cut_every_ms: (2000, 5000),
            deadline: Duration::from_secs(1800),
        }
    }
}

#[derive(Debug)]
pub struct Options {
    pub profile: Profile,
    pub modes: Vec<Mode>,
    pub seed: u64,
    pub keep: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut profile = Profile::short();
        let mut modes = Mode::ALL.to_vec();
        let mut seed = None;
        let mut keep = false;
        let (mut orders, mut workers) = (None, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--profile" => {
                    profile = match value()?.as_str() {
                        "short" => Profile::short(),
                        "long" => Profile::long(),
                        p => return Err(format!("unknown profile {p:?} (short, long)")),
                    }
                }
                "--mode" => {
                    let m = value()?;
                    modes = if m == "all" {
                        Mode::ALL.to_vec()
                    } else {
                        m.split(',').map(str::parse).collect::<Result<_, _>>()?
                    };
                }
                "--orders" => {
                    orders = Some(value()?.parse().map_err(|e| format!("--orders: {e}"))?)
                }
                "--workers" => {
                    workers = Some(value()?.parse().map_err(|e| format!("--workers: {e}"))?)
                }
                "--seed" => seed = Some(value()?.parse().map_err(|e| format!("--seed: {e}"))?),
                "--keep" => keep = true,
                "--help" | "-h" => {
                    return Err("usage: crash [--profile short|long] \
                                [--mode redis|redis-failover|redis-failover-ack|pg-store|pg-tx|mysql-tx|pg-outbox|all] \
                                [--orders N] [--workers N] [--seed N] [--keep]"
                        .to_owned());
                }
                other => return Err(format!("unknown argument {other:?} (--help)")),
            }
        }
        if let Some(n) = orders {
            profile.orders = n;
        }
        if let Some(n) = workers {
            profile.workers = n;
        }
        let seed = seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("random bytes");
            u64::from_le_bytes(b)
        });
        Ok(Options {
            profile,
            modes,
            seed,
            keep,
        })
    }
}

/// xorshift64*: reproducible from `--seed`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Runs every mode; true when all passed.
pub async fn run_all(opts: Options) -> bool {
    println!(
        "crash suite: profile {}, seed {}, {} workers, {} orders",
        opts.profile.name, opts.seed, opts.profile.workers, opts.profile.orders
    );
    let mut reports = Vec::new();
    for (i, &mode) in opts.modes.iter().enumerate() {
        let started = Instant::now();
        // on SIGINT / SIGTERM the run is dropped: its workers and Redis server are killed
        let report = tokio::select! {
            r = run_mode(&opts, mode, opts.seed.wrapping_add(i as u64)) => r,
            s = stop_signal() => {
                eprintln!("crash: {s}: stopping every process started");
                return false;
            }
        };
        println!(
            "\n== {} ({:.1} s)\n{}",
            mode.name(),
            started.elapsed().as_secs_f64(),
            report.render()
        );
        reports.push((mode, report));
    }
    println!("\n{}", check::table(&opts.profile, &reports));
    let failed: Vec<&str> = reports
        .iter()
        .filter(|(_, r)| !r.ok())
        .map(|(m, _)| m.name())
        .collect();
    if failed.is_empty() {
        println!("all invariants hold");
        true
    } else {
        println!("INVARIANTS BROKEN in: {}", failed.join(", "));
        false
    }
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

/// The worker processes; every one still running is killed when this is dropped
/// (also when the driver panics).
pub struct Workers {
    exe: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Workers {
    /// Starts `n` workers with `env`, their stderr in `dir`.
    pub fn start(env: Vec<(String, String)>, dir: &Path, n: usize) -> Workers {
        let mut workers = Workers {
            exe: std::env::current_exe().expect("own executable"),
            env,
            dir: dir.to_owned(),
            children: Vec::new(),
        };
        for _ in 0..n {
            let c = workers.spawn_one();
            workers.children.push(c);
        }
        workers
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    fn spawn_one(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("workers-stderr.log"))
            .expect("worker log");
        Command::new(&self.exe)
            .arg("worker")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // the worker exits when its stdin closes: when the driver goes away
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start a worker process")
    }

    /// `kill -9` of worker `i`, then a new worker in its place; returns the killed
    /// pid and the time the signal was sent: the worker runs no code after it, and its
    /// locks and connections go with it, so another worker may claim its key before
    /// `kill` returns (a time taken after it would end the killed execution after that
    /// claim, an overlap that never happened).
    pub fn kill_and_restart(&mut self, i: usize) -> (u32, u64) {
        let sent = now_us();
        let c = &mut self.children[i];
        let pid = c.id();
        let _ = c.kill();
        let _ = c.wait();
        self.children[i] = self.spawn_one();
        (pid, sent)
    }

    pub fn stop_all(&mut self) -> Vec<u32> {
        let mut pids = Vec::new();
        for c in &mut self.children {
            pids.push(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        pids
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The final record of each order.
pub type Records = HashMap<String, Option<idempotent_runtime::store::Record>>;
/// The effect rows' tokens of each order (transactional modes).
pub type Effects = HashMap<String, Vec<u64>>;

/// The store side of a run.
enum Backend {
    Redis(RedisServer),
    RedisHa(Box<RedisHa>),
    Postgres {
        admin: sqlx::PgPool,
        schema: String,
        app: String,
    },
    Mysql {
        admin: sqlx::MySqlPool,
        db: String,
    },
}

impl Backend {
    async fn setup(mode: Mode, run: &str) -> (Backend, Vec<(String, String)>) {
        match mode {
            Mode::Redis => {
                // the append-only file, fsynced on every write: acknowledged records
                // survive the restarts
                let server = RedisServer::start_with(&[
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ]);
                let env = vec![("CRASH_REDIS_URL".to_owned(), server.url())];
                (Backend::Redis(server), env)
            }
            Mode::RedisFailover | Mode::RedisFailoverAck => {
                let ha = tokio::task::block_in_place(RedisHa::start);
                let env = vec![("CRASH_REDIS_URL".to_owned(), ha.url())];
                (Backend::RedisHa(Box::new(ha)), env)
            }
            Mode::PgStore | Mode::PgTx | Mode::PgOutbox => {
                let schema = format!("crash_{run}");
                let app = format!("idempotent-crash-{run}");
                let admin = crate::pg_pool_in("public", &format!("{app}-driver"), 2).await;
                exec_pg(&admin, &format!("CREATE SCHEMA {schema}")).await;
                let pool = crate::pg_pool_in(&schema, &format!("{app}-driver"), 1).await;
                PostgresStore::from_pool(pool.clone())
                    .migrate()
                    .await
                    .expect("create the dedup table");
                // no unique constraint: an effect applied twice is two rows
                exec_pg(
                    &pool,
                    "CREATE TABLE crash_effects (order_id TEXT NOT NULL, token BIGINT NOT NULL, pid BIGINT NOT NULL)",
                )
                .await;
                pool.close().await;
                let env = vec![
                    ("CRASH_PG_SCHEMA".to_owned(), schema.clone()),
                    ("CRASH_APP".to_owned(), app.clone()),
                ];
                (Backend::Postgres { admin, schema, app }, env)
            }
            Mode::MysqlTx => {
                let db = format!("crash_{run}");
                let admin = crate::mysql_pool_in(None, 2).await;
                exec_my(&admin, &format!("CREATE DATABASE {db}")).await;
                let pool = crate::mysql_pool_in(Some(&db), 1).await;
                MySqlStore::from_pool(pool.clone())
                    .migrate()
                    .await
                    .expect("create the dedup table");
                exec_my(
                    &pool,
                    "CREATE TABLE crash_effects (order_id VARCHAR(64) NOT NULL, token BIGINT NOT NULL, pid BIGINT NOT NULL) ENGINE = InnoDB",
                )
                .await;
                // the driver holds no connection in the run's database while workers
                // run: every connection there is a worker's
                pool.close().await;
                let env = vec![("CRASH_MYSQL_DB".to_owned(), db.clone())];
                (Backend::Mysql { admin, db }, env)
            }
        }
    }

    /// Terminates every worker connection; returns how many.
    async fn cut_connections(&self) -> u64 {
        match self {
            Backend::Redis(_) | Backend::RedisHa(_) => 0,
            Backend::Postgres { admin, app, .. } => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
                )
                .bind(app)
                .fetch_one(admin)
                .await
                .expect("pg_terminate_backend");
                n as u64
            }
            Backend::Mysql { admin, db } => {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()",
                )
                .bind(db)
                .fetch_all(admin)
                .await
                .expect("processlist");
                let mut n = 0;
                for id in ids {
                    // a connection may have closed meanwhile
                    if sqlx::query(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
                        .execute(admin)
                        .await
                        .is_ok()
                    {
                        n += 1;
                    }
                }
                n
            }
        }
    }

    /// The store the checker reads the final records from, and the effect rows.
    async fn final_state(&self, mode: Mode, ids: &[String]) -> (Records, Option<Effects>) {
        let (store, effects): (Arc<dyn Store>, Option<Effects>) = match self {
            Backend::Redis(server) => (
                Arc::new(
                    RedisStore::connect(server.url().as_str())
                        .await
                        .expect("connect to the private Redis"),
                ),
                None,
            ),
            Backend::RedisHa(ha) => (
                Arc::new(
                    RedisStore::connect(ha.url().as_str())
                        .await
                        .expect("connect to the private Redis through Sentinel"),
                ),
                None,
            ),
            Backend::Postgres { schema, app, .. } => {
                let pool = crate::pg_pool_in(schema, &format!("{app}-driver"), 2).await;
                // store mode writes no effect rows
                let effects = if mode.is_tx() {
                    Some(effects_pg(&pool, "crash_effects").await)
                } else {
                    None
                };
                (Arc::new(PostgresStore::from_pool(pool)), effects)
            }
            Backend::Mysql { db, .. } => {
                let pool = crate::mysql_pool_in(Some(db), 2).await;
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT order_id, token FROM crash_effects")
                        .fetch_all(&pool)
                        .await
                        .expect("read the effects");
                (Arc::new(MySqlStore::from_pool(pool)), Some(group(rows)))
            }
        };
        let keys: Vec<(String, String)> = ids.iter().map(|id| (id.clone(), id.clone())).collect();
        (records(&*store, SCOPE, &keys).await, effects)
    }

    async fn cleanup(&self) {
        match self {
            Backend::Redis(_) | Backend::RedisHa(_) => {}
            Backend::Postgres { admin, schema, .. } => {
                exec_pg(admin, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await
            }
            Backend::Mysql { admin, db } => {
                exec_my(admin, &format!("DROP DATABASE IF EXISTS {db}")).await
            }
        }
    }
}

/// The final record of each order, `keys` giving each order's key in `scope`.
pub async fn records(store: &dyn Store, scope: &'static str, keys: &[(String, String)]) -> Records {
    let h = Idempotency::new(scope);
    let mut records = HashMap::new();
    for (id, key) in keys {
        let key = h.record_key(key.as_str()).expect("record key");
        let rec = store
            .as_admin()
            .expect("operator actions")
            .inspect(&key)
            .await
            .expect("inspect a final record");
        records.insert(id.clone(), rec);
    }
    records
}

/// The effect rows of `table` (`order_id`, `token`) per order.
pub async fn effects_pg(pool: &sqlx::PgPool, table: &str) -> Effects {
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT order_id, token FROM {table}"
    )))
    .fetch_all(pool)
    .await
    .expect("read the effects");
    group(rows)
}

fn group(rows: Vec<(String, i64)>) -> Effects {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, token) in rows {
        m.entry(id).or_default().push(token as u64);
    }
    m
}

/// A stream and its durable pull consumer `name` (explicit acks, redelivery after
/// [`ACK_WAIT`]).
pub async fn durable(js: &jetstream::Context, config: stream::Config, name: &str) -> PullConsumer {
    js.create_stream(config)
        .await
        .expect("create the stream")
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .expect("create the durable consumer")
}

/// What a message's body does on its first delivery (`ok`, `fail`, `panic`), and how
/// long it works, drawn with the profile's shares.
pub fn draw_plan(rng: &mut Rng, p: &Profile) -> (&'static str, u64) {
    let plan = if rng.chance(p.panics) {
        "panic"
    } else if rng.chance(p.failures) {
        "fail"
    } else {
        "ok"
    };
    (plan, rng.range(p.work_ms))
}

pub async fn exec_pg(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn exec_my(pool: &sqlx::MySqlPool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One order as the producer plans it.
struct Planned {
    id: String,
    plan: &'static str,
    work_ms: u64,
}

async fn run_mode(opts: &Options, mode: Mode, seed: u64) -> Report {
    let p = &opts.profile;
    let mut rng = Rng::new(seed);
    let run = idempotent_tests::nats_support::run_id();
    let dir = std::env::temp_dir().join(format!("idempotent-crash-{}-{run}", mode.name()));
    std::fs::create_dir_all(&dir).expect("run directory");
    println!(
        "\n-- {}: run {run}, seed {seed}, histories in {}",
        mode.name(),
        dir.display()
    );
    let (mut backend, store_env) = Backend::setup(mode, &run).await;

    // the stream and its durable consumer, unique to this run
    let (_client, js) = crate::nats(&format!("crash-driver-{run}")).await;
    let stream_name = format!("CRASH_{run}");
    let subject = format!("crash.{run}.orders");
    let mut consumer = durable(
        &js,
        stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        },
        "workers",
    )
    .await;

    // the orders, each with its plan, and the resends
    let orders: Vec<Planned> = (0..p.orders)
        .map(|i| {
            let (plan, work_ms) = draw_plan(&mut rng, p);
            Planned {
                id: format!("o{i}"),
                plan,
                work_ms,
            }
        })
        .collect();
    // (order, message id) in publish order; a resend goes up to 200 messages later
    let mut sends: Vec<(usize, String)> =
        (0..p.orders).map(|i| (i, format!("{run}-{i}"))).collect();
    let mut duplicates = 0;
    for i in 0..p.orders {
        if rng.chance(p.duplicates) {
            let at = (i + 1 + rng.below(200) as usize).min(sends.len());
            sends.insert(at, (i, format!("{run}-{i}-resend")));
            duplicates += 1;
        }
    }
    let total = sends.len();

    let mut env = store_env;
    env.extend([
        ("CRASH_MODE".to_owned(), mode.name().to_owned()),
        ("CRASH_DIR".to_owned(), dir.display().to_string()),
        ("CRASH_STREAM".to_owned(), stream_name.clone()),
        ("CRASH_CONSUMER".to_owned(), "workers".to_owned()),
    ]);
    // pg-outbox: the outbox table, the payments stream, stage 2 and the relays; the
    // workers above are stage 1
    let mut pipeline = match mode {
        Mode::PgOutbox => Some(Pipeline::start(p, seed, &run, &dir, &js, &mut env).await),
        _ => None,
    };
    let mut workers = Workers::start(env, &dir, p.workers);

    // publish
    let published = Arc::new(AtomicUsize::new(0));
    let publishing_done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (js, subject) = (js.clone(), subject.clone());
        let (published, done) = (published.clone(), publishing_done.clone());
        type Msg = (
            String,
            String,
            &'static str,
            u64,
            Vec<(&'static str, String)>,
        );
        let msgs: Vec<Msg> = sends
            .iter()
            .map(|(i, msg_id)| {
                let o = &orders[*i];
                let more = pipeline
                    .as_ref()
                    .map_or_else(Vec::new, |x| x.order_headers(*i));
                (msg_id.clone(), o.id.clone(), o.plan, o.work_ms, more)
            })
            .collect();
        let every = Duration::from_micros(1_000_000 / p.publish_per_s.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for (msg_id, id, plan, work_ms, more) in msgs {
                tick.tick().await;
                let mut msg = PublishMessage::build()
                    .payload(id.clone().into())
                    .message_id(msg_id)
                    .header("Order-Id", id.as_str())
                    .header("Plan", plan)
                    .header("Work-Ms", work_ms.to_string().as_str());
                for (name, value) in more {
                    msg = msg.header(name, value.as_str());
                }
                let ack = js
                    .send_publish(subject.clone(), msg)
                    .await
                    .expect("publish")
                    .await
                    .expect("publish ack");
                assert!(!ack.duplicate, "every message has its own Nats-Msg-Id");
                published.fetch_add(1, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    // faults, until the broker has nothing left
    let mut kills: Vec<(u32, u64)> = Vec::new();
    let mut faults: Vec<Fault> = Vec::new();
    let started = Instant::now();
    let mut next_kill = Instant::now() + Duration::from_millis(rng.range(p.kill_every_ms));
    let mut next_cut = Instant::now() + Duration::from_millis(rng.range(p.cut_every_ms));
    let mut restarts = 0;
    let mut failovers: Vec<Failover> = Vec::new();
    let ids: Vec<String> = orders.iter().map(|o| o.id.clone()).collect();
    let mut quiet_since: Option<(Instant, u64)> = None;
    let mut timed_out = false;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > p.deadline {
            timed_out = true;
            break;
        }
        let info = match consumer.info().await {
            Ok(i) => i.clone(),
            Err(e) => {
                eprintln!("consumer info: {e}");
                continue;
            }
        };
        let mut remaining = info.num_pending as usize + info.num_ack_pending;
        let mut deliveries = info.delivered.consumer_sequence;
        if let Some(x) = &mut pipeline {
            // the payments stream's work and the outbox rows not yet sent
            let Some((left, delivered)) = x.backlog().await else {
                continue;
            };
            remaining += left;
            deliveries += delivered;
        }
        let all_published = publishing_done.load(Ordering::SeqCst);
        if all_published && remaining == 0 {
            // quiet for longer than an ack wait, and no delivery since: settled
            match quiet_since {
                Some((t, delivered)) if delivered == deliveries => {
                    if t.elapsed() > ACK_WAIT + Duration::from_secs(1) {
                        break;
                    }
                }
                _ => quiet_since = Some((Instant::now(), deliveries)),
            }
            continue;
        }
        quiet_since = None;
        let progress =
            published.load(Ordering::SeqCst).saturating_sub(remaining) as f64 / total as f64;
        if Instant::now() >= next_kill {
            // in pg-outbox the kill may fall on stage 2 or a relay instead
            if !pipeline
                .as_mut()
                .is_some_and(|x| x.kill_downstream(&mut rng))
            {
                let i = rng.below(workers.len() as u64) as usize;
                kills.push(workers.kill_and_restart(i));
            }
            next_kill = Instant::now() + Duration::from_millis(rng.range(p.kill_every_ms));
        }
        match &mut backend {
            Backend::Redis(server) => {
                if restarts < p.restarts
                    && progress >= (restarts + 1) as f64 / (p.restarts + 1) as f64
                {
                    let down = now_us();
                    server.kill();
                    tokio::time::sleep(Duration::from_millis(rng.range((200, 1000)))).await;
                    tokio::task::block_in_place(|| server.restart());
                    faults.push(Fault {
                        kind: "redis-restart",
                        start: down,
                        end: now_us(),
                    });
                    restarts += 1;
                }
            }
            Backend::RedisHa(ha) => {
                let due = failovers.len() < p.failovers
                    && progress >= (failovers.len() + 1) as f64 / (p.failovers + 1) as f64;
                // Sentinel must know a healthy replica to promote (a new one takes up
                // to its 10 s INFO period to be seen)
                if due && tokio::task::block_in_place(|| ha.ready()) {
                    let partition = Duration::from_millis(rng.range(p.partition_ms));
                    let f = ha.fail_over(partition, &ids).await;
                    let s = |t: u64| (t - f.killed_at) as f64 / 1e6;
                    println!(
                        "failover {}: replication link cut {:.2} s before the kill; the replica \
                         held {} of {} orders' records; after the kill, promotion asked at \
                         {:.2} s, Sentinel named the new master at {:.2} s, which had a \
                         replica of its own at {:.2} s",
                        failovers.len() + 1,
                        (f.killed_at - f.partitioned_at) as f64 / 1e6,
                        f.survived.values().filter(|r| r.is_some()).count(),
                        ids.len(),
                        s(f.promoting_at),
                        s(f.promoted_at),
                        s(f.ready_at)
                    );
                    failovers.push(f);
                }
            }
            _ => {
                if Instant::now() >= next_cut {
                    let at = now_us();
                    let n = backend.cut_connections().await;
                    faults.push(Fault {
                        kind: "connections-cut",
                        start: at,
                        end: now_us(),
                    });
                    if n == 0 {
                        // nothing to cut right now: not a fault
                        faults.pop();
                    }
                    next_cut = Instant::now() + Duration::from_millis(rng.range(p.cut_every_ms));
                }
            }
        }
    }
    let stopped_at = now_us();
    let mut stopped = workers.stop_all();
    if let Some(x) = &mut pipeline {
        stopped.extend(x.stop_all());
    }
    publisher.abort();
    let info = consumer.info().await.expect("consumer info").clone();
    let (records, effects) = backend.final_state(mode, &ids).await;
    let lines = history::read_all(&dir);
    let input = check::Input {
        mode,
        lease_us: LEASE.as_micros() as u64,
        orders: &ids,
        messages: total,
        duplicates,
        planned_failures: orders.iter().filter(|o| o.plan == "fail").count(),
        planned_panics: orders.iter().filter(|o| o.plan == "panic").count(),
        lines: &lines,
        replica_ack: mode == Mode::RedisFailoverAck,
        failovers: &failovers,
        kills: &kills,
        faults: &faults,
        stopped: &stopped,
        stopped_at,
        final_state: FinalState {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            deliveries: info.delivered.consumer_sequence,
            records,
            effects,
        },
        timed_out,
        elapsed: started.elapsed(),
    };
    let mut report = check::check(&input);
    if let Some(x) = pipeline {
        x.finish(&input, &mut report).await;
    }
    let _ = js.delete_stream(&stream_name).await;
    backend.cleanup().await;
    drop(backend);
    if report.ok() && !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("histories kept in {}", dir.display());
    }
    report
}
