//! Worker mode: one OS process consuming the run's durable JetStream consumer and
//! running an `#[idempotent]` handler per message, writing every step to its history.
//!
//! History lines (see `history.rs`), `key` being the order id:
//!
//! - `W pid` — the process started;
//! - `S key token attempt` — the body started under a claim;
//! - `E key token` — the body finished its work and returns `Ok`;
//! - `F key token` / `P key token` — the body fails / is about to panic, as planned;
//! - `O key outcome token` — what the handler returned (`executed`, `replayed` with the
//!   token of the execution whose output came back, `in_progress`, `failed`, `panicked`,
//!   `store_error`, `error`; in store mode, a body that succeeded but whose completion
//!   the store did not take is `unrecorded` or `lease_lost`, as `observe` reports), and
//!   in transactional mode `committed` / `commit_failed`;
//! - `A key seq` / `N key seq` — the ack (confirmed by the server) / the nak of a delivery.
//!
//! In `pg-outbox` the stages' handlers are in `pipeline.rs`; they write the same lines,
//! keyed by the order id in both stages.

use crate::Mode;
use crate::history::History;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures_util::StreamExt;
use idempotent_runtime::sqlx::{self, MySql, Postgres, Transaction};
use idempotent_runtime::{
    Error, Outcome, PostgresStore, RedisStore, ReplicaAck, current_claim, idempotent, observe,
    register_store,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Messages a worker handles at once.
const CONCURRENCY: usize = 4;
const NAK_DELAY: Duration = Duration::from_millis(200);
const IN_PROGRESS_DELAY: Duration = Duration::from_millis(300);

/// What the producer planned for a delivery of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Ok,
    /// The body returns an error on the message's first delivery.
    Fail,
    /// The body panics on the message's first delivery.
    Panic,
}

pub struct Order {
    pub id: String,
    plan: Plan,
    work: Duration,
    /// The message's headers.
    headers: async_nats::HeaderMap,
}

impl Order {
    /// The value of the message's header `name`, empty when it has none.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.as_str())
    }
}

#[derive(Debug)]
pub enum WorkError {
    Idempotency(Error),
    /// The planned failure.
    Planned,
    Db(sqlx::Error),
}

impl From<Error> for WorkError {
    fn from(e: Error) -> Self {
        WorkError::Idempotency(e)
    }
}

pub struct Ctx {
    pub history: History,
    pub pid: u32,
}

/// The common part of every body: record the start, work, apply the plan.
pub async fn body_start(order: &Order, ctx: &Ctx, mine: &AtomicU64) -> u64 {
    let claim = current_claim().expect("the body runs under a claim");
    let token = claim.token.get();
    mine.store(token, Ordering::SeqCst);
    ctx.history.event("S", &[&order.id, &token, &claim.attempt]);
    tokio::time::sleep(order.work).await;
    token
}

pub fn body_plan(order: &Order, ctx: &Ctx, token: u64) -> Result<(), WorkError> {
    match order.plan {
        Plan::Ok => Ok(()),
        Plan::Fail => {
            ctx.history.event("F", &[&order.id, &token]);
            Err(WorkError::Planned)
        }
        Plan::Panic => {
            ctx.history.event("P", &[&order.id, &token]);
            panic!("planned panic for {}", order.id)
        }
    }
}

/// Store mode (Redis or PostgreSQL, registered as "crash"): the effect is the
/// execution itself, recorded in the history.
#[idempotent(
    key = "order.id",
    store = "crash",
    scope = "crash",
    ttl = "1h",
    lease = "2s"
)]
async fn handle_in_store(order: &Order, ctx: &Ctx, mine: &AtomicU64) -> Result<u64, WorkError> {
    let token = body_start(order, ctx, mine).await;
    body_plan(order, ctx, token)?;
    ctx.history.event("E", &[&order.id, &token]);
    Ok(token)
}

