//! Apache RocketMQ end to end, on an embedded name server and broker (the Rust
//! implementation, 1.0): CLUSTERING push consumers of one group run an `#[idempotent]`
//! handler on Redis, keyed with `idempotent_runtime::rocketmq::dedup_key`, whose effect
//! must happen once per business key.
//!
//! The producer and the consumers produce RocketMQ's duplicates:
//!
//! - **send retry**: the same business message sent twice (two messages, the same
//!   `KEYS`, two `UNIQ_KEY`s);
//! - **lost ack**: a listener finishes the work but reports `ReconsumeLater`; the broker
//!   redelivers through the retry topic (one-second delay levels), with the same `KEYS`
//!   and `UNIQ_KEY` and a new offset id (`MessageExt::msg_id()`);
//! - **stopped before committing offsets**: consumer `a` does the work of its messages
//!   and stalls before returning; it is shut down and restarted, and the messages it had
//!   not committed are consumed again by the group;
//! - **rebalance**: consumer `b` joins the group while `a` consumes, `a` leaves and
//!   restarts, and `b` leaves, moving queues between them while messages are in flight.
//!
//! Every delivery's outcome is logged and counted; the test checks that each business
//! effect happened exactly once, nothing was lost, why each duplicate was skipped, and
//! that the framework's `idempotent_messages_total` counters say the same.
#![cfg(feature = "rocketmq")]
#![recursion_limit = "512"]

use idempotent_runtime::rocketmq::{
    AsIdempotencyError, OnExhausted, block_on_listener, consume_status, dedup_key, unique_key,
};
use idempotent_runtime::{Error, idempotent, register_store};
use idempotent_tests::broker_support::{Applied, Logged, Tally};
use idempotent_tests::metrics_support::Counts;
use idempotent_tests::rocketmq_support::EmbeddedRocketMq;
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQProducer,
    DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PER_PHASE: usize = 20;
const PHASES: usize = 3;
const ORDERS: usize = PER_PHASE * PHASES;

fn sent_twice(i: usize) -> bool {
    i.is_multiple_of(10)
}
fn loses_first_ack(i: usize) -> bool {
    i % 10 == 3
}

#[derive(Debug)]
enum HandleError {
    Idempotency(Error),
}

impl From<Error> for HandleError {
    fn from(e: Error) -> Self {
        HandleError::Idempotency(e)
    }
}

impl AsIdempotencyError for HandleError {
    fn idempotency_error(&self) -> Option<&Error> {
        match self {
            HandleError::Idempotency(e) => Some(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Executed,
    Replayed,
    InProgress,
}

#[derive(Clone, Debug)]
struct Delivery {
    consumer: &'static str,
    order: String,
    uniq: String,
    offset_id: String,
    reconsume_times: i32,
    outcome: Outcome,
    status: ConsumeConcurrentlyStatus,
    /// the listener did the work and stalled before returning (consumer `a`, phase 2)
    stalled: bool,
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

/// A gate the stalled listener waits on.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

#[derive(Default)]
struct World {
    effects: Mutex<HashMap<String, u32>>,
    log: Mutex<Vec<Delivery>>,
    lost_ack: HashSet<String>,
    /// orders of phase 2: consumer `a` stalls on them after doing the work
    stall_phase: HashSet<String>,
    stalled_now: AtomicU64,
    gate: Gate,
    deliveries: AtomicU64,
    unexpected: Mutex<Vec<String>>,
}

#[idempotent(
    key = "idempotent_runtime::rocketmq::dedup_key(msg)",
    store = "redis",
    ttl = "1h",
    lease = "10s"
)]
async fn charge(msg: &MessageExt, tag: &str, world: &World) -> Result<Applied, HandleError> {
    let order = msg
        .message_inner()
        .property("KEYS")
        .unwrap_or_default()
        .to_owned();
    *world.effects.lock().unwrap().entry(order).or_default() += 1;
    Ok(Applied { by: tag.to_owned() })
}

struct Listener {
    name: &'static str,
    /// the application's runtime, captured when the consumer is set up
    runtime: tokio::runtime::Handle,
    world: Arc<World>,
    stalls: bool,
}

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let mut status = ConsumeConcurrentlyStatus::ConsumeSuccess;
        for msg in msgs {
            let s = self.consume_one(msg);
            if s == ConsumeConcurrentlyStatus::ReconsumeLater {
                status = s;
            }
        }
        Ok(status)
    }
}

