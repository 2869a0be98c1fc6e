//! Kafka end to end, on librdkafka's in-process mock cluster: consumers of one group poll
//! batches, run them through `Idempotency::run_batch` on Redis keyed with
//! `idempotent_runtime::kafka::dedup_key` (the `order-id` header), and settle them with
//! `kafka::settle` (commit, seek back, dead-letter topic). Every order's effect must
//! happen once.
//!
//! The producer, the consumers and the cluster make Kafka produce its duplicates:
//!
//! - **a producer resends** the same order as a new record (same header, new offset):
//!   replayed (inside one batch, the batch form folds it onto the first copy);
//! - **a consumer does the work and dies before committing**: its partitions go to the
//!   group, which reads them again from the last committed offset: replayed;
//! - **offset commits fail** (injected into the cluster): a consumer did the work and
//!   could not commit; when a second consumer joins the group, the rebalance hands the
//!   partitions out from the last committed offset: replayed;
//! - **a rebalance while two consumers of one group run**, and **seeks back**: a failed
//!   record is retried by seeking its partition back to it, and the records after it in
//!   the batch come again: replayed;
//! - **failures**: a flaky dependency fails once (retried), and poison records fail until
//!   `max_attempts`, then go to the dead-letter topic.
//!
//! Every delivery's outcome is logged and counted; the test checks that each business
//! effect happened exactly once, every offset is committed, and why each duplicate was
//! skipped.
#![cfg(feature = "kafka")]

use idempotent_runtime::kafka::rdkafka::config::ClientConfig;
use idempotent_runtime::kafka::rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use idempotent_runtime::kafka::rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use idempotent_runtime::kafka::rdkafka::mocking::MockCluster;
use idempotent_runtime::kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use idempotent_runtime::kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use idempotent_runtime::kafka::rdkafka::{Message, Offset, TopicPartitionList};
use idempotent_runtime::kafka::{self, DeadLetter, SettleError};
use idempotent_runtime::register_store;
use idempotent_runtime::{Disposition, Error, Idempotency, RetryPolicy};
use idempotent_tests::broker_support::{Applied, HandleError, Ledger, Logged, Tally, run_id};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 4;
/// Orders produced before the first consumer starts; the rest come with both running.
const FIRST_WAVE: usize = 60;
const ORDERS: usize = 200;
/// Records the first consumer works on and never commits.
const CRASHED: usize = 30;
const POISON: usize = 2;
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(100),
    max: Duration::from_millis(500),
    in_progress_max: Duration::from_millis(300),
};

fn is_resend(i: usize) -> bool {
    i % 10 == 5
}
fn is_flaky(i: usize) -> bool {
    i >= FIRST_WAVE && i % 10 == 8
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    Executed,
    Replayed,
    InProgress,
    Failed,
    Exhausted,
}

/// What became of a delivery's offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Committed past.
    Committed,
    /// The batch's commit failed.
    CommitFailed,
    /// Not committed: an earlier record of its partition in the batch was retried.
    Rewound,
    /// The consumer died before settling.
    Abandoned,
}

