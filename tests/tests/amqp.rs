//! RabbitMQ end to end: consumers on one queue (explicit acks, a dead-letter exchange)
//! run an `#[idempotent]` handler on Redis keyed with `idempotent_runtime::amqp::dedup_key`
//! (the `message_id` property), whose effect must happen once per business id.
//!
//! The publisher and the consumers make RabbitMQ produce its duplicates:
//!
//! - **a publisher resends** the same `message_id` (a publish retry after a lost
//!   confirm): RabbitMQ stores and delivers both copies: replayed;
//! - **a consumer closes its channel with unacknowledged messages** after doing their
//!   work: RabbitMQ requeues them and delivers them again with `redelivered = true`:
//!   replayed;
//! - **nack with requeue after the work** (the consumer did the work, then nacked): the
//!   message comes back with `redelivered = true`: replayed;
//! - **two consumers on one queue**, with slow handlers: the resend of a slow order
//!   arrives while its first copy is still being worked on: in progress, nacked with a
//!   short delay and requeued, then replayed;
//! - **failures**: a flaky dependency fails the first attempt (requeued), and poison
//!   messages fail until `max_attempts`, then are rejected into the dead-letter exchange.
//!
//! Every delivery's outcome is logged and counted; the test checks that each business
//! effect happened exactly once, nothing is left in the queue or unacknowledged, and why
//! each duplicate was skipped.
#![cfg(feature = "amqp")]

use futures_util::StreamExt;
use idempotent_runtime::amqp::lapin::message::Delivery as AmqpDelivery;
use idempotent_runtime::amqp::lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use idempotent_runtime::amqp::lapin::types::{AMQPValue, FieldTable};
use idempotent_runtime::amqp::lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use idempotent_runtime::amqp::{
    self, Settled, dead_letter_arguments, dedup_key, delivery_count, header,
};
use idempotent_runtime::{Disposition, Error, RetryPolicy, idempotent, register_store};
use idempotent_tests::broker_support::{
    Applied, Business, HandleError, Logged, Order, Tally, run_id,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ORDERS: usize = 200;
/// Messages the first consumer takes, works on, and hands back by closing its channel.
const CRASHED: u16 = 30;
const SLOW_WORK: Duration = Duration::from_millis(1500);
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(100),
    max: Duration::from_millis(500),
    in_progress_max: Duration::from_millis(300),
};
const POISON: usize = 2;
const URL_VAR: &str = "IDEMPOTENT_AMQP_URL";

fn is_resend(i: usize) -> bool {
    i % 10 == 5
}
fn is_nacked_after_work(i: usize) -> bool {
    i % 10 == 3
}
fn is_flaky(i: usize) -> bool {
    i % 10 == 8
}
/// Slow, and resent: the second copy arrives while the first is worked on.
fn is_slow(i: usize) -> bool {
    i % 20 == 15
}

fn amqp_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn connect() -> Connection {
    let url = amqp_url();
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the RabbitMQ test needs a server at {url} \
                 (`rabbitmq-server -detached`; set {URL_VAR} to use another): {e}"
            )
        })
}

#[derive(Default)]
struct World {
    business: Business,
    nacked_after_work: HashSet<String>,
    log: Mutex<Vec<Delivery>>,
    unexpected: Mutex<Vec<String>>,
    /// deliveries received by a live consumer and not yet settled
    in_flight: AtomicI64,
}

#[idempotent(
    key = "amqp::dedup_key(delivery, \"Order-Id\")",
    store = "redis",
    ttl = "1h",
    lease = "10s",
    max_attempts = 3
)]
async fn charge(
    delivery: &AmqpDelivery,
    order: &Order,
    tag: &str,
    world: &World,
) -> Result<Applied, HandleError> {
    world.business.charge(order, tag, SLOW_WORK).await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    Executed,
    Replayed,
    InProgress,
    Failed,
    Exhausted,
}

#[derive(Clone, Debug)]
struct Delivery {
    consumer: &'static str,
    /// which stored copy: "first" or "resend" (a test header, not the key)
    copy: String,
    redelivered: bool,
    order: String,
    outcome: Outcome,
    /// `None`: the channel was closed before settling
    settled: Option<Settled>,
    nacked_after_work: bool,
}