impl Listener {
    fn consume_one(&self, msg: &MessageExt) -> ConsumeConcurrentlyStatus {
        let w = &self.world;
        let n = w.deliveries.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}/{n}", self.name);
        let order = match dedup_key(msg) {
            idempotent_runtime::rocketmq::DedupKey::Business(k) => k.to_owned(),
            other => {
                w.unexpected
                    .lock()
                    .unwrap()
                    .push(format!("no business key: {other:?}"));
                return ConsumeConcurrentlyStatus::ReconsumeLater;
            }
        };
        // the bridge: the synchronous listener runs the async handler on the
        // application's runtime and waits for it
        let result = block_on_listener(&self.runtime, charge(msg, &tag, w));
        let outcome = match &result {
            Ok(a) if a.by == tag => Outcome::Executed,
            Ok(_) => Outcome::Replayed,
            Err(HandleError::Idempotency(Error::InProgress { .. })) => Outcome::InProgress,
            Err(HandleError::Idempotency(e)) => {
                w.unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{tag} {order}: {e}"));
                return ConsumeConcurrentlyStatus::ReconsumeLater;
            }
        };
        let mut status = consume_status(&result, OnExhausted::BrokerDeadLetter);
        // a lost ack: the work is done, the listener reports failure
        if outcome == Outcome::Executed && msg.reconsume_times() == 0 && w.lost_ack.contains(&order)
        {
            status = ConsumeConcurrentlyStatus::ReconsumeLater;
        }
        let stalled = self.stalls && w.stall_phase.contains(&order);
        w.log.lock().unwrap().push(Delivery {
            consumer: self.name,
            order,
            uniq: unique_key(msg).unwrap_or_default().to_owned(),
            offset_id: msg.msg_id().to_string(),
            reconsume_times: msg.reconsume_times(),
            outcome,
            status,
            stalled,
        });
        if stalled {
            // the process stalls after the work, before the offset can be committed
            w.stalled_now.fetch_add(1, Ordering::Relaxed);
            w.gate.wait();
        }
        status
    }
}

async fn start_consumer(
    mq: &EmbeddedRocketMq,
    group: &str,
    topic: &str,
    name: &'static str,
    world: &Arc<World>,
    stalls: bool,
) -> DefaultMQPushConsumer {
    let mut consumer = DefaultMQPushConsumer::builder(mq.client_runtime(name))
        .consumer_group(group.to_owned())
        .name_server_addr(mq.namesrv_addr.clone())
        .message_model(MessageModel::Clustering)
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .consume_thread_min(1)
        .consume_thread_max(4)
        .consume_message_batch_max_size(1)
        .pull_batch_size(8)
        .build();
    consumer.subscribe(topic, "*").await.expect("subscribe");
    consumer.register_message_listener_concurrently(Listener {
        name,
        runtime: tokio::runtime::Handle::current(),
        world: world.clone(),
        stalls,
    });
    consumer
        .start()
        .await
        .unwrap_or_else(|e| panic!("start consumer {name}: {e}"));
    consumer
}

async fn send(producer: &DefaultMQProducer, topic: &str, order: &str) -> String {
    let msg = Message::builder()
        .topic(topic)
        .tags("paid")
        .keys(vec![order.to_owned()])
        .body_slice(order.as_bytes())
        .build_unchecked();
    let r = producer
        .send(msg)
        .await
        .unwrap_or_else(|e| panic!("send {order}: {e}"))
        .expect("a synchronous send returns a result");
    r.msg_id
        .expect("the send result carries the UNIQ_KEY")
        .to_string()
}

