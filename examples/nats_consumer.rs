//! An idempotent NATS JetStream consumer, with deduplication records in Redis.
//!
//! - a stream with a duplicate window, and producers that set `Nats-Msg-Id`, so JetStream
//!   drops publish retries by itself;
//! - a durable pull consumer with explicit acks and a short `ack_wait`, shared by two
//!   clients (run as many processes as you like: the records are in Redis);
//! - an `#[idempotent]` handler keyed by the business id (`Order-Id` header), which
//!   catches what JetStream cannot: redeliveries after a lost ack, application resends
//!   with a new `Nats-Msg-Id`, anything outside the duplicate window;
//! - outcomes mapped to acks: `Ok` → ack, in progress elsewhere → nak with a short delay,
//!   retryable errors → nak with backoff, everything else (attempts exhausted, no key)
//!   → publish to a dead-letter stream, then term;
//! - `AckKind::Progress` sent while a long handler runs, so a slow handler does not get
//!   its message redelivered to another client mid-work.
//!
//! The program publishes 100 orders (with publish retries, resends, a few lost acks and
//! one invalid order), consumes them, and checks in Redis that every order was charged
//! exactly once. It needs NATS with JetStream (`nats-server -js`) and Redis:
//!
//! ```sh
//! cargo run -p idempotent-examples --example nats_consumer --features nats
//! ```
//!
//! `IDEMPOTENT_NATS_URL` and `IDEMPOTENT_REDIS_URL` override `nats://127.0.0.1:4222` and
//! `redis://127.0.0.1:6379`.

mod support;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
    message::PublishMessage,
    stream,
};
use futures_util::StreamExt;
use idempotent_runtime::redis::{self, AsyncCommands, aio::ConnectionManager};
use idempotent_runtime::{
    AsIdempotencyError, Disposition, Error, RedisStore, RetryPolicy, idempotent, register_store,
};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STREAM: &str = "EXAMPLE_ORDERS";
const SUBJECT: &str = "example.orders.paid";
const DEAD_STREAM: &str = "EXAMPLE_ORDERS_DEAD";
const DEAD_SUBJECT: &str = "example.orders.dead";
const DURABLE: &str = "billing";
/// Short, so lost acks are redelivered quickly; long handlers send progress acks.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// A duplicate held by another consumer is retried after at most this long.
const IN_PROGRESS_RETRY: Duration = Duration::from_secs(1);
const ORDERS: u64 = 100;

/// The business message.
struct OrderPaid {
    order_id: String,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    charged_cents: u64,
}

#[derive(Debug)]
enum AppError {
    /// The dedup layer said no (in progress elsewhere, attempts exhausted, store down…).
    Idempotency(Error),
    /// The ledger (Redis) failed; a redelivery retries.
    Ledger(redis::RedisError),
    /// The order is invalid; retried until `max_attempts`, then dead-lettered.
    Invalid,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

/// The effect that must happen once per order: a non-idempotent increment.
#[derive(Clone)]
struct Ledger {
    redis: ConnectionManager,
    charges: String,
    counts: String,
}

/// Business code only: the attribute claims the order id in Redis before the body runs,
/// records the receipt when it succeeds, and answers duplicates with it.
#[idempotent(
    key = "order.order_id",
    store = "redis",
    scope = "billing.on_order_paid",
    ttl = "7d",
    lease = "30s",
    max_attempts = 3
)]
async fn on_order_paid(order: &OrderPaid, ledger: &Ledger) -> Result<Receipt, AppError> {
    if order.amount_cents == 0 {
        return Err(AppError::Invalid);
    }
    let mut redis = ledger.redis.clone();
    let _: () = redis::pipe()
        .hincr(&ledger.charges, &order.order_id, order.amount_cents)
        .hincr(&ledger.counts, &order.order_id, 1)
        .query_async(&mut redis)
        .await
        .map_err(AppError::Ledger)?;
    Ok(Receipt {
        charged_cents: order.amount_cents,
    })
}

impl AsIdempotencyError for AppError {
    fn idempotency_error(&self) -> Option<&Error> {
        match self {
            AppError::Idempotency(e) => Some(e),
            AppError::Ledger(_) | AppError::Invalid => None,
        }
    }
}

