//! An idempotent Apache RocketMQ consumer (the Rust client, 1.0), with deduplication
//! records in Redis or, in transactional mode, in MySQL / MariaDB.
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
//! The effect that must happen once per order is a non-idempotent write: with
//! `--store redis` (the default) an increment of the order's charge in a Redis hash, with
//! `--store mysql` an order row inserted in a table without a unique key, in the same
//! transaction as the dedup row (`tx = "tx"`), so the row and the mark commit together.
//!
//! The program sends 50 orders (5 of them twice, as a producer's send retry), makes the
//! listener report failure after the work of 5 of them (a lost ack: the broker
//! redelivers), and checks that every order was charged exactly once. It needs Redis or
//! MySQL, and a RocketMQ name server with a broker that auto-creates topics, named by
//! `ROCKETMQ_NAMESRV_ADDR`; without it, it starts a name server and a broker inside the
//! process (the test suite's embedded RocketMQ, on free loopback ports, with one-second
//! delay levels):
//!
//! ```sh
//! cargo run -p idempotent-examples --example rocketmq_consumer --features rocketmq
//! cargo run -p idempotent-examples --example rocketmq_consumer --features rocketmq -- --store mysql
//! ROCKETMQ_NAMESRV_ADDR=127.0.0.1:9876 \
//!     cargo run -p idempotent-examples --example rocketmq_consumer --features rocketmq
//! ```
//!
//! `IDEMPOTENT_REDIS_URL` overrides `redis://127.0.0.1:6379` and `IDEMPOTENT_MYSQL_URL`
//! overrides `mysql://root@127.0.0.1:3306/test`. Redeliveries after `ReconsumeLater`
//! follow the broker's delay levels (10 s for the first retry by default, one second on
//! the embedded broker).

mod support;

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
    AsIdempotencyError, OnExhausted, block_on_listener, business_key, consume_status,
};
use idempotent_runtime::sqlx::{self, MySql, MySqlPool, Transaction};
use idempotent_runtime::{Error, MySqlStore, RedisStore, idempotent, register_store};
use idempotent_tests::rocketmq_support::EmbeddedRocketMq;
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
    /// The orders table (MySQL) failed; the transaction rolls back and a redelivery retries.
    Orders(sqlx::Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Idempotency(e) => write!(f, "{e}"),
            AppError::Ledger(e) => write!(f, "ledger: {e}"),
            AppError::Orders(e) => write!(f, "orders table: {e}"),
        }
    }
}

/// Lets `consume_status` tell the dedup outcomes from business failures.
impl AsIdempotencyError for AppError {
    fn idempotency_error(&self) -> Option<&Error> {
        match self {
            AppError::Idempotency(e) => Some(e),
            AppError::Ledger(_) | AppError::Orders(_) => None,
        }
    }
}

/// The amount in cents a message carries in its body.
fn amount_of(msg: &MessageExt) -> u64 {
    msg.body()
        .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Where the effect lands: a Redis hash, or rows of a MySQL table.
#[derive(Clone)]
enum Ledger {
    Redis {
        redis: ConnectionManager,
        charges: String,
        counts: String,
    },
    MySql {
        pool: MySqlPool,
        run: String,
    },
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
async fn on_order_paid(
    msg: &MessageExt,
    redis: &ConnectionManager,
    charges: &str,
    counts: &str,
) -> Result<Receipt, AppError> {
    let order_id = business_key(msg).unwrap_or_default();
    let amount = amount_of(msg);
    let mut redis = redis.clone();
    // a non-idempotent increment: run twice, it would charge twice
    let _: () = redis::pipe()
        .hincr(charges, order_id, amount)
        .hincr(counts, order_id, 1)
        .query_async(&mut redis)
        .await
        .map_err(AppError::Ledger)?;
    Ok(Receipt {
        charged_cents: amount,
    })
}

/// The same handler in transactional mode on MySQL: the dedup row is claimed and
/// completed in `tx`, beside the order row, so both commit or roll back together.
#[idempotent(
    key = "idempotent_runtime::rocketmq::dedup_key(msg)",
    tx = "tx",
    scope = "billing.on_order_paid",
    ttl = "7d"
)]
async fn on_order_paid_in_tx(
    msg: &MessageExt,
    run: &str,
    tx: &mut Transaction<'_, MySql>,
) -> Result<Receipt, AppError> {
    let order_id = business_key(msg).unwrap_or_default();
    let amount = amount_of(msg);
    // no unique key on purpose: run twice, it would insert the order twice
    sqlx::query(
        "INSERT INTO example_rocketmq_orders (run, order_id, amount_cents) VALUES (?, ?, ?)",
    )
    .bind(run)
    .bind(order_id)
    .bind(amount)
    .execute(&mut **tx)
    .await
    .map_err(AppError::Orders)?;
    Ok(Receipt {
        charged_cents: amount,
    })
}