/// Transactional mode on PostgreSQL: the effect is a row of `crash_effects` (no unique
/// constraint) written in the same transaction as the dedup row.
#[idempotent(key = "order.id", tx = "tx", scope = "crash", ttl = "1h")]
async fn handle_pg_tx(
    order: &Order,
    ctx: &Ctx,
    mine: &AtomicU64,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<u64, WorkError> {
    let token = body_start(order, ctx, mine).await;
    write_effect_pg(tx, order, ctx, token).await?;
    body_plan(order, ctx, token)?;
    ctx.history.event("E", &[&order.id, &token]);
    Ok(token)
}

/// The effect row of execution `token` in `crash_effects`, in `tx`.
pub async fn write_effect_pg(
    tx: &mut Transaction<'_, Postgres>,
    order: &Order,
    ctx: &Ctx,
    token: u64,
) -> Result<(), WorkError> {
    sqlx::query("INSERT INTO crash_effects (order_id, token, pid) VALUES ($1, $2, $3)")
        .bind(&order.id)
        .bind(token as i64)
        .bind(i64::from(ctx.pid))
        .execute(&mut **tx)
        .await
        .map_err(WorkError::Db)?;
    Ok(())
}

/// Transactional mode on MariaDB / MySQL, as [`handle_pg_tx`].
#[idempotent(key = "order.id", tx = "tx", scope = "crash", ttl = "1h")]
async fn handle_mysql_tx(
    order: &Order,
    ctx: &Ctx,
    mine: &AtomicU64,
    tx: &mut Transaction<'_, MySql>,
) -> Result<u64, WorkError> {
    let token = body_start(order, ctx, mine).await;
    sqlx::query("INSERT INTO crash_effects (order_id, token, pid) VALUES (?, ?, ?)")
        .bind(&order.id)
        .bind(token as i64)
        .bind(i64::from(ctx.pid))
        .execute(&mut **tx)
        .await
        .map_err(WorkError::Db)?;
    body_plan(order, ctx, token)?;
    ctx.history.event("E", &[&order.id, &token]);
    Ok(token)
}

/// Commits the transaction of execution `token`: `committed`, or `commit_failed`
/// written before the error is returned.
pub async fn commit<DB: sqlx::Database>(
    tx: Transaction<'_, DB>,
    order: &Order,
    ctx: &Ctx,
    token: u64,
) -> Result<(u64, &'static str), WorkError> {
    match tx.commit().await {
        Ok(()) => Ok((token, "committed")),
        Err(e) => {
            ctx.history
                .event("O", &[&order.id, &"commit_failed", &token]);
            Err(WorkError::Db(e))
        }
    }
}

enum Backend {
    Store,
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
    /// A stage of `pg-outbox`.
    Pipeline(crate::pipeline::Stage),
}

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("worker mode needs {name}"))
}

/// Runs a worker until its stdin closes (the driver stopped it or died) or it is killed.
pub fn main() {
    // the driver holds our stdin; when it goes away, so do we
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let mode: Mode = env("CRASH_MODE").parse().expect("mode");
    let dir = std::path::PathBuf::from(env("CRASH_DIR"));
    let pid = std::process::id();
    let ctx = Arc::new(Ctx {
        history: History::open(&dir.join(format!("history-{pid}.log"))),
        pid,
    });
    let backend = match mode {
        Mode::Redis | Mode::RedisFailover | Mode::RedisFailoverAck => {
            // a server URL, or in the failover modes a redis+sentinel:// URL
            let url = env("CRASH_REDIS_URL");
            // the server may be restarting, or failing over: retry the first connection
            let mut store = loop {
                match RedisStore::connect(url.as_str()).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            if mode == Mode::RedisFailoverAck {
                store = store.with_replica_ack(ReplicaAck::new(1, crate::REPLICA_ACK_TIMEOUT));
            }
            register_store("crash", store);
            Backend::Store
        }
        Mode::PgStore => {
            register_store("crash", PostgresStore::from_pool(crate::pg_pool(4).await));
            Backend::Store
        }
        Mode::PgTx => Backend::Pg(crate::pg_pool(CONCURRENCY as u32 + 1).await),
        Mode::MysqlTx => Backend::My(crate::mysql_pool(CONCURRENCY as u32 + 1).await),
        // a relay process runs its relay here and never returns
        Mode::PgOutbox => {
            Backend::Pipeline(crate::pipeline::Stage::start(&ctx, CONCURRENCY as u32 + 1).await)
        }
    };
    let backend = Arc::new(backend);
    let (_client, js) = crate::nats(&format!("crash-worker-{pid}")).await;
    let consumer: PullConsumer = js
        .get_stream(env("CRASH_STREAM"))
        .await
        .expect("the stream exists")
        .get_consumer(&env("CRASH_CONSUMER"))
        .await
        .expect("the consumer exists");
    ctx.history.event("W", &[&pid]);
    let messages = consumer
        .stream()
        .max_messages_per_batch(CONCURRENCY)
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("pull messages");
    messages
        .for_each_concurrent(CONCURRENCY, |m| {
            let (ctx, backend) = (ctx.clone(), backend.clone());
            async move {
                match m {
                    Ok(m) => deliver(m, ctx, backend).await,
                    Err(e) => eprintln!("pull error (retried): {e}"),
                }
            }
        })
        .await;
}

fn header(m: &jetstream::Message, name: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| panic!("message without {name}"))
}