#[derive(Clone, Debug)]
struct Delivery {
    consumer: &'static str,
    record: (i32, i64),
    order: String,
    outcome: Outcome,
    fate: Fate,
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

#[derive(Default)]
struct World {
    ledger: Ledger,
    flaky: HashSet<String>,
    failed_once: Mutex<HashSet<String>>,
    poison: HashSet<String>,
    log: Mutex<Vec<Delivery>>,
    unexpected: Mutex<Vec<String>>,
    commit_failures: AtomicUsize,
    consumer_errors: AtomicUsize,
}

fn order_of(m: &BorrowedMessage<'_>) -> String {
    kafka::header(m, "order-id")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("every test record has an order-id header")
}

/// The business side: runs once per order, whichever consumer and record.
async fn charge(
    m: &BorrowedMessage<'_>,
    tag: String,
    world: &World,
) -> Result<Applied, HandleError> {
    let order = order_of(m);
    if world.poison.contains(&order) {
        return Err(HandleError::Rejected);
    }
    if world.flaky.contains(&order) && world.failed_once.lock().unwrap().insert(order.clone()) {
        return Err(HandleError::Gateway);
    }
    let amount: u64 = m
        .payload()
        .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
        .expect("the payload is an amount");
    world.ledger.charge(&order, amount);
    Ok(Applied { by: tag })
}

fn tag(consumer: &str, batch: usize, m: &BorrowedMessage<'_>) -> String {
    format!("{consumer}/{batch}/{}/{}", m.partition(), m.offset())
}

fn billing() -> Idempotency {
    Idempotency::new("kafka-test.billing")
        .store_named("redis")
        .ttl(Duration::from_secs(3600))
        .lease(Duration::from_secs(10))
        .max_attempts(3)
}

/// Runs one batch and logs each delivery; `settle` false: the consumer dies before
/// committing.
async fn process(
    name: &'static str,
    batch_no: usize,
    consumer: &StreamConsumer,
    batch: &[BorrowedMessage<'_>],
    dead_letter: Option<DeadLetter<'_>>,
    world: &World,
) -> Option<Duration> {
    let results: Vec<Result<Applied, HandleError>> = billing()
        .run_batch(
            batch,
            |m| kafka::dedup_key(m, "order-id"),
            |m| charge(m, tag(name, batch_no, m), world),
        )
        .await;
    let dispositions: Vec<Disposition> = results.iter().map(|r| RETRY.disposition(r, 1)).collect();
    let (commit_failed, retry_after) = match dead_letter {
        None => (false, None),
        Some(dl) => match kafka::settle(consumer, batch, &dispositions, Some(dl)).await {
            Ok(s) => (false, s.retry_after),
            Err(SettleError::Commit(_)) => {
                world.commit_failures.fetch_add(1, Ordering::SeqCst);
                // the seeks were done before the commit; retried records come back
                let retry = dispositions
                    .iter()
                    .any(|d| !d.is_ack() && *d != Disposition::DeadLetter);
                (true, retry.then_some(RETRY.initial))
            }
            // the partition was revoked under it: its new owner reads from the last commit
            Err(SettleError::Seek(e)) => {
                eprintln!("{name}: seek back failed: {e}");
                world.consumer_errors.fetch_add(1, Ordering::SeqCst);
                (false, Some(RETRY.initial))
            }
            Err(e) => panic!("settle: {e}"),
        },
    };
    // per partition, the first retried offset: records after it are not committed
    let mut rewound_from: HashMap<i32, i64> = HashMap::new();
    for (m, d) in batch.iter().zip(&dispositions) {
        if matches!(d, Disposition::Retry { .. }) {
            let e = rewound_from.entry(m.partition()).or_insert(m.offset());
            *e = (*e).min(m.offset());
        }
    }
    let mut log = world.log.lock().unwrap();
    for (m, r) in batch.iter().zip(&results) {
        let outcome = match r {
            Ok(a) if a.by == tag(name, batch_no, m) => Outcome::Executed,
            Ok(_) => Outcome::Replayed,
            Err(HandleError::Idempotency(Error::InProgress { .. })) => Outcome::InProgress,
            Err(HandleError::Idempotency(Error::AttemptsExhausted { .. })) => Outcome::Exhausted,
            Err(HandleError::Gateway | HandleError::Rejected) => Outcome::Failed,
            Err(HandleError::Idempotency(e)) => {
                world
                    .unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{name} {}: {e}", order_of(m)));
                continue;
            }
        };
        let fate = if dead_letter.is_none() {
            Fate::Abandoned
        } else if rewound_from
            .get(&m.partition())
            .is_some_and(|&o| m.offset() >= o)
        {
            Fate::Rewound
        } else if commit_failed {
            Fate::CommitFailed
        } else {
            Fate::Committed
        };
        log.push(Delivery {
            consumer: name,
            record: (m.partition(), m.offset()),
            order: order_of(m),
            outcome,
            fate,
        });
    }
    retry_after
}

fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "200")
        .set("topic.metadata.refresh.interval.ms", "1000");
    c
}