/// The outcome → acknowledgement mapping: `Ok` (first run or replay) is done; in
/// progress elsewhere comes back within a second; store outages and business failures
/// back off 1 s, 2 s, 4 s … up to a minute (`max_attempts` bounds them); attempts
/// exhausted, no key or a fingerprint mismatch go to the dead-letter stream.
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
    in_progress_max: IN_PROGRESS_RETRY,
};

#[derive(Default)]
struct Stats {
    deliveries: AtomicU64,
    acked: AtomicU64,
    naked: AtomicU64,
    dead: AtomicU64,
    lost_acks: AtomicU64,
}

/// Handles one message: parse, run the handler while telling JetStream the work is
/// progressing, then ack / nak / dead-letter.
async fn handle(m: jetstream::Message, js: &jetstream::Context, ledger: &Ledger, stats: &Stats) {
    stats.deliveries.fetch_add(1, Ordering::Relaxed);
    let (seq, delivered) = match m.info() {
        Ok(info) => (info.stream_sequence, info.delivered),
        Err(_) => return,
    };
    let order = OrderPaid {
        order_id: m
            .headers
            .as_ref()
            .and_then(|h| h.get("Order-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default(), // empty: Error::MissingKey, dead-lettered
        amount_cents: std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    };

    // keep the message ours while the handler runs longer than ack_wait
    let work = on_order_paid(&order, ledger);
    tokio::pin!(work);
    let mut progress =
        tokio::time::interval_at(tokio::time::Instant::now() + ACK_WAIT / 2, ACK_WAIT / 2);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = progress.tick() => { let _ = m.ack_with(AckKind::Progress).await; }
        }
    };

    // simulation: every tenth order loses its first ack (the work is done, the server
    // never hears it); JetStream redelivers it after ack_wait and the handler replays
    if delivered == 1 && result.is_ok() && seq % 10 == 3 {
        stats.lost_acks.fetch_add(1, Ordering::Relaxed);
        return;
    }

    let delivery = u32::try_from(delivered).unwrap_or(u32::MAX);
    let sent = match RETRY.disposition(&result, delivery) {
        Disposition::Ack => {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            m.double_ack().await
        }
        Disposition::Retry { after: delay } => {
            stats.naked.fetch_add(1, Ordering::Relaxed);
            if let Err(AppError::Ledger(e)) = &result {
                eprintln!("message {seq}: the ledger failed, retrying in {delay:?}: {e}");
            }
            m.ack_with(AckKind::Nak(Some(delay))).await
        }
        Disposition::DeadLetter => {
            stats.dead.fetch_add(1, Ordering::Relaxed);
            let reason = match &result {
                Err(AppError::Idempotency(e)) => e.to_string(),
                _ => String::new(),
            };
            // the dead letter's own Nats-Msg-Id makes a repeat of this step harmless
            let mut dead = PublishMessage::build()
                .payload(m.payload.clone())
                .message_id(format!("dead-{STREAM}-{seq}"))
                .header("Failed-Reason", reason);
            if let Some(h) = &m.headers {
                for (name, values) in h.iter() {
                    for v in values {
                        dead = dead.header(name.clone(), v.clone());
                    }
                }
            }
            match js.send_publish(DEAD_SUBJECT, dead).await {
                Ok(ack) => match ack.await {
                    // stored: stop redelivering the original
                    Ok(_) => m.ack_with(AckKind::Term).await,
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e.into()),
            }
        }
    };
    if let Err(e) = sent {
        // the message is redelivered after ack_wait; the handler replays it
        eprintln!("could not acknowledge message {seq}: {e}");
    }
}

/// One client of the durable consumer, handling messages concurrently.
async fn consume(name: &str, ledger: Ledger, stats: Arc<Stats>) -> Result<(), async_nats::Error> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connect(nats_url())
        .await?;
    let js = jetstream::new(client);
    let consumer: PullConsumer = js.get_stream(STREAM).await?.get_consumer(DURABLE).await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(32)
        .messages()
        .await?;
    while let Some(m) = messages.next().await {
        match m {
            Ok(m) => {
                let (js, ledger, stats) = (js.clone(), ledger.clone(), stats.clone());
                tokio::spawn(async move { handle(m, &js, &ledger, &stats).await });
            }
            Err(e) => eprintln!("{name}: pull failed, retrying: {e}"),
        }
    }
    Ok(())
}

