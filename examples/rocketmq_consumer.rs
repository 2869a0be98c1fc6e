//! An idempotent Apache RocketMQ consumer (the Rust client, 1.0), with deduplication
//! records in Redis.
//!
//! - a producer that puts the business id in the message `KEYS`;
//! - a CLUSTERING push consumer whose synchronous listener runs an async
//!   `#[idempotent]` handler on the application's tokio runtime: a `Handle` captured at
//!   start-up, `block_on` on the client's worker thread (never a runtime per message);
//! - the dedup key from `idempotent_runtime::rocketmq::dedup_key`: the business key, else
//!   the `UNIQ_KEY`, never `MessageExt::msg_id()` (the offset id, which changes on retry);
//! - outcomes mapped to `ConsumeConcurrentlyStatus` by
//!   `idempotent_runtime::rocketmq::consume_status`: duplicates → success, in progress and
//!   retryable errors → reconsume later, attempts exhausted → the broker's `%DLQ%` topic.
//!
//! The program sends 50 orders (5 of them twice, as a producer's send retry), makes the
//! listener report failure after the work of 5 of them (a lost ack: the broker
//! redelivers), and checks in Redis that every order was charged exactly once. It needs
//! a RocketMQ name server with a broker that auto-creates topics, and Redis:
//!
//! ```sh
//! ROCKETMQ_NAMESRV_ADDR=127.0.0.1:9876 \
//!     cargo run -p idempotent-examples --example rocketmq_consumer --features rocketmq
//! ```
//!
//! `IDEMPOTENT_REDIS_URL` overrides `redis://127.0.0.1:6379`. Redeliveries after
//! `ReconsumeLater` follow the broker's delay levels (10 s for the first retry by default).

use idempotent_runtime::redis::{self, AsyncCommands, aio::ConnectionManager};
use idempotent_runtime::rocketmq::client::{
    ClientResult, ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext,
    ConsumeConcurrentlyStatus, DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer,
    MessageListenerConcurrently, TelemetryHandle,
};
use idempotent_runtime::rocketmq::model::common::consumer::consume_from_where::ConsumeFromWhere;
use idempotent_runtime::rocketmq::model::common::message::message_ext::MessageExt;
use idempotent_runtime::rocketmq::model::common::message::message_single::Message;
use idempotent_runtime::rocketmq::{
    AsIdempotencyError, OnExhausted, block_on_listener, consume_status,
};
use idempotent_runtime::{Error, RedisStore, idempotent, register_store};
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::RuntimeContext;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ORDERS: u64 = 50;

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
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

/// Lets `consume_status` tell the dedup outcomes from business failures.
impl AsIdempotencyError for AppError {
    fn idempotency_error(&self) -> Option<&Error> {
        match self {
            AppError::Idempotency(e) => Some(e),
            AppError::Ledger(_) => None,
        }
    }
}

/// The effect that must happen once per order: a non-idempotent increment.
#[derive(Clone)]
struct Ledger {
    redis: ConnectionManager,
    charges: String,
    counts: String,
}

/// Business code only: claims the order's business key in Redis before the body runs.
#[idempotent(
    key = "idempotent_runtime::rocketmq::dedup_key(msg)",
    store = "redis",
    scope = "billing.on_order_paid",
    ttl = "7d",
    lease = "30s",
    max_attempts = 5
)]
async fn on_order_paid(msg: &MessageExt, ledger: &Ledger) -> Result<Receipt, AppError> {
    let order_id = idempotent_runtime::rocketmq::business_key(msg).unwrap_or_default();
    let amount: u64 = msg
        .body()
        .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
        .unwrap_or(0);
    let mut redis = ledger.redis.clone();
    let _: () = redis::pipe()
        .hincr(&ledger.charges, order_id, amount)
        .hincr(&ledger.counts, order_id, 1)
        .query_async(&mut redis)
        .await
        .map_err(AppError::Ledger)?;
    Ok(Receipt {
        charged_cents: amount,
    })
}

#[derive(Default)]
struct Stats {
    deliveries: AtomicU64,
    reconsume_later: AtomicU64,
    lost_acks: AtomicU64,
}

struct Listener {
    /// the application's runtime, captured when the consumer is set up
    runtime: tokio::runtime::Handle,
    ledger: Ledger,
    stats: Arc<Stats>,
}