impl Logged for Delivery {
    type Outcome = Outcome;
    fn order(&self) -> &str {
        &self.order
    }
    fn outcome(&self) -> Outcome {
        self.outcome
    }
}

async fn handle(consumer: &'static str, d: AmqpDelivery, world: &World, settle: bool) {
    let order = Order {
        id: amqp::message_id(&d)
            .expect("every test message has a message_id")
            .to_owned(),
        amount: std::str::from_utf8(&d.data)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("the payload is an amount"),
    };
    assert!(matches!(
        dedup_key(&d, "Order-Id"),
        amqp::DedupKey::MessageId(_)
    ));
    let copy = header(&d, "Copy")
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .expect("every test message has a Copy header");
    let tag = format!("{consumer}/{}", d.delivery_tag);
    let r = charge(&d, &order, &tag, world).await;
    let outcome = match &r {
        Ok(a) if a.by == tag => Outcome::Executed,
        Ok(_) => Outcome::Replayed,
        Err(HandleError::Idempotency(Error::InProgress { .. })) => Outcome::InProgress,
        Err(HandleError::Idempotency(Error::AttemptsExhausted { .. })) => Outcome::Exhausted,
        Err(HandleError::Gateway | HandleError::Rejected) => Outcome::Failed,
        Err(HandleError::Idempotency(e)) => {
            world
                .unexpected
                .lock()
                .unwrap()
                .push(format!("{tag} {}: {e}", order.id));
            return;
        }
    };
    // the work is done, and the consumer nacks with requeue instead of acking
    let nacked_after_work = settle
        && outcome == Outcome::Executed
        && !d.redelivered
        && world.nacked_after_work.contains(&order.id);
    let settled = if settle {
        let disposition = if nacked_after_work {
            Disposition::Retry {
                after: Duration::ZERO,
            }
        } else {
            RETRY.disposition(&r, delivery_count(&d))
        };
        Some(amqp::settle(&d, disposition).await.expect("settle"))
    } else {
        None
    };
    world.log.lock().unwrap().push(Delivery {
        consumer,
        copy,
        redelivered: d.redelivered,
        order: order.id,
        outcome,
        settled,
        nacked_after_work,
    });
}

