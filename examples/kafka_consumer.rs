//! An idempotent Kafka consumer group, with deduplication records in Redis.
//!
//! - producers set a business header, `order-id`, on every record (the record key is the
//!   partitioning key);
//! - consumers of one group, with `enable.auto.commit = false`, receive batches with
//!   `kafka::recv_batch` and run them through `Idempotency::run_batch`: one round trip to
//!   Redis claims the whole batch, keyed with `kafka::dedup_key`;
//! - `kafka::settle` maps each record's `Disposition`: `Ok` → its offset is committed, a
//!   failure or in progress elsewhere → the partition seeks back to it (retried after the
//!   delay; the records after it replay), attempts exhausted or no key → the dead-letter
//!   topic, then committed past.
//!
//! The program produces 100 orders (10 twice, one without a key), lets a consumer do the
//! work of a batch and die before committing, runs two consumers, and checks that every
//! order was charged exactly once. It needs Redis, and a Kafka cluster named by
//! `IDEMPOTENT_KAFKA_BROKERS` (`host:port,…`); without it, it starts librdkafka's
//! in-process mock cluster:
//!
//! ```sh
//! cargo run -p idempotent-examples --example kafka_consumer --features kafka
//! ```
//!
//! `IDEMPOTENT_REDIS_URL` overrides `redis://127.0.0.1:6379`.

mod support;

use idempotent_runtime::kafka::rdkafka::Message;
use idempotent_runtime::kafka::rdkafka::config::ClientConfig;
use idempotent_runtime::kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use idempotent_runtime::kafka::rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use idempotent_runtime::kafka::rdkafka::mocking::MockCluster;
use idempotent_runtime::kafka::rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use idempotent_runtime::kafka::{self, DeadLetter, SettleError};
use idempotent_runtime::redis::{self, AsyncCommands, aio::ConnectionManager};
use idempotent_runtime::{
    AsIdempotencyError, Error, Idempotency, RedisStore, RetryPolicy, register_store,
};
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

/// Business code only: a non-idempotent increment, made once per order.
async fn on_order_paid(m: &BorrowedMessage<'_>, ledger: &Ledger) -> Result<u64, AppError> {
    let order_id = kafka::header(m, "order-id").unwrap_or_default();
    let amount: u64 = m
        .payload()
        .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
        .unwrap_or(0);
    let mut redis = ledger.redis.clone();
    let _: () = redis
        .hincr(&ledger.counts, order_id, 1)
        .await
        .map_err(AppError::Ledger)?;
    Ok(amount)
}

fn billing() -> Idempotency {
    Idempotency::new("billing.on_order_paid")
        .store_named("redis")
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .lease(Duration::from_secs(30))
        .max_attempts(3)
}

#[derive(Default)]
struct Stats {
    deliveries: AtomicU64,
    acked: AtomicU64,
    redelivered: AtomicU64,
    dead: AtomicU64,
}

struct Cluster {
    brokers: String,
    topic: String,
    dead_topic: String,
    group: String,
}

fn consumer(c: &Cluster) -> Result<StreamConsumer, Box<dyn std::error::Error>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.brokers)
        .set("group.id", &c.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // a consumer that dies without leaving the group gives up its partitions after this
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()?;
    consumer.subscribe(&[&c.topic])?;
    Ok(consumer)
}

/// One consumer of the group: batches through the store, then commit / seek / dead-letter.
async fn consume(
    consumer: StreamConsumer,
    producer: FutureProducer,
    dead_topic: String,
    ledger: Ledger,
    stats: Arc<Stats>,
) {
    let billing = billing();
    loop {
        let batch = match kafka::recv_batch(&consumer, 64, Duration::from_millis(50)).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("receive failed, retrying: {e}");
                continue;
            }
        };
        stats
            .deliveries
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let results = billing
            .run_batch(
                &batch,
                |m| kafka::dedup_key(m, "order-id"),
                |m| on_order_paid(m, &ledger),
            )
            .await;
        for r in &results {
            if let Err(AppError::Ledger(e)) = r {
                eprintln!("the ledger failed, the record is retried: {e}");
            }
        }
        let dispositions: Vec<_> = results.iter().map(|r| RETRY.disposition(r, 1)).collect();
        let dead_letter = DeadLetter {
            producer: &producer,
            topic: &dead_topic,
        };
        match kafka::settle(&consumer, &batch, &dispositions, Some(dead_letter)).await {
            Ok(s) => {
                stats.acked.fetch_add(s.acked as u64, Ordering::Relaxed);
                stats
                    .redelivered
                    .fetch_add(s.redelivered as u64, Ordering::Relaxed);
                stats
                    .dead
                    .fetch_add(s.dead_lettered as u64, Ordering::Relaxed);
                if let Some(wait) = s.retry_after {
                    tokio::time::sleep(wait).await;
                }
            }
            // the partition may still be ours: read it again from its last commit, or a
            // later batch's commit would cover the retried record unseen
            Err(SettleError::Seek(e)) => {
                eprintln!("seeking back failed, joining the group again: {e}");
                if let Err(e) = kafka::rejoin(&consumer) {
                    eprintln!("joining the group again failed: {e}");
                }
            }
            // nothing is lost: uncommitted records come again and replay
            Err(e) => eprintln!("settling a batch failed: {e}"),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(example().await)
}