impl MessageListenerConcurrently for Listener {
    // called on a blocking worker thread of the client, one message at a time
    // (`consume_message_batch_max_size(1)`)
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut status = ConsumeConcurrentlyStatus::ConsumeSuccess;
        for msg in msgs {
            self.stats.deliveries.fetch_add(1, Ordering::Relaxed);
            let result = block_on_listener(&self.runtime, on_order_paid(msg, &self.ledger));
            let mut s = consume_status(&result, OnExhausted::BrokerDeadLetter);
            match &result {
                Ok(_) => {}
                Err(AppError::Idempotency(e)) => eprintln!("{}: {e} ({s:?})", msg.msg_id()),
                Err(AppError::Ledger(e)) => {
                    eprintln!("{}: ledger failed: {e} ({s:?})", msg.msg_id())
                }
            }
            // simulation: a few orders lose their first ack (the work is done, the
            // broker hears failure) and come back through the retry topic
            let lost = msg.reconsume_times() == 0
                && result.is_ok()
                && msg.body().is_some_and(|b| b.ends_with(b"3"));
            if lost {
                self.stats.lost_acks.fetch_add(1, Ordering::Relaxed);
                s = ConsumeConcurrentlyStatus::ReconsumeLater;
            }
            if s == ConsumeConcurrentlyStatus::ReconsumeLater {
                self.stats.reconsume_later.fetch_add(1, Ordering::Relaxed);
                status = s;
            }
        }
        Ok(status)
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let namesrv =
        std::env::var("ROCKETMQ_NAMESRV_ADDR").unwrap_or_else(|_| "127.0.0.1:9876".into());
    let redis_url =
        std::env::var("IDEMPOTENT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    register_store("redis", RedisStore::connect(redis_url.as_str()).await?);

    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let topic = format!("ExampleOrders{run}");
    let redis = ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
    let ledger = Ledger {
        redis: redis.clone(),
        charges: format!("example:rocketmq:{run}:charges"),
        counts: format!("example:rocketmq:{run}:counts"),
    };

    let context = RuntimeContext::from_current("idempotent-rocketmq-example");
    let client_runtime = |scope: &'static str| {
        ClientRuntime::try_new(
            context.service_context(scope),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
    };

    let mut producer = DefaultMQProducer::builder(client_runtime("producer")?)
        .producer_group(format!("example_producer_{run}"))
        .name_server_addr(namesrv.clone())
        .build();
    producer.start().await?;

    let mut sends = 0;
    let mut send = async |i: u64| -> Result<(), Box<dyn std::error::Error>> {
        let msg = Message::builder()
            .topic(topic.as_str())
            .tags("paid")
            .keys(vec![format!("order-{run}-{i}")]) // the business key
            .body_slice((100 + i).to_string().as_bytes())
            .build_unchecked();
        producer.send(msg).await?;
        sends += 1;
        Ok(())
    };
    for i in 0..ORDERS {
        send(i).await?;
        if i.is_multiple_of(10) {
            send(i).await?; // a send retry: a new message with the same business key
        }
    }

    let stats = Arc::new(Stats::default());
    let mut consumer = DefaultMQPushConsumer::builder(client_runtime("consumer")?)
        .consumer_group(format!("example_billing_{run}"))
        .name_server_addr(namesrv)
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        // a small, explicit listener pool (min must not exceed max)
        .consume_thread_min(1)
        .consume_thread_max(4)
        .consume_message_batch_max_size(1)
        .build();
    consumer.subscribe(&topic, "*").await?;
    consumer.register_message_listener_concurrently(Listener {
        runtime: tokio::runtime::Handle::current(),
        ledger: ledger.clone(),
        stats: stats.clone(),
    });
    consumer.start().await?;

    // consume until every order is charged and the lost acks were redelivered
    let mut conn = redis.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let charged: u64 = conn.hlen(&ledger.counts).await?;
        let lost = stats.lost_acks.load(Ordering::Relaxed);
        let expected = sends + lost;
        if charged == ORDERS && lost > 0 && stats.deliveries.load(Ordering::Relaxed) >= expected {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("not done after 180 s: {charged}/{ORDERS} charged");
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    consumer.shutdown().await;
    producer.shutdown().await;

    let counts: Vec<(String, u64)> = conn.hgetall(&ledger.counts).await?;
    let twice = counts.iter().filter(|(_, n)| *n != 1).count();
    println!(
        "sent {sends} messages for {ORDERS} orders; {} deliveries ({} reported ReconsumeLater, \
         {} of them after the work was done)",
        stats.deliveries.load(Ordering::Relaxed),
        stats.reconsume_later.load(Ordering::Relaxed),
        stats.lost_acks.load(Ordering::Relaxed),
    );
    println!(
        "{} orders charged, {twice} charged more than once",
        counts.len()
    );
    let _: () = conn.del(&[&ledger.charges, &ledger.counts]).await?;
    Ok(if twice == 0 && counts.len() as u64 == ORDERS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