/// A live consumer: its own channel with a prefetch of 16, one task per delivery.
async fn consume(name: &'static str, conn: Arc<Connection>, queue: String, world: Arc<World>) {
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(16, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            name.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    while let Some(d) = deliveries.next().await {
        let d = d.expect("delivery");
        world.in_flight.fetch_add(1, Ordering::SeqCst);
        let world = world.clone();
        tokio::spawn(async move {
            handle(name, d, &world, true).await;
            world.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn publish(ch: &Channel, queue: &str, order: &str, copy: &str, amount: u64) {
    let mut headers = FieldTable::default();
    headers.insert("Copy".into(), AMQPValue::LongString(copy.into()));
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        amount.to_string().as_bytes(),
        BasicProperties::default()
            .with_message_id(order.into())
            .with_headers(headers),
    )
    .await
    .expect("publish")
    .await
    .expect("publisher confirm");
}

async fn ready(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_effect_once_across_resends_closed_channels_requeues_and_two_consumers() {
    let started = Instant::now();
    register_store("redis", idempotent_tests::redis_support::connect().await);
    let run = run_id();
    let conn = Arc::new(connect().await);
    let admin = conn.create_channel().await.expect("channel");
    let queue = format!("idempotent.test.{run}.orders");
    let dead_exchange = format!("idempotent.test.{run}.dead");
    let dead_queue = format!("idempotent.test.{run}.dead");

    admin
        .exchange_declare(
            dead_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the dead-letter exchange");
    admin
        .queue_declare(
            dead_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the dead-letter queue");
    admin
        .queue_bind(
            dead_queue.as_str().into(),
            dead_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the dead-letter queue");
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            dead_letter_arguments(&dead_exchange, None),
        )
        .await
        .expect("declare the queue");

    let id = |i: usize| format!("order-{run}-{i}");
    let poison_id = |k: usize| format!("poison-{run}-{k}");
    let world = Arc::new(World {
        nacked_after_work: (0..ORDERS)
            .filter(|&i| is_nacked_after_work(i))
            .map(id)
            .collect(),
        business: Business {
            flaky: (0..ORDERS).filter(|&i| is_flaky(i)).map(id).collect(),
            slow: (0..ORDERS).filter(|&i| is_slow(i)).map(id).collect(),
            poison: (0..POISON).map(poison_id).collect(),
            ..Default::default()
        },
        ..Default::default()
    });

    // publish with confirms: every order, resends of the same message_id right after,
    // then the poison messages
    let publisher = conn.create_channel().await.expect("channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut resends = 0;
    for i in 0..ORDERS {
        publish(&publisher, &queue, &id(i), "first", 100 + i as u64).await;
        if is_resend(i) {
            publish(&publisher, &queue, &id(i), "resend", 100 + i as u64).await;
            resends += 1;
        }
    }
    for k in 0..POISON {
        publish(&publisher, &queue, &poison_id(k), "first", 1).await;
    }
    assert_eq!(
        ready(&admin, &queue).await as usize,
        ORDERS + resends + POISON,
        "RabbitMQ stores a resend with the same message_id as a second message"
    );

    // the first consumer takes a batch, does the work, and closes its channel unacked
    let crasher = conn.create_channel().await.expect("channel");
    crasher
        .basic_qos(CRASHED, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut taken = crasher
        .basic_consume(
            queue.as_str().into(),
            "crasher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut batch = Vec::new();
    while batch.len() < CRASHED as usize {
        batch.push(taken.next().await.expect("a delivery").expect("delivery"));
    }
    futures_util::future::join_all(
        batch
            .into_iter()
            .map(|d| handle("crasher", d, &world, false)),
    )
    .await;
    crasher
        .close(200, "gone before acknowledging".into())
        .await
        .expect("close the channel");

    // two live consumers on the queue
    let consumers = ["consumer-a", "consumer-b"]
        .map(|name| tokio::spawn(consume(name, conn.clone(), queue.clone(), world.clone())));

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = world.business.ledger.applied();
        let dead = ready(&admin, &dead_queue).await as usize;
        let waiting = ready(&admin, &queue).await;
        let in_flight = world.in_flight.load(Ordering::SeqCst);
        if applied == ORDERS && dead == POISON && waiting == 0 && in_flight == 0 {
            break;
        }
        for c in &consumers {
            assert!(!c.is_finished(), "a consumer stopped early");
        }
        let unexpected = world.unexpected.lock().unwrap().clone();
        assert!(
            unexpected.is_empty(),
            "unexpected outcomes: {unexpected:#?}"
        );
        assert!(
            Instant::now() < deadline,
            "not settled after 60 s: {applied}/{ORDERS} applied, {dead}/{POISON} dead-lettered, \
             {waiting} ready, {in_flight} unacknowledged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = world.log.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        world.log.lock().unwrap().len(),
        settled,
        "deliveries after the queue settled"
    );
    for c in &consumers {
        c.abort();
    }

    let log = world.log.lock().unwrap().clone();
    let effects = world
        .business
        .ledger
        .assert_charged_once((0..ORDERS).map(|i| (id(i), 100 + i as u64)));

    let tally = Tally::new(&log, Outcome::Executed, ORDERS);
    let n = |o: Outcome| tally.n(o);
    let executed_by = &tally.executed_by;

    // why each duplicate was skipped
    let mut redelivery_replays = 0; // the same copy again, redelivered
    let mut resend_replays = 0; // the other copy of a resent order
    let mut concurrent = 0;
    let mut replayed_copies = HashSet::new();
    let mut in_progress_orders = HashSet::new();
    for d in &log {
        let Some(winner) = executed_by.get(d.order.as_str()) else {
            continue;
        };
        match d.outcome {
            Outcome::Replayed if d.copy == winner.copy => {
                assert!(d.redelivered, "a replay of the same copy is a redelivery");
                redelivery_replays += 1;
                replayed_copies.insert(d.order.clone());
            }
            Outcome::Replayed => resend_replays += 1,
            Outcome::InProgress => {
                concurrent += 1;
                in_progress_orders.insert(d.order.clone());
            }
            Outcome::Executed | Outcome::Failed | Outcome::Exhausted => {}
        }
    }
    let mut closed_channel_replays = 0;
    for d in log
        .iter()
        .filter(|d| d.consumer == "crasher" && d.outcome == Outcome::Executed)
    {
        assert!(
            replayed_copies.contains(&d.order),
            "{}: worked on by the closed channel, redelivered and replayed",
            d.order
        );
        closed_channel_replays += 1;
    }
    assert!(closed_channel_replays > 0);
    let nacked: Vec<&Delivery> = log.iter().filter(|d| d.nacked_after_work).collect();
    assert!(!nacked.is_empty());
    for d in &nacked {
        assert_eq!(d.settled, Some(Settled::Requeued));
        assert!(
            replayed_copies.contains(&d.order),
            "{}: nacked after the work, redelivered and replayed",
            d.order
        );
    }
    for r in (0..ORDERS).filter(|&i| is_resend(i)).map(id) {
        let winner = executed_by[r.as_str()];
        assert!(
            log.iter().any(|d| d.order == r
                && d.copy != winner.copy
                && d.outcome == Outcome::Replayed
                && d.settled == Some(Settled::Acked)),
            "{r}: the resend was replayed and acknowledged"
        );
    }
    for s in world
        .business
        .slow
        .iter()
        .filter(|s| executed_by[s.as_str()].consumer != "crasher")
    {
        assert!(
            in_progress_orders.contains(s),
            "{s}: its resend arrived while the first copy was worked on: in progress"
        );
    }
    for d in log.iter().filter(|d| d.outcome == Outcome::InProgress) {
        assert!(matches!(d.settled, None | Some(Settled::Requeued)));
    }
    assert_eq!(n(Outcome::Failed), world.business.flaky.len() + 3 * POISON);
    assert_eq!(n(Outcome::Exhausted), POISON);

    // the dead-letter queue holds the poison messages, with their message_id
    let mut dead_ids = HashSet::new();
    while let Some(m) = admin
        .basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        dead_ids.insert(amqp::message_id(&m.delivery).unwrap_or_default().to_owned());
    }
    assert_eq!(dead_ids, world.business.poison);

    for name in ["consumer-a", "consumer-b"] {
        assert!(
            log.iter()
                .any(|d| d.consumer == name && d.outcome == Outcome::Executed),
            "{name} executed nothing"
        );
    }
    let duplicates = n(Outcome::Replayed) + n(Outcome::InProgress);
    assert_eq!(
        redelivery_replays + resend_replays + concurrent,
        duplicates,
        "every duplicate explained"
    );
    println!(
        "RabbitMQ: {ORDERS} orders + {POISON} poison published, {resends} resent with the same message_id; \
         {} deliveries: {} executed, {} replayed ({redelivery_replays} redeliveries: \
         {closed_channel_replays} after the closed channel, {} after a nack-requeue after the work; \
         {resend_replays} resends), {concurrent} in progress, {} failed, {} exhausted (dead-lettered); \
         {} effects applied; per consumer: crasher {}, a {}, b {}; {:.1} s",
        log.len(),
        n(Outcome::Executed),
        n(Outcome::Replayed),
        nacked.len(),
        n(Outcome::Failed),
        n(Outcome::Exhausted),
        effects.values().sum::<u32>(),
        log.iter().filter(|d| d.consumer == "crasher").count(),
        log.iter().filter(|d| d.consumer == "consumer-a").count(),
        log.iter().filter(|d| d.consumer == "consumer-b").count(),
        started.elapsed().as_secs_f64(),
    );

    // closing the connection returns anything unacknowledged to the queue: nothing is
    let _ = admin;
    let check = connect().await;
    conn.close(200, "done".into()).await.expect("close");
    let ch = check.create_channel().await.expect("channel");
    assert_eq!(ready(&ch, &queue).await, 0, "nothing left unacknowledged");
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the queue");
    ch.queue_delete(dead_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the dead-letter queue");
    ch.exchange_delete(
        dead_exchange.as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await
    .expect("delete the dead-letter exchange");
}