async fn example() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let redis_url =
        std::env::var("IDEMPOTENT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = support::Server::redis(&redis_url)
        .reach(RedisStore::connect(&redis_url))
        .await?;
    register_store("redis", store);
    let mut redis = ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;

    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let (topic, dead_topic) = (format!("orders-{run}"), format!("orders-dead-{run}"));
    let mock;
    let brokers = match std::env::var("IDEMPOTENT_KAFKA_BROKERS") {
        Ok(b) => b,
        Err(_) => {
            println!("IDEMPOTENT_KAFKA_BROKERS is not set: using librdkafka's mock cluster");
            mock = MockCluster::new(1)?;
            mock.create_topic(&topic, 4, 1)?;
            mock.create_topic(&dead_topic, 1, 1)?;
            mock.bootstrap_servers()
        }
    };
    let cluster = Cluster {
        brokers,
        topic,
        dead_topic,
        group: format!("billing-{run}"),
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.brokers)
        .create()?;
    support::Server {
        name: "Kafka",
        addr: &cluster.brokers,
        start: "start a broker there, or unset IDEMPOTENT_KAFKA_BROKERS to use librdkafka's \
                mock cluster",
    }
    .reach(async {
        // librdkafka waits up to the timeout for a broker to answer
        tokio::task::block_in_place(|| {
            let timeout = support::CONNECT_TIMEOUT;
            producer.client().fetch_metadata(None, timeout).map(drop)
        })
    })
    .await?;
    for i in 0..ORDERS {
        let order = format!("order-{run}-{i}");
        // every tenth order is produced twice: an application retry, a new record
        let (copies, amount) = (if i % 10 == 5 { 2 } else { 1 }, (100 + i).to_string());
        for _ in 0..copies {
            let headers = OwnedHeaders::new().insert(Header {
                key: "order-id",
                value: Some(&order),
            });
            let record = FutureRecord::to(&cluster.topic)
                .key(&order)
                .payload(&amount)
                .headers(headers);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    let no_key: FutureRecord<'_, str, str> = FutureRecord::to(&cluster.topic).payload("1");
    producer
        .send(no_key, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;

    let ledger = Ledger {
        redis: redis.clone(),
        counts: format!("example:kafka:{run}:counts"),
    };
    // a consumer that does the work of a batch and dies before committing
    {
        let dying = consumer(&cluster)?;
        let batch = kafka::recv_batch(&dying, 20, Duration::from_millis(500)).await?;
        let _ = billing()
            .run_batch(
                &batch,
                |m| kafka::dedup_key(m, "order-id"),
                |m| on_order_paid(m, &ledger),
            )
            .await;
    }

    let stats = Arc::new(Stats::default());
    let mut consumers = Vec::new();
    for _ in 0..2 {
        consumers.push(tokio::spawn(consume(
            consumer(&cluster)?,
            producer.clone(),
            cluster.dead_topic.clone(),
            ledger.clone(),
            stats.clone(),
        )));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let charged: u64 = redis.hlen(&ledger.counts).await?;
        if charged == ORDERS && stats.dead.load(Ordering::Relaxed) == 1 {
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
        "{} deliveries after the first consumer died: {} committed, {} left for redelivery, \
         {} dead-lettered; {} orders charged, {twice} more than once",
        stats.deliveries.load(Ordering::Relaxed),
        stats.acked.load(Ordering::Relaxed),
        stats.redelivered.load(Ordering::Relaxed),
        stats.dead.load(Ordering::Relaxed),
        counts.len(),
    );
    let _: () = redis.del(&ledger.counts).await?;
    Ok(if twice == 0 && counts.len() as u64 == ORDERS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
