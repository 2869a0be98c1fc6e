//! NATS JetStream end to end: a durable pull consumer with explicit acks and a short
//! `ack_wait`, consumed by two clients at once, running an `#[idempotent]` handler on
//! Redis whose effect must happen once per business id.
//!
//! The publisher and the consumers produce every kind of duplicate JetStream meets:
//!
//! - **publish retries with the same `Nats-Msg-Id`**: JetStream's duplicate window drops
//!   them (the publish ack says `duplicate`, the stream stores the message once);
//! - **application resends with a new `Nats-Msg-Id`** and the same business id: stored
//!   twice and delivered twice, JetStream cannot tell; the handler replays;
//! - **lost acks**: a consumer does the work and withholds the ack; JetStream redelivers
//!   after `ack_wait` and the handler replays;
//! - **redelivery while the work runs**: a slow handler outlives `ack_wait`, JetStream
//!   hands the message to the other client while the first still holds the claim: in
//!   progress, nak with a delay, replayed once the first completes;
//! - **failures**: a flaky dependency fails the first attempt (nak, retried), and poison
//!   messages fail until `max_attempts`, then go to a dead-letter stream and are termed.
//!
//! Every delivery's outcome is logged and counted; the test checks that each business
//! effect happened exactly once, nothing was lost, and each duplicate was skipped for
//! the reason its kind predicts.
#![cfg(feature = "nats")]

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
    message::PublishMessage,
    stream,
};
use futures_util::StreamExt;
use idempotent_runtime::{Error, idempotent, register_store};
use idempotent_tests::broker_support::{Applied, Business, HandleError, Logged, Order, Tally};
use idempotent_tests::nats_support::{connect, run_id};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ORDERS: usize = 200;
const ACK_WAIT: Duration = Duration::from_secs(1);
/// Longer than `ACK_WAIT`: JetStream redelivers while the first delivery still works.
const SLOW_WORK: Duration = Duration::from_millis(2500);
/// A duplicate in progress elsewhere is nak'ed with at most this delay (the holder's
/// remaining lease is only an upper bound of when it finishes).
const IN_PROGRESS_RETRY: Duration = Duration::from_millis(300);
const FAILURE_BACKOFF: Duration = Duration::from_millis(200);

/// What kind of trouble a business id meets; decided by its index.
fn is_publish_retry(i: usize) -> bool {
    i.is_multiple_of(10)
}
fn is_app_resend(i: usize) -> bool {
    i % 10 == 5
}
fn is_withheld_ack(i: usize) -> bool {
    i % 10 == 3
}
fn is_flaky(i: usize) -> bool {
    i % 10 == 8
}
fn is_slow(i: usize) -> bool {
    i % 25 == 7
}
const POISON: usize = 2;

/// The business side: the effect table and the behaviour of each id.
#[derive(Default)]
struct World {
    business: Business,
    withheld: HashSet<String>,
    log: Mutex<Vec<Delivery>>,
    /// outcomes the test does not expect, reported by the handling tasks
    unexpected: Mutex<Vec<String>>,
}