/// Waits until `done` holds, failing with `what` after `secs`.
async fn wait_for(world: &World, secs: u64, what: &str, done: impl Fn(&World) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let unexpected = world.unexpected.lock().unwrap().clone();
        assert!(
            unexpected.is_empty(),
            "unexpected outcomes: {unexpected:#?}"
        );
        if done(world) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {secs} s ({} effects, {} deliveries)",
            world.effects.lock().unwrap().len(),
            world.log.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_effect_once_across_send_retries_lost_acks_restarts_and_rebalances() {
    register_store("redis", idempotent_tests::redis_support::connect().await);
    let counters = Counts::install();
    let started = Instant::now();
    let mq = EmbeddedRocketMq::start("rocketmq-test").await;
    eprintln!(
        "embedded name server and broker up in {:?}",
        started.elapsed()
    );

    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    let run: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let topic = format!("IdempotentOrders{run}");
    let group = format!("idempotent_billing_{run}");
    let id = |i: usize| format!("order-{run}-{i}");
    let world = Arc::new(World {
        // not in phase 2, where a's listener never gets to report its status
        lost_ack: (0..ORDERS)
            .filter(|&i| loses_first_ack(i) && !(PER_PHASE..2 * PER_PHASE).contains(&i))
            .map(id)
            .collect(),
        stall_phase: (PER_PHASE..2 * PER_PHASE).map(id).collect(),
        ..Default::default()
    });

    let mut producer = DefaultMQProducer::builder(mq.client_runtime("producer"))
        .producer_group(format!("idempotent_producer_{run}"))
        .name_server_addr(mq.namesrv_addr.clone())
        .build();
    producer.start().await.expect("start the producer");

    let mut uniq_of: HashMap<String, Vec<String>> = HashMap::new();
    let mut send_phase = async |producer: &DefaultMQProducer, phase: usize| {
        for i in phase * PER_PHASE..(phase + 1) * PER_PHASE {
            let first = send(producer, &topic, &id(i)).await;
            uniq_of.entry(id(i)).or_default().push(first);
            if sent_twice(i) {
                // the producer did not see the first send's result and sent it again
                let again = send(producer, &topic, &id(i)).await;
                uniq_of.entry(id(i)).or_default().push(again);
            }
        }
    };

    // phase 1: consumer a alone (the topic is created by the first send)
    send_phase(&producer, 0).await;
    let mut a = start_consumer(&mq, &group, &topic, "a", &world, true).await;
    wait_for(&world, 60, "phase 1 applied", |w| {
        w.effects.lock().unwrap().len() >= PER_PHASE
    })
    .await;

    // phase 2: b joins (rebalance) while a consumes; a stalls after the work of its
    // phase-2 messages, then is shut down before it can commit their offsets
    let mut b = start_consumer(&mq, &group, &topic, "b", &world, false).await;
    send_phase(&producer, 1).await;
    wait_for(&world, 60, "a stalls on one of its messages", |w| {
        w.stalled_now.load(Ordering::Relaxed) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shutdown_a = tokio::spawn(async move {
        a.shutdown().await;
    });
    // the group goes on without a: b takes its queues and consumes a's uncommitted messages
    wait_for(&world, 90, "phase 2 applied", |w| {
        w.effects.lock().unwrap().len() >= 2 * PER_PHASE
    })
    .await;
    let redelivered_after_stall = |w: &World| {
        let log = w.log.lock().unwrap();
        let stalled: HashSet<&str> = log
            .iter()
            .filter(|d| d.stalled)
            .map(|d| d.uniq.as_str())
            .collect();
        stalled.iter().all(|u| {
            log.iter()
                .any(|d| d.uniq == *u && !d.stalled && d.consumer != "a")
        })
    };
    wait_for(
        &world,
        90,
        "a's uncommitted messages consumed again by b",
        redelivered_after_stall,
    )
    .await;
    world.gate.open();
    tokio::time::timeout(Duration::from_secs(60), shutdown_a)
        .await
        .expect("consumer a shuts down")
        .expect("shutdown task");

    // phase 3: a restarts and b leaves (rebalances again): the restarted a takes every
    // queue, with the offsets the group committed
    let mut a2 = start_consumer(&mq, &group, &topic, "a-restarted", &world, false).await;
    b.shutdown().await;
    send_phase(&producer, 2).await;
    wait_for(
        &world,
        90,
        "phase 3 applied and every lost ack redelivered",
        |w| {
            let log = w.log.lock().unwrap();
            w.effects.lock().unwrap().len() >= ORDERS
                && w.lost_ack.iter().all(|o| {
                    log.iter().any(|d| {
                        &d.order == o && d.reconsume_times > 0 && d.outcome == Outcome::Replayed
                    })
                })
        },
    )
    .await;
    // quiet: nothing left to redeliver
    let mut settled = world.log.lock().unwrap().len();
    loop {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let now = world.log.lock().unwrap().len();
        if now == settled {
            break;
        }
        settled = now;
    }
    a2.shutdown().await;
    producer.shutdown().await;
    mq.shutdown().await;

    let log = world.log.lock().unwrap().clone();
    let effects = world.effects.lock().unwrap().clone();

    // every effect exactly once, nothing lost
    idempotent_tests::assert_applied_once(&effects, (0..ORDERS).map(id));
    let tally = Tally::new(&log, Outcome::Executed, ORDERS);
    let n = |o: Outcome| tally.n(o);
    let executed = &tally.executed_by;

    // why each duplicate was skipped
    let mut send_retry = 0; // another message (another UNIQ_KEY) with the same KEYS
    let mut after_reconsume_later = 0; // the same message back from the retry topic
    let mut after_stop_or_rebalance = 0; // the same message again, its offset not committed
    let mut in_progress = 0;
    for d in &log {
        let winner = executed[d.order.as_str()];
        match d.outcome {
            Outcome::Executed => continue,
            Outcome::InProgress => in_progress += 1,
            Outcome::Replayed if d.uniq != winner.uniq => send_retry += 1,
            Outcome::Replayed if d.reconsume_times > 0 => after_reconsume_later += 1,
            Outcome::Replayed => after_stop_or_rebalance += 1,
        }
        assert!(
            uniq_of[&d.order].contains(&d.uniq),
            "every delivery carries a UNIQ_KEY the producer got back"
        );
        let expected_status = if d.outcome == Outcome::InProgress {
            ConsumeConcurrentlyStatus::ReconsumeLater
        } else {
            ConsumeConcurrentlyStatus::ConsumeSuccess
        };
        assert_eq!(
            d.status, expected_status,
            "duplicates are acknowledged, in-progress ones retried"
        );
    }
    // send retries: the second message of every order sent twice was skipped
    for (order, uniqs) in &uniq_of {
        for u in uniqs {
            assert!(
                log.iter().any(|d| &d.order == order
                    && &d.uniq == u
                    && d.status == ConsumeConcurrentlyStatus::ConsumeSuccess),
                "{order}: message {u} was consumed and acknowledged"
            );
        }
        if uniqs.len() == 2 {
            let winner = executed[order.as_str()];
            assert!(log.iter().any(|d| &d.order == order
                && d.uniq != winner.uniq
                && d.outcome == Outcome::Replayed));
        }
    }
    // lost acks: redelivered with the same KEYS and UNIQ_KEY, a new offset id, replayed
    for o in &world.lost_ack {
        let first = executed[o.as_str()];
        assert_eq!(first.status, ConsumeConcurrentlyStatus::ReconsumeLater);
        let again = log
            .iter()
            .find(|d| &d.order == o && d.uniq == first.uniq && d.reconsume_times > 0)
            .unwrap_or_else(|| panic!("{o}: redelivered after ReconsumeLater"));
        assert_eq!(again.outcome, Outcome::Replayed);
        assert_ne!(
            again.offset_id, first.offset_id,
            "MessageExt::msg_id() (the offset id) changes on a retry: it cannot be the key"
        );
    }
    // the stalled consumer: its messages were consumed again by the group and replayed
    let stalled: Vec<&Delivery> = log.iter().filter(|d| d.stalled).collect();
    assert!(
        !stalled.is_empty(),
        "consumer a stalled on phase-2 messages"
    );
    for s in &stalled {
        assert!(
            log.iter().any(|d| d.uniq == s.uniq
                && !d.stalled
                && d.consumer != "a"
                && matches!(d.outcome, Outcome::Replayed | Outcome::InProgress)),
            "{}: consumed again after a stopped without committing, and skipped",
            s.order
        );
    }
    // every consumer took part
    for name in ["a", "b", "a-restarted"] {
        assert!(
            log.iter().any(|d| d.consumer == name),
            "{name} consumed nothing"
        );
    }
    let duplicates = log.len() - ORDERS;
    assert_eq!(
        send_retry + after_reconsume_later + after_stop_or_rebalance + in_progress,
        duplicates,
        "every duplicate explained"
    );
    // the framework's own counters agree with what the listeners saw
    let counted = |outcome: &str| {
        counters.get(
            "idempotent_messages_total",
            &[("scope", "rocketmq::charge"), ("outcome", outcome)],
        )
    };
    assert_eq!(counted("executed"), n(Outcome::Executed) as u64);
    assert_eq!(counted("replayed"), n(Outcome::Replayed) as u64);
    assert_eq!(counted("in_progress"), in_progress as u64);
    println!(
        "RocketMQ: {ORDERS} orders, {} messages sent ({} send retries); {} deliveries: {} executed, \
         {} replayed ({send_retry} send retries, {after_reconsume_later} redeliveries after \
         ReconsumeLater, {after_stop_or_rebalance} redeliveries after a stop or rebalance), \
         {in_progress} in progress; {} stalled on a; {} effects applied; per consumer: a {}, b {}, a-restarted {}",
        uniq_of.values().map(Vec::len).sum::<usize>(),
        uniq_of.values().filter(|u| u.len() == 2).count(),
        log.len(),
        n(Outcome::Executed),
        n(Outcome::Replayed),
        stalled.len(),
        effects.values().sum::<u32>(),
        log.iter().filter(|d| d.consumer == "a").count(),
        log.iter().filter(|d| d.consumer == "b").count(),
        log.iter().filter(|d| d.consumer == "a-restarted").count(),
    );
}