async fn deliver(m: jetstream::Message, ctx: Arc<Ctx>, backend: Arc<Backend>) {
    let (seq, delivered) = {
        let info = m.info().expect("delivery info");
        (info.stream_sequence, info.delivered)
    };
    let plan = match header(&m, "Plan").as_str() {
        "fail" if delivered == 1 => Plan::Fail,
        "panic" if delivered == 1 => Plan::Panic,
        _ => Plan::Ok,
    };
    let order = Order {
        id: header(&m, "Order-Id"),
        plan,
        work: Duration::from_millis(header(&m, "Work-Ms").parse().expect("Work-Ms")),
        headers: m.headers.clone().unwrap_or_default(),
    };
    let id = order.id.clone();
    let mine = Arc::new(AtomicU64::new(0));
    // the handler runs on its own task so a panic is caught as a JoinError
    let task = {
        let (ctx, mine) = (ctx.clone(), mine.clone());
        tokio::spawn(async move {
            match &*backend {
                Backend::Store => {
                    // executed, or the completion not taken (unrecorded, lease_lost)
                    let (r, outcome) = observe(handle_in_store(&order, &ctx, &mine)).await;
                    r.map(|t| (t, outcome.map_or("executed", Outcome::as_str)))
                }
                Backend::Pg(pool) => {
                    let mut tx = pool.begin().await.map_err(WorkError::Db)?;
                    let t = handle_pg_tx(&order, &ctx, &mine, &mut tx).await?;
                    commit(tx, &order, &ctx, t).await
                }
                Backend::My(pool) => {
                    let mut tx = pool.begin().await.map_err(WorkError::Db)?;
                    let t = handle_mysql_tx(&order, &ctx, &mine, &mut tx).await?;
                    commit(tx, &order, &ctx, t).await
                }
                Backend::Pipeline(stage) => stage.handle(&order, &ctx, &mine).await,
            }
        })
    };
    let mine = || mine.load(Ordering::SeqCst);
    let nak = match task.await {
        Ok(Ok((token, done))) => {
            let outcome = if token == mine() { done } else { "replayed" };
            ctx.history.event("O", &[&id, &outcome, &token]);
            None
        }
        Ok(Err(WorkError::Planned)) => {
            ctx.history.event("O", &[&id, &"failed", &mine()]);
            Some(NAK_DELAY)
        }
        Ok(Err(WorkError::Idempotency(Error::InProgress { retry_after }))) => {
            ctx.history.event("O", &[&id, &"in_progress", &0]);
            Some(retry_after.min(IN_PROGRESS_DELAY))
        }
        Ok(Err(WorkError::Idempotency(Error::Store(e)))) => {
            ctx.history.event("O", &[&id, &"store_error", &mine()]);
            eprintln!("{id}: store error: {e}");
            Some(NAK_DELAY)
        }
        Ok(Err(WorkError::Db(e))) => {
            ctx.history.event("O", &[&id, &"error", &mine()]);
            eprintln!("{id}: database error: {e}");
            Some(NAK_DELAY)
        }
        Ok(Err(e)) => {
            ctx.history.event("O", &[&id, &"error", &mine()]);
            eprintln!("{id}: {e:?}");
            Some(NAK_DELAY)
        }
        Err(join) => {
            assert!(join.is_panic(), "handler task cancelled");
            ctx.history.event("O", &[&id, &"panicked", &mine()]);
            Some(NAK_DELAY)
        }
    };
    match nak {
        None => match m.double_ack().await {
            Ok(()) => ctx.history.event("A", &[&id, &seq]),
            Err(e) => eprintln!("{id}: ack not confirmed: {e}"),
        },
        Some(delay) => {
            if m.ack_with(AckKind::Nak(Some(delay))).await.is_ok() {
                ctx.history.event("N", &[&id, &seq]);
            }
        }
    }
}