#[idempotent(
    key = "order.id",
    store = "redis",
    ttl = "1h",
    lease = "10s",
    max_attempts = 3
)]
async fn charge(order: &Order, tag: &str, world: &World) -> Result<Applied, HandleError> {
    world.business.charge(order, tag, SLOW_WORK).await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    /// The body ran and succeeded on this delivery.
    Executed,
    /// A duplicate of a completed key: the cached output came back.
    Replayed,
    /// Another delivery held the claim.
    InProgress,
    /// The body failed (a flaky dependency or a poison message).
    Failed,
    /// `max_attempts` reached.
    Exhausted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disposition {
    Ack,
    Nak(Duration),
    Term,
}

/// The mapping from the handler's result to JetStream's acknowledgements.
fn disposition(r: &Result<Applied, HandleError>, delivered: i64) -> Disposition {
    let backoff = FAILURE_BACKOFF * u32::try_from(delivered.clamp(1, 10)).unwrap_or(1);
    match r {
        Ok(_) => Disposition::Ack,
        Err(HandleError::Idempotency(Error::InProgress { retry_after })) => {
            Disposition::Nak((*retry_after).min(IN_PROGRESS_RETRY))
        }
        // the work is done; only its output could not be replayed
        Err(HandleError::Idempotency(Error::OutputNotReplayable { .. })) => Disposition::Ack,
        Err(HandleError::Idempotency(e)) if e.is_retryable() => Disposition::Nak(backoff),
        Err(HandleError::Idempotency(_)) => Disposition::Term,
        Err(HandleError::Gateway | HandleError::Rejected) => Disposition::Nak(backoff),
    }
}

#[derive(Clone, Debug)]
struct Delivery {
    consumer: &'static str,
    seq: u64,
    delivered: i64,
    order: String,
    outcome: Outcome,
    disposition: Disposition,
    ack_withheld: bool,
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

async fn handle(
    consumer: &'static str,
    js: &jetstream::Context,
    dead_subject: &str,
    m: jetstream::Message,
    world: &World,
) {
    let (seq, delivered) = {
        let info = m.info().expect("a JetStream message has delivery info");
        (info.stream_sequence, info.delivered)
    };
    let order = Order {
        id: m
            .headers
            .as_ref()
            .and_then(|h| h.get("Order-Id"))
            .map(|v| v.as_str().to_owned())
            .expect("every test message has an Order-Id header"),
        amount: std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("the payload is an amount"),
    };
    let tag = format!("{consumer}/{seq}/{delivered}");
    let r = charge(&order, &tag, world).await;
    let outcome = match &r {
        Ok(a) if a.by == tag => Outcome::Executed,
        Ok(_) => Outcome::Replayed,
        Err(HandleError::Idempotency(Error::InProgress { .. })) => Outcome::InProgress,
        Err(HandleError::Idempotency(Error::AttemptsExhausted { .. })) => Outcome::Exhausted,
        Err(HandleError::Gateway | HandleError::Rejected) => Outcome::Failed,
        Err(HandleError::Idempotency(e)) => {
            // left unacknowledged; the test fails on it at once
            let what = format!(
                "{tag} {}: {e} ({:?})",
                order.id,
                std::error::Error::source(e)
            );
            world.unexpected.lock().unwrap().push(what);
            return;
        }
    };
    let disposition = disposition(&r, delivered);
    // a lost ack: the work is done, the acknowledgement never reaches the server
    let ack_withheld =
        outcome == Outcome::Executed && delivered == 1 && world.withheld.contains(&order.id);
    if !ack_withheld {
        match disposition {
            Disposition::Ack => m.ack().await.expect("ack"),
            Disposition::Nak(delay) => m.ack_with(AckKind::Nak(Some(delay))).await.expect("nak"),
            Disposition::Term => {
                // dead-letter first, then stop redelivery; the DLQ publish carries its
                // own Nats-Msg-Id so a repeat of this step is dropped by JetStream
                let mut dead = PublishMessage::build()
                    .payload(m.payload.clone())
                    .message_id(format!("dead-{}", order.id))
                    .header("Order-Id", order.id.as_str())
                    .header("Failed-Seq", seq.to_string());
                if let Err(HandleError::Idempotency(e)) = &r {
                    dead = dead.header("Failed-Reason", e.to_string());
                }
                js.send_publish(dead_subject.to_owned(), dead)
                    .await
                    .expect("publish to the dead-letter stream")
                    .await
                    .expect("dead-letter publish ack");
                m.ack_with(AckKind::Term).await.expect("term");
            }
        }
    }
    world.log.lock().unwrap().push(Delivery {
        consumer,
        seq,
        delivered,
        order: order.id,
        outcome,
        disposition,
        ack_withheld,
    });
}

/// One client on the durable consumer: pulls in small batches and handles each
/// message on its own task, as a production consumer with concurrency does.
async fn consume(
    name: &'static str,
    stream_name: String,
    durable: String,
    dead_subject: String,
    world: Arc<World>,
) {
    let (_client, js) = connect(name).await;
    let consumer: PullConsumer = js
        .get_stream(&stream_name)
        .await
        .expect("the stream exists")
        .get_consumer(&durable)
        .await
        .expect("the durable consumer exists");
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(16)
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("pull messages");
    let dead_subject: Arc<str> = dead_subject.into();
    while let Some(m) = messages.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{name}: pull error (the stream retries): {e}");
                continue;
            }
        };
        let (js, world, dead_subject) = (js.clone(), world.clone(), dead_subject.clone());
        tokio::spawn(async move { handle(name, &js, &dead_subject, m, &world).await });
    }
}