impl Ledger {
    /// Handles one message: the attribute's handler, and for MySQL the transaction
    /// around it (committed before the listener acknowledges, rolled back on error).
    async fn handle(&self, msg: &MessageExt) -> Result<Receipt, AppError> {
        match self {
            Ledger::Redis {
                redis,
                charges,
                counts,
            } => on_order_paid(msg, redis, charges, counts).await,
            Ledger::MySql { pool, run } => {
                let mut tx = pool.begin().await.map_err(AppError::Orders)?;
                let receipt = on_order_paid_in_tx(msg, run, &mut tx).await?;
                tx.commit().await.map_err(AppError::Orders)?;
                Ok(receipt)
            }
        }
    }

    /// How many times each order was charged so far.
    async fn charges(&self) -> Result<Vec<(String, u64)>, Box<dyn std::error::Error>> {
        Ok(match self {
            Ledger::Redis { redis, counts, .. } => redis.clone().hgetall(counts).await?,
            Ledger::MySql { pool, run } => sqlx::query_as::<_, (String, i64)>(
                "SELECT order_id, COUNT(*) FROM example_rocketmq_orders WHERE run = ? GROUP BY order_id",
            )
            .bind(run)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(order, n)| (order, n.unsigned_abs()))
            .collect(),
        })
    }

    /// Removes what this run wrote.
    async fn clean_up(&self) -> Result<(), Box<dyn std::error::Error>> {
        match self {
            Ledger::Redis {
                redis,
                charges,
                counts,
            } => redis.clone().del::<_, ()>(&[charges, counts]).await?,
            Ledger::MySql { pool, run } => {
                sqlx::query("DELETE FROM example_rocketmq_orders WHERE run = ?")
                    .bind(run)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }
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
            let result = block_on_listener(&self.runtime, self.ledger.handle(msg));
            let mut s = consume_status(&result, OnExhausted::BrokerDeadLetter);
            if let Err(e) = &result {
                eprintln!("{}: {e} ({s:?})", msg.msg_id());
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
async fn main() -> ExitCode {
    support::exit(example().await)
}

async fn example() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let store = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "redis".to_owned(),
        [flag, store] if flag == "--store" && (store == "redis" || store == "mysql") => {
            store.clone()
        }
        _ => {
            eprintln!("usage: rocketmq_consumer [--store redis|mysql]");
            return Ok(ExitCode::from(2));
        }
    };
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let ledger = if store == "mysql" {
        let url = std::env::var("IDEMPOTENT_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
        // creates the dedup table the transactional handler writes to
        let store = support::Server::mysql(&url)
            .reach(MySqlStore::connect(&url))
            .await?;
        let pool = store.pool().clone();
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS example_rocketmq_orders (id BIGINT AUTO_INCREMENT \
             PRIMARY KEY, run VARCHAR(32) NOT NULL, order_id VARCHAR(64) NOT NULL, \
             amount_cents BIGINT UNSIGNED NOT NULL, KEY (run))",
        )
        .execute(&pool)
        .await?;
        Ledger::MySql {
            pool,
            run: run.to_string(),
        }
    } else {
        let url = std::env::var("IDEMPOTENT_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let store = support::Server::redis(&url)
            .reach(RedisStore::connect(&url))
            .await?;
        register_store("redis", store);
        Ledger::Redis {
            redis: ConnectionManager::new(redis::Client::open(url.as_str())?).await?,
            charges: format!("example:rocketmq:{run}:charges"),
            counts: format!("example:rocketmq:{run}:counts"),
        }
    };

    match std::env::var("ROCKETMQ_NAMESRV_ADDR") {
        Ok(namesrv) => {
            support::Server {
                name: "the RocketMQ name server",
                addr: &namesrv,
                start: "start a name server and a broker with autoCreateTopicEnable=true there \
                        (`mqnamesrv`, `mqbroker -n ADDRESS`), or unset ROCKETMQ_NAMESRV_ADDR \
                        to run on an embedded one",
            }
            .reach(answers(&namesrv))
            .await?;
            consume(&namesrv, run, &ledger).await
        }
        Err(_) => {
            let rocketmq = EmbeddedRocketMq::start("example").await;
            println!(
                "ROCKETMQ_NAMESRV_ADDR is not set: started a name server ({}) and a broker \
                 in this process",
                rocketmq.namesrv_addr
            );
            let result = consume(&rocketmq.namesrv_addr, run, &ledger).await;
            rocketmq.shutdown().await;
            result
        }
    }
}

/// Whether something listens at `namesrv` (`host:port`, or several joined by `;`).
async fn answers(namesrv: &str) -> std::io::Result<()> {
    let mut refused = std::io::Error::other("no address");
    for addr in namesrv.split(';') {
        match tokio::net::TcpStream::connect(addr.trim()).await {
            Ok(_) => return Ok(()),
            Err(e) => refused = e,
        }
    }
    Err(refused)
}

/// Sends the orders through the name server `namesrv` and consumes them.
async fn consume(
    namesrv: &str,
    run: u128,
    ledger: &Ledger,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let topic = format!("ExampleOrders{run}");
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
        .name_server_addr(namesrv.to_owned())
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
        .name_server_addr(namesrv.to_owned())
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
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let charged = ledger.charges().await?.len() as u64;
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

    let counts = ledger.charges().await?;
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
    ledger.clean_up().await?;
    Ok(if twice == 0 && counts.len() as u64 == ORDERS {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