async fn consume(
    name: &'static str,
    consumer: StreamConsumer,
    producer: FutureProducer,
    dead_topic: String,
    world: Arc<World>,
) {
    let mut batch_no = 0;
    // no timeout around the receive: a batch dropped half-received would be skipped by
    // the next commit; the task is aborted once everything is settled
    loop {
        let batch = match kafka::recv_batch(&consumer, 32, Duration::from_millis(50)).await {
            Ok(b) => b,
            // a consumer error (a session lost under load, a broker hiccup): librdkafka
            // rejoins by itself and the uncommitted records come again
            Err(e) => {
                eprintln!("{name}: receive failed, retrying: {e}");
                world.consumer_errors.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        batch_no += 1;
        let dl = DeadLetter {
            producer: &producer,
            topic: &dead_topic,
        };
        if let Some(wait) = process(name, batch_no, &consumer, &batch, Some(dl), &world).await {
            tokio::time::sleep(wait).await;
        }
    }
}

async fn produce(producer: &FutureProducer, topic: &str, order: &str, copy: &str, amount: u64) {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "order-id",
            value: Some(order),
        })
        .insert(Header {
            key: "copy",
            value: Some(copy),
        });
    producer
        .send(
            FutureRecord::to(topic)
                .key(order)
                .payload(&amount.to_string())
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
}

/// Committed offset and high watermark of every partition.
fn offsets(bootstrap: &str, group: &str, topic: &str) -> Vec<(i64, i64)> {
    let probe: BaseConsumer = consumer_config(bootstrap, group)
        .create()
        .expect("probe consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = probe
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..PARTITIONS)
        .map(|p| {
            let c = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            let (_, high) = probe
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (c, high)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_effect_once_across_resends_a_dead_consumer_failed_commits_and_a_rebalance() {
    let started = Instant::now();
    register_store("redis", idempotent_tests::redis_support::connect().await);
    let run = run_id();
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let topic = format!("orders-{run}");
    let dead_topic = format!("orders-dead-{run}");
    mock.create_topic(&topic, PARTITIONS, 1).expect("topic");
    mock.create_topic(&dead_topic, 1, 1)
        .expect("dead-letter topic");
    let group = format!("billing-{run}");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");

    let id = |i: usize| format!("order-{run}-{i}");
    let poison_id = |k: usize| format!("poison-{run}-{k}");
    let world = Arc::new(World {
        flaky: (0..ORDERS).filter(|&i| is_flaky(i)).map(id).collect(),
        poison: (0..POISON).map(poison_id).collect(),
        ..Default::default()
    });
    let mut resends = 0;
    let mut produce_orders = async |range: std::ops::Range<usize>| {
        for i in range {
            produce(&producer, &topic, &id(i), "first", 100 + i as u64).await;
            if is_resend(i) {
                produce(&producer, &topic, &id(i), "resend", 100 + i as u64).await;
                resends += 1;
            }
        }
    };
    produce_orders(0..FIRST_WAVE).await;

    // 1. a consumer does the work of a batch and dies before committing
    {
        let crasher: StreamConsumer = consumer_config(&bootstrap, &group)
            .create()
            .expect("consumer");
        crasher.subscribe(&[&topic]).expect("subscribe");
        let mut batch = Vec::new();
        while batch.len() < CRASHED {
            let more =
                kafka::recv_batch(&crasher, CRASHED - batch.len(), Duration::from_millis(200))
                    .await
                    .expect("receive");
            batch.extend(more);
        }
        process("crasher", 1, &crasher, &batch, None, &world).await;
    }

    // 2. commits fail while consumer a works alone; then b joins the group
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 10_000],
    );
    let start = |name: &'static str| {
        let consumer: StreamConsumer = consumer_config(&bootstrap, &group)
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        tokio::spawn(consume(
            name,
            consumer,
            producer.clone(),
            dead_topic.clone(),
            world.clone(),
        ))
    };
    let a = start("consumer-a");
    let wait_until = async |what: &str, cond: &dyn Fn(&World) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond(&world) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            let unexpected = world.unexpected.lock().unwrap().clone();
            assert!(
                unexpected.is_empty(),
                "unexpected outcomes: {unexpected:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_until("a applied the first wave", &|w| {
        w.ledger.applied() == FIRST_WAVE && w.commit_failures.load(Ordering::SeqCst) > 0
    })
    .await;
    let b = start("consumer-b");
    // the rebalance hands every partition out again from the last committed offset
    wait_until("the uncommitted work came back", &|w| {
        let log = w.log.lock().unwrap();
        let failed: HashSet<(i32, i64)> = log
            .iter()
            .filter(|d| d.fate == Fate::CommitFailed && d.outcome == Outcome::Executed)
            .map(|d| d.record)
            .collect();
        let again: HashSet<(i32, i64)> = log
            .iter()
            .filter(|d| d.outcome == Outcome::Replayed && failed.contains(&d.record))
            .map(|d| d.record)
            .collect();
        !failed.is_empty() && again == failed
    })
    .await;
    mock.clear_request_errors(RDKafkaApiKey::OffsetCommit);

    // 3. the rest, with flaky and poison records, consumed by both
    produce_orders(FIRST_WAVE..ORDERS).await;
    for k in 0..POISON {
        produce(&producer, &topic, &poison_id(k), "first", 1).await;
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = world.ledger.applied();
        let offs = {
            let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
            tokio::task::spawn_blocking(move || offsets(&b, &g, &t))
                .await
                .expect("offsets")
        };
        let dead = {
            let (b, g, t) = (bootstrap.clone(), group.clone(), dead_topic.clone());
            tokio::task::spawn_blocking(move || {
                let probe: BaseConsumer = consumer_config(&b, &g).create().expect("probe");
                probe
                    .fetch_watermarks(&t, 0, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .await
            .expect("dead-letter watermark")
        };
        let all_committed = offs.iter().all(|(c, high)| c == high);
        if applied == ORDERS && dead == POISON as i64 && all_committed {
            break;
        }
        assert!(
            !a.is_finished() && !b.is_finished(),
            "a consumer stopped early"
        );
        let unexpected = world.unexpected.lock().unwrap().clone();
        assert!(
            unexpected.is_empty(),
            "unexpected outcomes: {unexpected:#?}"
        );
        if Instant::now() >= deadline {
            let effects = world.ledger.effects();
            let missing: Vec<String> = (0..ORDERS)
                .map(id)
                .filter(|o| !effects.contains_key(o))
                .collect();
            let log = world.log.lock().unwrap().clone();
            let seen: Vec<&Delivery> = log.iter().filter(|d| missing.contains(&d.order)).collect();
            panic!(
                "not settled after 60 s: {applied}/{ORDERS} applied, {dead}/{POISON} dead-lettered, \
                 (committed, end) per partition {offs:?}; missing {missing:?}, their deliveries {seen:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let settled = world.log.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        world.log.lock().unwrap().len(),
        settled,
        "deliveries after the group settled"
    );
    a.abort();
    b.abort();

    let log = world.log.lock().unwrap().clone();
    let effects = world
        .ledger
        .assert_charged_once((0..ORDERS).map(|i| (id(i), 100 + i as u64)));

    let tally = Tally::new(&log, Outcome::Executed, ORDERS);
    let n = |o: Outcome| tally.n(o);
    let executed_by = &tally.executed_by;

    // why each duplicate was skipped: a replay of the record that executed, by what
    // became of that record's offset; or another record with the same order (a resend)
    let mut by_cause: BTreeMap<&str, usize> = BTreeMap::new();
    let mut replayed_records = HashSet::new();
    for d in &log {
        let Some(winner) = executed_by.get(d.order.as_str()) else {
            continue;
        };
        let cause = match d.outcome {
            Outcome::Replayed if d.record == winner.record => {
                replayed_records.insert(d.record);
                match winner.fate {
                    Fate::Abandoned => "dead consumer",
                    Fate::CommitFailed => "failed commit",
                    Fate::Rewound => "seek back",
                    Fate::Committed => "rebalance",
                }
            }
            Outcome::Replayed => "resend",
            Outcome::InProgress => "in progress",
            Outcome::Executed | Outcome::Failed | Outcome::Exhausted => continue,
        };
        *by_cause.entry(cause).or_default() += 1;
    }
    for d in log.iter().filter(|d| d.outcome == Outcome::Executed) {
        if matches!(d.fate, Fate::Abandoned | Fate::CommitFailed | Fate::Rewound) {
            assert!(
                replayed_records.contains(&d.record),
                "{}: executed, its offset not committed ({:?}): delivered again and replayed",
                d.order,
                d.fate
            );
        }
    }
    for cause in ["dead consumer", "failed commit", "resend"] {
        assert!(
            by_cause.get(cause).copied().unwrap_or(0) > 0,
            "no duplicate from a {cause}"
        );
    }
    for r in (0..ORDERS).filter(|&i| is_resend(i)).map(id) {
        let winner = executed_by[r.as_str()];
        assert!(
            log.iter().any(|d| d.order == r
                && d.record != winner.record
                && d.outcome == Outcome::Replayed),
            "{r}: the resent record was replayed"
        );
    }
    assert_eq!(n(Outcome::Failed), world.flaky.len() + 3 * POISON);
    assert_eq!(n(Outcome::Exhausted), POISON);
    for name in ["consumer-a", "consumer-b"] {
        assert!(
            log.iter()
                .any(|d| d.consumer == name && d.outcome == Outcome::Executed),
            "{name} executed nothing"
        );
    }

    // the dead-letter topic holds the poison records, with their order-id and origin
    let dead_orders = {
        let (b, t) = (bootstrap.clone(), dead_topic.clone());
        tokio::task::spawn_blocking(move || {
            let reader: BaseConsumer = consumer_config(&b, &format!("dead-reader-{t}"))
                .create()
                .expect("reader");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&t, 0, Offset::Beginning)
                .expect("partition");
            reader.assign(&tpl).expect("assign");
            let mut orders = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while orders.len() < POISON && Instant::now() < deadline {
                if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
                    assert!(kafka::header(&m, "dead-offset").is_some());
                    orders.insert(
                        String::from_utf8_lossy(kafka::header(&m, "order-id").unwrap())
                            .into_owned(),
                    );
                }
            }
            orders
        })
        .await
        .expect("read the dead-letter topic")
    };
    assert_eq!(dead_orders, world.poison);

    let duplicates = n(Outcome::Replayed) + n(Outcome::InProgress);
    assert_eq!(
        by_cause.values().sum::<usize>(),
        duplicates,
        "every duplicate explained"
    );
    println!(
        "Kafka (mock cluster, {PARTITIONS} partitions): {ORDERS} orders + {POISON} poison produced, \
         {resends} resent as new records; {} deliveries: {} executed, {} replayed, {} in progress, \
         {} failed, {} exhausted (dead-lettered); duplicates by cause {by_cause:?}; \
         {} commits failed (injected), {} consumer errors; {} effects applied; per consumer: crasher {}, a {}, b {}; {:.1} s",
        log.len(),
        n(Outcome::Executed),
        n(Outcome::Replayed),
        n(Outcome::InProgress),
        n(Outcome::Failed),
        n(Outcome::Exhausted),
        world.commit_failures.load(Ordering::SeqCst),
        world.consumer_errors.load(Ordering::SeqCst),
        effects.values().sum::<u32>(),
        log.iter().filter(|d| d.consumer == "crasher").count(),
        log.iter().filter(|d| d.consumer == "consumer-a").count(),
        log.iter().filter(|d| d.consumer == "consumer-b").count(),
        started.elapsed().as_secs_f64(),
    );
}

/// `kafka::rejoin`, the remedy for a failed seek back: the consumer leaves the group and
/// joins it again, and reads its partition from the last commit rather than from where
/// it had read to, so the records it did not settle come again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_reads_again_from_the_last_commit() {
    let run = run_id();
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let topic = format!("rejoin-{run}");
    mock.create_topic(&topic, 1, 1).expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    for i in 0..6u64 {
        produce(&producer, &topic, &format!("r-{run}-{i}"), "first", i).await;
    }
    let consumer: StreamConsumer = consumer_config(&bootstrap, &format!("rejoin-{run}"))
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut batch = Vec::new();
    while batch.len() < 6 {
        let more = kafka::recv_batch(&consumer, 6 - batch.len(), Duration::from_millis(200))
            .await
            .expect("receive");
        batch.extend(more);
    }
    let offsets: Vec<i64> = batch.iter().map(|m| m.offset()).collect();
    assert_eq!(offsets, (0..6).collect::<Vec<i64>>());
    // the first two are acknowledged; the rest stay unsettled, as after a failed seek
    // back to offset 2
    kafka::settle(&consumer, &batch[..2], &[Disposition::Ack; 2], None)
        .await
        .expect("settle");
    drop(batch);

    kafka::rejoin(&consumer).expect("rejoin");
    let again = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("the unsettled records come again after rejoining")
        .expect("receive");
    assert_eq!(again.offset(), 2, "read again from the last commit");

    // a consumer without a subscription has no group to join again
    let lone: BaseConsumer = consumer_config(&bootstrap, &format!("lone-{run}"))
        .create()
        .expect("consumer");
    let err = kafka::rejoin(&lone).expect_err("no subscription");
    assert!(err.to_string().contains("no topic"), "{err}");
}