async fn publish(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    order: &str,
    amount: u64,
) -> jetstream::publish::PublishAck {
    js.send_publish(
        subject.to_owned(),
        PublishMessage::build()
            .payload(amount.to_string().into())
            .message_id(msg_id)
            .header("Order-Id", order),
    )
    .await
    .expect("publish")
    .await
    .expect("publish ack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_effect_once_across_publish_retries_resends_lost_acks_and_two_consumers() {
    register_store("redis", idempotent_tests::redis_support::connect().await);
    let run = run_id();
    let (_client, js) = connect("idempotent-nats-test-publisher").await;
    let stream_name = format!("IDEMPOTENT_ORDERS_{run}");
    let dead_stream_name = format!("IDEMPOTENT_DEAD_{run}");
    let subject = format!("idempotent.{run}.orders");
    let dead_subject = format!("idempotent.{run}.dead");
    let durable = "billing".to_owned();

    let mut orders_stream = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create the orders stream");
    let mut dead_stream = js
        .create_stream(stream::Config {
            name: dead_stream_name.clone(),
            subjects: vec![dead_subject.clone()],
            ..Default::default()
        })
        .await
        .expect("create the dead-letter stream");
    orders_stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await
        .expect("create the durable pull consumer");

    let id = |i: usize| format!("order-{run}-{i}");
    let poison_id = |k: usize| format!("poison-{run}-{k}");
    let world = Arc::new(World {
        withheld: (0..ORDERS)
            .filter(|&i| is_withheld_ack(i))
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

    // two clients on the same durable consumer, started before the first message
    let consumers = ["consumer-a", "consumer-b"].map(|name| {
        tokio::spawn(consume(
            name,
            stream_name.clone(),
            durable.clone(),
            dead_subject.clone(),
            world.clone(),
        ))
    });

    // publish: every order once, publish retries with the same Nats-Msg-Id, application
    // resends with a new one, and the poison messages
    let mut retries_dropped = 0;
    let mut resends_stored = 0;
    for i in 0..ORDERS {
        let msg_id = format!("{run}-msg-{i}");
        let amount = 100 + i as u64;
        let first = publish(&js, &subject, &msg_id, &id(i), amount).await;
        assert!(
            !first.duplicate,
            "first publish of {msg_id} is not a duplicate"
        );
        if is_publish_retry(i) {
            let again = publish(&js, &subject, &msg_id, &id(i), amount).await;
            assert!(
                again.duplicate,
                "JetStream drops a publish retry with the same Nats-Msg-Id inside the window"
            );
            assert_eq!(
                again.sequence, first.sequence,
                "the retry points at the stored message"
            );
            retries_dropped += 1;
        }
        if is_app_resend(i) {
            let resend = publish(&js, &subject, &format!("{msg_id}-resend"), &id(i), amount).await;
            assert!(
                !resend.duplicate,
                "a resend with a new Nats-Msg-Id is a new message to JetStream"
            );
            assert_ne!(resend.sequence, first.sequence);
            resends_stored += 1;
        }
    }
    for k in 0..POISON {
        publish(
            &js,
            &subject,
            &format!("{run}-poison-{k}"),
            &poison_id(k),
            1,
        )
        .await;
    }
    let stored = orders_stream
        .info()
        .await
        .expect("stream info")
        .state
        .messages;
    assert_eq!(
        stored as usize,
        ORDERS + resends_stored + POISON,
        "the stream holds each order once, plus the resends; the {retries_dropped} publish retries were dropped"
    );

    // wait until every order is applied, both poison messages are dead-lettered, and
    // the consumer has nothing pending or unacknowledged
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut consumer: PullConsumer = orders_stream
        .get_consumer(&durable)
        .await
        .expect("consumer");
    loop {
        let applied = world.business.ledger.applied();
        let dead = dead_stream
            .info()
            .await
            .expect("dead-letter stream info")
            .state
            .messages;
        let info = consumer.info().await.expect("consumer info").clone();
        if applied == ORDERS
            && dead == POISON as u64
            && info.num_pending == 0
            && info.num_ack_pending == 0
        {
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
            "not settled after 90 s: {applied}/{ORDERS} applied, {dead}/{POISON} dead-lettered, \
             {} pending, {} unacknowledged",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // quiet for two ack waits: nothing left to redeliver
    let settled = world.log.lock().unwrap().len();
    tokio::time::sleep(ACK_WAIT * 2).await;
    assert_eq!(
        world.log.lock().unwrap().len(),
        settled,
        "deliveries after the consumer settled"
    );
    for c in &consumers {
        c.abort();
    }

    let log = world.log.lock().unwrap().clone();
    // every business effect exactly once, nothing lost, nothing for poison messages
    let effects = world
        .business
        .ledger
        .assert_charged_once((0..ORDERS).map(|i| (id(i), 100 + i as u64)));

    // outcomes per delivery
    let tally = Tally::new(&log, Outcome::Executed, ORDERS);
    let n = |o: Outcome| tally.n(o);
    let executed_by = &tally.executed_by;

    // why each duplicate was skipped
    let mut lost_ack_replays = 0; // the same stored message again, after its work completed
    let mut resend_replays = 0; // another stored message with the same business id
    let mut concurrent = 0; // in progress on another delivery
    let mut redelivered_during_work = HashSet::new();
    let mut resend_skipped = HashSet::new();
    let mut replayed_after_lost_ack = HashSet::new();
    for d in &log {
        let Some(winner) = executed_by.get(d.order.as_str()) else {
            continue;
        };
        match d.outcome {
            Outcome::Replayed if d.seq == winner.seq => {
                assert!(
                    d.delivered > 1,
                    "a replay of the same stored message is a redelivery"
                );
                lost_ack_replays += 1;
                replayed_after_lost_ack.insert(d.order.clone());
            }
            Outcome::Replayed => {
                resend_replays += 1;
                resend_skipped.insert(d.order.clone());
            }
            Outcome::InProgress => {
                concurrent += 1;
                if d.seq == winner.seq {
                    redelivered_during_work.insert(d.order.clone());
                } else {
                    resend_skipped.insert(d.order.clone());
                }
            }
            Outcome::Executed | Outcome::Failed | Outcome::Exhausted => {}
        }
        assert_ne!(
            d.disposition,
            Disposition::Term,
            "only poison messages are termed"
        );
    }
    for w in &world.withheld {
        assert!(
            replayed_after_lost_ack.contains(w),
            "{w}: its ack was withheld, JetStream redelivered it, the handler replayed"
        );
        assert!(log.iter().any(|d| &d.order == w && d.ack_withheld));
    }
    for s in &world.business.slow {
        assert!(
            redelivered_during_work.contains(s),
            "{s}: redelivered after ack_wait while the first delivery worked: in progress"
        );
    }
    let resent: HashSet<String> = (0..ORDERS).filter(|&i| is_app_resend(i)).map(id).collect();
    for r in &resent {
        assert!(resend_skipped.contains(r), "{r}: the resend was skipped");
        // the stored message that did not execute was acknowledged on a replay
        let winner = executed_by[r.as_str()];
        assert!(
            log.iter().any(|d| &d.order == r
                && d.seq != winner.seq
                && d.outcome == Outcome::Replayed
                && d.disposition == Disposition::Ack),
            "{r}: the resend ended acknowledged"
        );
    }
    assert!(
        resend_skipped.is_subset(&resent),
        "only resent orders have a second stored message"
    );
    for d in log.iter().filter(|d| d.outcome == Outcome::InProgress) {
        assert!(matches!(d.disposition, Disposition::Nak(t) if t <= IN_PROGRESS_RETRY));
    }

    // failures: the flaky first attempts, and three attempts of each poison message
    assert_eq!(n(Outcome::Failed), world.business.flaky.len() + 3 * POISON);
    for f in &world.business.flaky {
        let attempts: Vec<Outcome> = log
            .iter()
            .filter(|d| &d.order == f && matches!(d.outcome, Outcome::Failed | Outcome::Executed))
            .map(|d| d.outcome)
            .collect();
        assert_eq!(
            attempts,
            [Outcome::Failed, Outcome::Executed],
            "{f}: failed once, then retried"
        );
    }
    assert_eq!(
        n(Outcome::Exhausted),
        POISON,
        "each poison message is dead-lettered once"
    );
    for p in &world.business.poison {
        assert!(
            log.iter()
                .any(|d| &d.order == p && d.disposition == Disposition::Term)
        );
    }
    let mut dead_ids = HashSet::new();
    for seq in 1..=POISON as u64 {
        let m = dead_stream.get_raw_message(seq).await.expect("dead letter");
        dead_ids.insert(
            m.headers
                .get("Order-Id")
                .map(|v| v.as_str().to_owned())
                .expect("dead letters keep the business id"),
        );
    }
    assert_eq!(dead_ids, world.business.poison);

    // both clients of the durable consumer did work
    for name in ["consumer-a", "consumer-b"] {
        assert!(
            log.iter()
                .any(|d| d.consumer == name && d.outcome == Outcome::Executed),
            "{name} executed nothing"
        );
    }

    let duplicates = n(Outcome::Replayed) + n(Outcome::InProgress);
    assert_eq!(
        lost_ack_replays + resend_replays + concurrent,
        duplicates,
        "every duplicate explained"
    );
    assert_eq!(
        log.len(),
        n(Outcome::Executed) + duplicates + n(Outcome::Failed) + n(Outcome::Exhausted)
    );
    println!(
        "NATS JetStream: {} orders + {POISON} poison published; {retries_dropped} publish retries dropped \
         by the Nats-Msg-Id window; {resends_stored} resends stored; {} deliveries: {} executed, \
         {} replayed ({lost_ack_replays} redeliveries of a completed message, {resend_replays} resends), \
         {concurrent} in progress, {} failed, {} exhausted (dead-lettered); {} effects applied; \
         per consumer: a {}, b {}",
        ORDERS,
        log.len(),
        n(Outcome::Executed),
        n(Outcome::Replayed),
        n(Outcome::Failed),
        n(Outcome::Exhausted),
        effects.values().sum::<u32>(),
        log.iter().filter(|d| d.consumer == "consumer-a").count(),
        log.iter().filter(|d| d.consumer == "consumer-b").count(),
    );

    js.delete_stream(&stream_name)
        .await
        .expect("delete the stream");
    js.delete_stream(&dead_stream_name)
        .await
        .expect("delete the dead-letter stream");
}