async fn publish(
    js: &jetstream::Context,
    msg_id: &str,
    order_id: &str,
    amount: u64,
) -> Result<bool, async_nats::Error> {
    let ack = js
        .send_publish(
            SUBJECT,
            PublishMessage::build()
                .payload(amount.to_string().into())
                .message_id(msg_id)
                .header("Order-Id", order_id),
        )
        .await?
        .await?;
    Ok(ack.duplicate)
}

fn nats_url() -> String {
    std::env::var("IDEMPOTENT_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(example().await)
}

async fn example() -> Result<ExitCode, async_nats::Error> {
    let redis_url =
        std::env::var("IDEMPOTENT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = support::Server::redis(&redis_url)
        .reach(RedisStore::connect(&redis_url))
        .await?;
    register_store("redis", store);

    let url = nats_url();
    let client = support::Server {
        name: "NATS",
        addr: &url,
        start: "start one there with JetStream (`nats-server -js`) or set IDEMPOTENT_NATS_URL",
    }
    .reach(async_nats::connect(&url))
    .await?;
    let js = jetstream::new(client);
    // a fresh stream per run, so the example can run again
    for s in [STREAM, DEAD_STREAM] {
        let _ = js.delete_stream(s).await;
    }
    let orders = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let mut dead = js
        .create_stream(stream::Config {
            name: DEAD_STREAM.into(),
            subjects: vec![DEAD_SUBJECT.into()],
            ..Default::default()
        })
        .await?;
    let consumer: PullConsumer = orders
        .create_consumer(pull::Config {
            durable_name: Some(DURABLE.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await?;

    // business ids unique to this run (the Redis records outlive it)
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let redis = ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
    let ledger = Ledger {
        redis: redis.clone(),
        charges: format!("example:nats:{run}:charges"),
        counts: format!("example:nats:{run}:counts"),
    };
    let stats = Arc::new(Stats::default());
    let clients: Vec<_> = ["billing-1", "billing-2"]
        .into_iter()
        .map(|name| tokio::spawn(consume(name, ledger.clone(), stats.clone())))
        .collect();

    let (mut dropped, mut resent) = (0, 0);
    for i in 0..ORDERS {
        let order_id = format!("order-{run}-{i}");
        let msg_id = format!("{run}-{i}");
        publish(&js, &msg_id, &order_id, 100 + i).await?;
        if i.is_multiple_of(10) && publish(&js, &msg_id, &order_id, 100 + i).await? {
            dropped += 1; // a publish retry inside the window: JetStream drops it
        }
        if i % 10 == 5 {
            // an application resend: a new Nats-Msg-Id, the same order
            publish(&js, &format!("{msg_id}-resend"), &order_id, 100 + i).await?;
            resent += 1;
        }
    }
    publish(
        &js,
        &format!("{run}-invalid"),
        &format!("order-{run}-invalid"),
        0,
    )
    .await?;

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut consumer = consumer;
    let mut conn = redis.clone();
    loop {
        let counted: u64 = conn.hlen(&ledger.counts).await?;
        let info = consumer.info().await?;
        let (pending, unacked) = (info.num_pending, info.num_ack_pending);
        let dead_letters = dead.info().await?.state.messages;
        if counted == ORDERS && pending == 0 && unacked == 0 && dead_letters == 1 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "not done after 120 s: {counted}/{ORDERS} charged, {pending} pending, {unacked} unacknowledged"
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for c in clients {
        c.abort();
    }

    let counts: Vec<(String, u64)> = conn.hgetall(&ledger.counts).await?;
    let twice: Vec<_> = counts.iter().filter(|(_, n)| *n != 1).collect();
    println!(
        "published {ORDERS} orders + 1 invalid; JetStream dropped {dropped} publish retries; \
         {resent} resends with new ids were stored"
    );
    println!(
        "{} deliveries: {} acked, {} nak'ed, {} dead-lettered, {} acks lost on purpose",
        stats.deliveries.load(Ordering::Relaxed),
        stats.acked.load(Ordering::Relaxed),
        stats.naked.load(Ordering::Relaxed),
        stats.dead.load(Ordering::Relaxed),
        stats.lost_acks.load(Ordering::Relaxed),
    );
    println!(
        "{} orders charged, {} charged more than once",
        counts.len(),
        twice.len()
    );
    let _: () = conn.del(&[&ledger.charges, &ledger.counts]).await?;
    for s in [STREAM, DEAD_STREAM] {
        js.delete_stream(s).await?;
    }
    Ok(if twice.is_empty() && counts.len() as u64 == ORDERS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
