//! An idempotent RabbitMQ consumer, with deduplication records in Redis.
//!
//! - a work queue whose rejected messages go to a dead-letter exchange
//!   (`amqp::dead_letter_arguments`), and a publisher with confirms that sets
//!   `message_id` to the order id;
//! - two consumers on the queue, each on its own channel with a prefetch;
//! - an `#[idempotent]` handler keyed with `amqp::dedup_key` (a business header, else
//!   `message_id`), which catches what `redelivered` cannot say: whether the work of a
//!   redelivered message was done, and a publisher's resend;
//! - outcomes mapped through `Disposition` by `amqp::settle`: `Ok` → `basic.ack`, in
//!   progress elsewhere or a failure → `basic.nack` with requeue after the retry delay,
//!   attempts exhausted or no key → `basic.reject` into the dead-letter exchange.
//!
//! The program publishes 100 orders (10 twice, one without a `message_id`), lets a
//! consumer do the work of 20 messages and close its channel without acking (RabbitMQ
//! redelivers them), runs two consumers, and checks that every order was charged exactly
//! once. It needs RabbitMQ and Redis:
//!
//! ```sh
//! cargo run -p idempotent-examples --example amqp_consumer --features amqp
//! ```
//!
//! `IDEMPOTENT_AMQP_URL` and `IDEMPOTENT_REDIS_URL` override
//! `amqp://guest:guest@127.0.0.1:5672/%2f` and `redis://127.0.0.1:6379`.

mod support;

use futures_util::StreamExt;
use idempotent_runtime::amqp::lapin::message::Delivery;
use idempotent_runtime::amqp::lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use idempotent_runtime::amqp::lapin::types::FieldTable;
use idempotent_runtime::amqp::lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
};
use idempotent_runtime::amqp::{self, Settled};
use idempotent_runtime::redis::{self, AsyncCommands, aio::ConnectionManager};
use idempotent_runtime::{
    AsIdempotencyError, Error, RedisStore, RetryPolicy, idempotent, register_store,
};
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ORDERS: u64 = 100;
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
    key = "amqp::dedup_key(delivery, \"Order-Id\")",
    store = "redis",
    scope = "billing.on_order_paid",
    ttl = "7d",
    lease = "30s",
    max_attempts = 3
)]
async fn on_order_paid(delivery: &Delivery, ledger: &Ledger) -> Result<Receipt, AppError> {
    let order_id = amqp::message_id(delivery).unwrap_or_default();
    let amount: u64 = std::str::from_utf8(&delivery.data)
        .ok()
        .and_then(|s| s.parse().ok())
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
    redelivered: AtomicU64,
    acked: AtomicU64,
    requeued: AtomicU64,
    rejected: AtomicU64,
}

/// One consumer: its own channel, a prefetch of 16, each delivery on its own task.
async fn consume(
    conn: Arc<Connection>,
    name: &'static str,
    queue: String,
    ledger: Ledger,
    stats: Arc<Stats>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = conn.create_channel().await?;
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            name.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let (ledger, stats) = (ledger.clone(), stats.clone());
        tokio::spawn(async move {
            stats.deliveries.fetch_add(1, Ordering::Relaxed);
            if delivery.redelivered {
                stats.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            let result = on_order_paid(&delivery, &ledger).await;
            if let Err(AppError::Ledger(e)) = &result {
                eprintln!("the ledger failed, the message is requeued: {e}");
            }
            let disposition = RETRY.disposition(&result, amqp::delivery_count(&delivery));
            match amqp::settle(&delivery, disposition).await {
                Ok(Settled::Acked) => stats.acked.fetch_add(1, Ordering::Relaxed),
                Ok(Settled::Requeued) => stats.requeued.fetch_add(1, Ordering::Relaxed),
                Ok(Settled::Rejected) => stats.rejected.fetch_add(1, Ordering::Relaxed),
                // the channel closed: RabbitMQ redelivers, the handler replays
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("could not settle a delivery (it is redelivered): {e}");
                    0
                }
            };
        });
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(example().await)
}

async fn example() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let redis_url =
        std::env::var("IDEMPOTENT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let amqp_url = std::env::var("IDEMPOTENT_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let store = support::Server::redis(&redis_url)
        .reach(RedisStore::connect(&redis_url))
        .await?;
    register_store("redis", store);
    let mut redis = ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
    let conn = support::Server {
        name: "RabbitMQ",
        addr: &amqp_url,
        start: "start one there (`rabbitmq-server`) or set IDEMPOTENT_AMQP_URL",
    }
    .reach(Connection::connect(
        &amqp_url,
        ConnectionProperties::default(),
    ))
    .await?;
    let conn = Arc::new(conn);

    // names unique to this run (the dedup records outlive it)
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let queue = format!("example.orders.{run}");
    let dead = format!("example.orders.{run}.dead");
    let admin = conn.create_channel().await?;
    admin
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    admin
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    admin
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            amqp::dead_letter_arguments(&dead, None),
        )
        .await?;

    admin
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for i in 0..ORDERS {
        let props = BasicProperties::default().with_message_id(format!("order-{run}-{i}").into());
        // every tenth order is published twice: a retry after a lost publisher confirm
        let copies = if i % 10 == 5 { 2 } else { 1 };
        for _ in 0..copies {
            admin
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    (100 + i).to_string().as_bytes(),
                    props.clone(),
                )
                .await?
                .await?;
        }
    }
    admin
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"1",
            BasicProperties::default(), // no message_id: dead-lettered
        )
        .await?
        .await?;

    let ledger = Ledger {
        redis: redis.clone(),
        counts: format!("example:amqp:{run}:counts"),
    };
    // a consumer that does the work of 20 messages and goes away without acking
    {
        let channel = conn.create_channel().await?;
        channel.basic_qos(20, BasicQosOptions::default()).await?;
        let mut taken = channel
            .basic_consume(
                queue.as_str().into(),
                "billing-0".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for _ in 0..20 {
            if let Some(delivery) = taken.next().await {
                let _ = on_order_paid(&delivery?, &ledger).await;
            }
        }
        channel.close(200, "gone".into()).await?;
    }

    let stats = Arc::new(Stats::default());
    let consumers: Vec<_> = ["billing-1", "billing-2"]
        .into_iter()
        .map(|name| {
            tokio::spawn(consume(
                conn.clone(),
                name,
                queue.clone(),
                ledger.clone(),
                stats.clone(),
            ))
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let charged: u64 = redis.hlen(&ledger.counts).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let dead_letters = admin
            .queue_declare(dead.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        if charged == ORDERS && dead_letters == 1 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("not done after 60 s: {charged}/{ORDERS} charged");
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for c in consumers {
        c.abort();
    }
    let counts: Vec<(String, u64)> = redis.hgetall(&ledger.counts).await?;
    let twice = counts.iter().filter(|(_, n)| *n != 1).count();
    println!(
        "{} deliveries after the first consumer left ({} redelivered): {} acked, {} requeued, \
         {} rejected to the dead-letter exchange; {} orders charged, {twice} more than once",
        stats.deliveries.load(Ordering::Relaxed),
        stats.redelivered.load(Ordering::Relaxed),
        stats.acked.load(Ordering::Relaxed),
        stats.requeued.load(Ordering::Relaxed),
        stats.rejected.load(Ordering::Relaxed),
        counts.len(),
    );
    let _: () = redis.del(&ledger.counts).await?;
    admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    admin
        .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
        .await?;
    admin
        .exchange_delete(dead.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(if twice == 0 && counts.len() as u64 == ORDERS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
