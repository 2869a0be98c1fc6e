//! The crash suite: real consumer processes killed with `kill -9` at random moments, a
//! Redis server restarted under them, their database connections terminated, handlers
//! that fail or panic for a share of messages, duplicates resent with new broker ids;
//! then a checker reads every process's history and the final store and broker state
//! and checks, per key, that nothing was lost, nothing ran after a recorded completion
//! (G2), no two executions overlapped while a lease was held (G1), each effect exists
//! once in transactional mode (G7), and every re-execution is explained by a fault.
//! The `pg-outbox` mode runs a two-stage pipeline through the transactional outbox
//! (`pipeline.rs`): orders in, payments out through the outbox and its relay, payments
//! recorded downstream, every stage and the relay killed, each order paid once.
//!
//! ```sh
//! cargo run -p idempotent-tests --features crash --bin crash -- --profile short --mode all
//! cargo run --release -p idempotent-tests --features crash --bin crash -- --profile long --mode all
//! ```
//!
//! Options: `--profile short|long`,
//! `--mode redis|redis-failover|redis-failover-ack|pg-store|pg-tx|mysql-tx|pg-outbox|all`
//! (or a comma list),
//! `--orders N`, `--workers N`, `--seed N`, `--keep` (keep the run directories).
//! It exits non-zero, with the violations listed, when an invariant breaks. Services:
//! NATS JetStream (`IDEMPOTENT_NATS_URL`), PostgreSQL (`IDEMPOTENT_POSTGRES_URL`, a
//! superuser: connections are terminated with `pg_terminate_backend`), MariaDB / MySQL
//! (`IDEMPOTENT_MYSQL_URL`), and `redis-server` on PATH (a private server is started; in
//! the failover modes a master, a replica and a Sentinel, with `redis-cli` on PATH).
//! Invoked as `crash worker` (with `CRASH_*` variables) it is one consumer process (in
//! `pg-outbox`, a stage-1 or stage-2 consumer or an outbox relay, by `CRASH_ROLE`).

mod check;
mod driver;
mod failover;
mod history;
mod pipeline;
mod worker;

use idempotent_runtime::sqlx::{
    self,
    mysql::{MySqlConnectOptions, MySqlPoolOptions},
    postgres::{PgConnectOptions, PgPoolOptions},
};
use std::str::FromStr;
use std::time::Duration;

/// The handlers' scope.
pub const SCOPE: &str = "crash";
/// The store-mode handler's lease (its attribute says `lease = "2s"`).
pub const LEASE: Duration = Duration::from_secs(2);
/// The failover modes' Sentinel name of the master.
pub const MASTER_NAME: &str = "crash";
/// `redis-failover-ack`: the store waits this long for one replica's acknowledgement.
pub const REPLICA_ACK_TIMEOUT: Duration = Duration::from_millis(100);

/// What the consumers run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Store mode on a private Redis server, restarted during the run.
    Redis,
    /// Store mode on a private Redis master with a replica and a Sentinel; the workers
    /// connect through Sentinel, and the master is failed over during the run.
    RedisFailover,
    /// The same, the store waiting for the replica's acknowledgement
    /// (`RedisStore::with_replica_ack`).
    RedisFailoverAck,
    /// Store mode on PostgreSQL.
    PgStore,
    /// Transactional mode on PostgreSQL.
    PgTx,
    /// Transactional mode on MariaDB / MySQL.
    MysqlTx,
    /// Two stages through the transactional outbox on PostgreSQL: orders in, payments
    /// emitted through the outbox and published by dispatch and relays to a second
    /// stream, payments recorded by a transactional consumer keyed by the message id.
    PgOutbox,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Redis,
        Mode::RedisFailover,
        Mode::RedisFailoverAck,
        Mode::PgStore,
        Mode::PgTx,
        Mode::MysqlTx,
        Mode::PgOutbox,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Redis => "redis",
            Mode::RedisFailover => "redis-failover",
            Mode::RedisFailoverAck => "redis-failover-ack",
            Mode::PgStore => "pg-store",
            Mode::PgTx => "pg-tx",
            Mode::MysqlTx => "mysql-tx",
            Mode::PgOutbox => "pg-outbox",
        }
    }

    pub fn is_tx(self) -> bool {
        matches!(self, Mode::PgTx | Mode::MysqlTx | Mode::PgOutbox)
    }

    /// The failover modes (a master, a replica, a Sentinel).
    pub fn is_failover(self) -> bool {
        matches!(self, Mode::RedisFailover | Mode::RedisFailoverAck)
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown mode {s:?} (redis, redis-failover, redis-failover-ack, pg-store, \
                     pg-tx, mysql-tx, pg-outbox, all)"
                )
            })
    }
}

pub fn postgres_url() -> String {
    std::env::var("IDEMPOTENT_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn mysql_url() -> String {
    std::env::var("IDEMPOTENT_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A pool in the run's schema (`CRASH_PG_SCHEMA`) named `CRASH_APP`, so the driver
/// terminates only these connections.
pub async fn pg_pool(max: u32) -> sqlx::PgPool {
    let schema = std::env::var("CRASH_PG_SCHEMA").expect("CRASH_PG_SCHEMA");
    let app = std::env::var("CRASH_APP").expect("CRASH_APP");
    pg_pool_in(&schema, &app, max).await
}

pub async fn pg_pool_in(schema: &str, app: &str, max: u32) -> sqlx::PgPool {
    let url = postgres_url();
    let opts = PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("bad IDEMPOTENT_POSTGRES_URL {url}: {e}"))
        .application_name(app)
        .options([("search_path", schema)]);
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| {
            panic!("the crash suite needs PostgreSQL at {url} (IDEMPOTENT_POSTGRES_URL): {e}")
        })
}

/// A pool on the run's database (`CRASH_MYSQL_DB`), so the driver kills only these
/// connections.
pub async fn mysql_pool(max: u32) -> sqlx::MySqlPool {
    let db = std::env::var("CRASH_MYSQL_DB").expect("CRASH_MYSQL_DB");
    mysql_pool_in(Some(&db), max).await
}

pub async fn mysql_pool_in(db: Option<&str>, max: u32) -> sqlx::MySqlPool {
    let url = mysql_url();
    let mut opts = MySqlConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("bad IDEMPOTENT_MYSQL_URL {url}: {e}"));
    if let Some(db) = db {
        opts = opts.database(db);
    }
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .unwrap_or_else(|e| {
            panic!("the crash suite needs MariaDB / MySQL at {url} (IDEMPOTENT_MYSQL_URL): {e}")
        })
}

/// A NATS client and its JetStream context.
pub async fn nats(name: &str) -> (async_nats::Client, async_nats::jetstream::Context) {
    idempotent_tests::nats_support::connect(name).await
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        worker::main();
        return;
    }
    let opts = match driver::Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("crash: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = rt.block_on(driver::run_all(opts));
    std::process::exit(if ok { 0 } else { 1 });
}
