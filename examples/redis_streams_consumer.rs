//! An idempotent Redis Streams consumer group, with deduplication records in the same
//! Redis.
//!
//! - producers `XADD` orders with a business field, `order_id`;
//! - consumers of one group read with `redis_streams::StreamGroup`: entries abandoned by
//!   a dead consumer (pending longer than the claim threshold) are taken over with
//!   `XAUTOCLAIM` before new ones are read;
//! - an `#[idempotent]` handler keyed by `order_id`, which catches what the group cannot:
//!   an abandoned entry whose work was done, and a producer's resend (a new entry id);
//! - outcomes mapped through `Disposition`: `Ok` → `XACK`, in progress elsewhere or a
//!   failure → left pending and claimed again after the retry delay, attempts exhausted
//!   or no key → the dead-letter stream.
//!
//! The program adds 100 orders (10 resent, one without an `order_id`), lets a consumer
//! do the work of 20 entries and die before `XACK`, runs two consumers, and checks that
//! every order was charged exactly once. It needs Redis:
//!
//! ```sh
//! cargo run -p idempotent-examples --example redis_streams_consumer --features redis-streams
//! ```
//!
//! `IDEMPOTENT_REDIS_URL` overrides `redis://127.0.0.1:6379`.

mod support;

use idempotent_runtime::redis::{self, AsyncCommands, aio::ConnectionManager};
use idempotent_runtime::redis_streams::{Entry, Settled, StreamGroup, dedup_key};
use idempotent_runtime::{
    AsIdempotencyError, Error, RedisStore, RetryPolicy, idempotent, register_store,
};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ORDERS: u64 = 100;
/// An entry pending this long is presumed abandoned; keep it well above handler time.
const CLAIM_IDLE: Duration = Duration::from_secs(2);
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(30),
    in_progress_max: Duration::from_millis(500),
};

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    charged_cents: u64,
}

#[derive(Debug)]
enum AppError {
    Idempotency(Error),
    Ledger(redis::RedisError),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

impl AsIdempotencyError for AppError {
    fn idempotency_error(&self) -> Option<&Error> {
        match self {
            AppError::Idempotency(e) => Some(e),
            AppError::Ledger(_) => None,
        }
    }
}

#[derive(Clone)]
struct Ledger {
    redis: ConnectionManager,
    counts: String,
}

/// Business code only: a non-idempotent increment, made once per order by the attribute.
#[idempotent(
    key = "dedup_key(entry, \"order_id\")",
    store = "redis",
    scope = "billing.on_order_paid",
    ttl = "7d",
    lease = "30s",
    max_attempts = 3
)]
async fn on_order_paid(entry: &Entry, ledger: &Ledger) -> Result<Receipt, AppError> {
    let order_id = dedup_key(entry, "order_id").unwrap_or_default();
    let amount: u64 = entry
        .field("amount")
        .and_then(|a| std::str::from_utf8(a).ok()?.parse().ok())
        .unwrap_or(0);
    let mut redis = ledger.redis.clone();
    let _: () = redis
        .hincr(&ledger.counts, order_id, 1)
        .await
        .map_err(AppError::Ledger)?;
    Ok(Receipt {
        charged_cents: amount,
    })
}

#[derive(Default)]
struct Stats {
    deliveries: AtomicU64,
    acked: AtomicU64,
    pending: AtomicU64,
    dead: AtomicU64,
}

/// One consumer of the group: claims abandoned entries, reads new ones, settles each.
/// Its blocking reads have a connection of their own.
async fn consume(
    group: StreamGroup,
    client: redis::Client,
    mut conn: ConnectionManager,
    ledger: Ledger,
    stats: Arc<Stats>,
) -> redis::RedisResult<()> {
    let mut reads = ConnectionManager::new(client).await?;
    loop {
        for entry in group.read(&mut reads).await? {
            stats.deliveries.fetch_add(1, Ordering::Relaxed);
            let result = on_order_paid(&entry, &ledger).await;
            if let Err(AppError::Ledger(e)) = &result {
                eprintln!("the ledger failed, entry {} stays pending: {e}", entry.id());
            }
            let settled = group
                .settle(
                    &mut conn,
                    &entry,
                    RETRY.disposition(&result, entry.deliveries()),
                )
                .await?;
            let counter = match settled {
                Settled::Acked => &stats.acked,
                Settled::DeadLettered => &stats.dead,
                _ => &stats.pending,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(example().await)
}

async fn example() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let url =
        std::env::var("IDEMPOTENT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = support::Server::redis(&url)
        .reach(RedisStore::connect(&url))
        .await?;
    register_store("redis", store);
    let client = redis::Client::open(url.as_str())?;
    let mut conn = ConnectionManager::new(client.clone()).await?;

    // a stream and business ids unique to this run (the records outlive it)
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let stream = format!("example:orders:{run}");
    let group = |consumer: &str| {
        StreamGroup::new(stream.as_str(), "billing", consumer).claim_idle(CLAIM_IDLE)
    };
    let dying = group("billing-0").batch(20);
    dying.create(&mut conn).await?;
    let dead_stream = dying.dead_letter().to_owned();

    for i in 0..ORDERS {
        let (order, amount) = (format!("order-{run}-{i}"), (100 + i).to_string());
        let fields = [("order_id", order.as_str()), ("amount", amount.as_str())];
        let _: String = conn.xadd(&stream, "*", &fields).await?;
        if i % 10 == 5 {
            // a resend: the producer did not see its XADD reply and adds the order again
            let _: String = conn.xadd(&stream, "*", &fields).await?;
        }
    }
    let _: String = conn.xadd(&stream, "*", &[("amount", "1")]).await?; // no order_id

    let ledger = Ledger {
        redis: conn.clone(),
        counts: format!("example:orders:{run}:counts"),
    };
    // a consumer that does the work of 20 entries and dies before XACK
    for entry in dying.read(&mut conn).await? {
        let _ = on_order_paid(&entry, &ledger).await;
    }
    drop(dying);

    let stats = Arc::new(Stats::default());
    let consumers: Vec<_> = ["billing-1", "billing-2"]
        .into_iter()
        .map(|name| {
            tokio::spawn(consume(
                group(name),
                client.clone(),
                conn.clone(),
                ledger.clone(),
                stats.clone(),
            ))
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let charged: u64 = conn.hlen(&ledger.counts).await?;
        let pending: redis::streams::StreamPendingReply = conn.xpending(&stream, "billing").await?;
        let dead: u64 = conn.xlen(&dead_stream).await?;
        if charged == ORDERS && pending.count() == 0 && dead == 1 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "not done after 60 s: {charged}/{ORDERS} charged, {} pending",
                pending.count()
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for c in consumers {
        c.abort();
    }
    let counts: Vec<(String, u64)> = conn.hgetall(&ledger.counts).await?;
    let twice = counts.iter().filter(|(_, n)| *n != 1).count();
    println!(
        "{} deliveries after the first consumer died: {} acked, {} left pending for a retry, \
         {} dead-lettered; {} orders charged, {twice} more than once",
        stats.deliveries.load(Ordering::Relaxed),
        stats.acked.load(Ordering::Relaxed),
        stats.pending.load(Ordering::Relaxed),
        stats.dead.load(Ordering::Relaxed),
        counts.len(),
    );
    let _: () = conn.del(&[&stream, &dead_stream, &ledger.counts]).await?;
    Ok(if twice == 0 && counts.len() as u64 == ORDERS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
