//! Redis Streams end to end: consumers of one consumer group, reading with
//! `idempotent_runtime::redis_streams::StreamGroup`, run an `#[idempotent]` handler on
//! Redis whose effect must happen once per business id (the entry's `order_id` field).
//!
//! The producer and the consumers make Redis Streams produce its duplicates:
//!
//! - **a consumer dies before `XACK`**: the first consumer reads a batch, does the work of
//!   each entry and disappears without acknowledging; its entries stay pending until they
//!   are idle past the claim threshold, and the live consumers take them over with
//!   `XAUTOCLAIM` (same entry id, delivery count 2): replayed;
//! - **a resend with a new entry id**: the producer adds the same order again (`XADD`
//!   gives it a new id): replayed;
//! - **two consumers in one group**, and handlers slower than the claim threshold: the
//!   other consumer claims an entry while the first still works on it: in progress, left
//!   pending and claimed again once the retry delay passed, then replayed or found acked;
//! - **failures**: a flaky dependency fails the first attempt (left pending, retried),
//!   and poison entries fail until `max_attempts`, then go to the dead-letter stream.
//!
//! Every delivery's outcome is logged and counted; the test checks that each business
//! effect happened exactly once, nothing is pending, and why each duplicate was skipped.
#![cfg(feature = "redis-streams")]

use idempotent_runtime::redis::aio::ConnectionManager;
use idempotent_runtime::redis::streams::{StreamInfoGroupsReply, StreamInfoStreamReply};
use idempotent_runtime::redis::{self, AsyncCommands};
use idempotent_runtime::redis_streams::{Entry, Settled, StreamGroup, dedup_key};
use idempotent_runtime::{Error, RetryPolicy, idempotent, register_store};
use idempotent_tests::broker_support::{
    Applied, Business, HandleError, Logged, Order, Tally, run_id,
};
use idempotent_tests::redis_support::{raw, redis_url};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ORDERS: usize = 200;
/// Entries the first consumer reads, works on and abandons.
const CRASHED: usize = 30;
const CLAIM_IDLE: Duration = Duration::from_secs(1);
/// Longer than `CLAIM_IDLE`: the entry is claimed by a consumer while another works on it.
const SLOW_WORK: Duration = Duration::from_millis(2500);
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(1),
    in_progress_max: Duration::from_millis(300),
};
const POISON: usize = 2;

fn is_resend(i: usize) -> bool {
    i % 10 == 5
}
fn is_flaky(i: usize) -> bool {
    i % 10 == 8
}
fn is_slow(i: usize) -> bool {
    i % 25 == 7
}

#[derive(Default)]
struct World {
    business: Business,
    log: Mutex<Vec<Delivery>>,
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
    Executed,
    Replayed,
    InProgress,
    Failed,
    Exhausted,
}

#[derive(Clone, Debug)]
struct Delivery {
    consumer: &'static str,
    entry: String,
    deliveries: u32,
    order: String,
    outcome: Outcome,
    /// `None`: the consumer died before settling.
    settled: Option<Settled>,
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

/// Runs the handler on one entry, then settles it unless the consumer is about to die.
async fn handle(
    consumer: &'static str,
    group: &StreamGroup,
    conn: &mut ConnectionManager,
    entry: Entry,
    world: &World,
    settle: bool,
) {
    let order = Order {
        id: dedup_key(&entry, "order_id")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("every test entry has an order_id"),
        amount: entry
            .field("amount")
            .and_then(|a| std::str::from_utf8(a).ok()?.parse().ok())
            .expect("every test entry has an amount"),
    };
    let tag = format!("{consumer}/{}/{}", entry.id(), entry.deliveries());
    let r = charge(&order, &tag, world).await;
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
    let settled = if settle {
        let d = RETRY.disposition(&r, entry.deliveries());
        Some(group.settle(conn, &entry, d).await.expect("settle"))
    } else {
        None
    };
    world.log.lock().unwrap().push(Delivery {
        consumer,
        entry: entry.id().to_owned(),
        deliveries: entry.deliveries(),
        order: order.id,
        outcome,
        settled,
    });
}

/// A live consumer: reads abandoned and new entries, handles each on its own task.
async fn consume(name: &'static str, stream: String, world: Arc<World>) {
    let group = Arc::new(
        StreamGroup::new(stream.as_str(), "billing", name)
            .claim_idle(CLAIM_IDLE)
            .max_deliveries(40)
            .batch(16)
            .block(Duration::from_millis(200)),
    );
    // blocking reads on a connection of their own; settles on another
    let mut reads = raw(&redis_url()).await;
    let conn = raw(&redis_url()).await;
    loop {
        let entries = group.read(&mut reads).await.expect("read the group");
        for entry in entries {
            let (group, world, mut conn) = (group.clone(), world.clone(), conn.clone());
            tokio::spawn(async move { handle(name, &group, &mut conn, entry, &world, true).await });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_effect_once_across_a_dead_consumer_resends_and_two_consumers() {
    let started = Instant::now();
    register_store("redis", idempotent_tests::redis_support::connect().await);
    let run = run_id();
    let stream = format!("idempotent:test:streams:{run}");
    let mut conn = raw(&redis_url()).await;

    let id = |i: usize| format!("order-{run}-{i}");
    let poison_id = |k: usize| format!("poison-{run}-{k}");
    let world = Arc::new(World {
        business: Business {
            flaky: (0..ORDERS).filter(|&i| is_flaky(i)).map(id).collect(),
            slow: (0..ORDERS).filter(|&i| is_slow(i)).map(id).collect(),
            poison: (0..POISON).map(poison_id).collect(),
            ..Default::default()
        },
        ..Default::default()
    });

    let crasher = StreamGroup::new(stream.as_str(), "billing", "crasher")
        .batch(CRASHED)
        .block(Duration::from_millis(200));
    crasher.create(&mut conn).await.expect("create the group");
    let dead_stream = crasher.dead_letter().to_owned();

    // every order once, resends with a new entry id right after, then the poison entries
    let add = |order: String, amount: u64| {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            let amount = amount.to_string();
            let id: String = conn
                .xadd(
                    &stream,
                    "*",
                    &[("order_id", order.as_str()), ("amount", amount.as_str())],
                )
                .await
                .expect("XADD");
            id
        }
    };
    let mut resends = 0;
    for i in 0..ORDERS {
        let first = add(id(i), 100 + i as u64).await;
        if is_resend(i) {
            let again = add(id(i), 100 + i as u64).await;
            assert_ne!(first, again, "a resend is a new entry with a new id");
            resends += 1;
        }
    }
    for k in 0..POISON {
        add(poison_id(k), 1).await;
    }
    let stored: usize = conn.xlen(&stream).await.expect("XLEN");
    assert_eq!(stored, ORDERS + resends + POISON);

    // the first consumer reads a batch, does the work of every entry and dies before XACK
    let batch = crasher.read(&mut conn).await.expect("crasher reads");
    assert_eq!(batch.len(), CRASHED);
    let crashed_entries: HashSet<String> = batch.iter().map(|e| e.id().to_owned()).collect();
    futures_util::future::join_all(batch.into_iter().map(|e| {
        let (world, mut conn) = (world.clone(), conn.clone());
        let crasher = &crasher;
        async move { handle("crasher", crasher, &mut conn, e, &world, false).await }
    }))
    .await;
    drop(crasher);

    // two live consumers of the group
    let consumers = ["consumer-a", "consumer-b"]
        .map(|name| tokio::spawn(consume(name, stream.clone(), world.clone())));

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = world.business.ledger.applied();
        let dead: usize = conn.xlen(&dead_stream).await.expect("XLEN dead");
        let groups: StreamInfoGroupsReply = conn.xinfo_groups(&stream).await.expect("XINFO");
        let info: StreamInfoStreamReply = conn.xinfo_stream(&stream).await.expect("XINFO");
        let group = &groups.groups[0];
        let all_read = group.last_delivered_id == info.last_generated_id;
        if applied == ORDERS && dead == POISON && group.pending == 0 && all_read {
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
             {} pending, all read: {all_read}",
            group.pending
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // quiet past the claim threshold: nothing left to deliver
    let settled = world.log.lock().unwrap().len();
    tokio::time::sleep(CLAIM_IDLE * 2).await;
    assert_eq!(
        world.log.lock().unwrap().len(),
        settled,
        "deliveries after the group settled"
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
    let mut claimed_replays = 0; // the same entry again, claimed after its consumer died or lagged
    let mut resend_replays = 0; // another entry with the same business id
    let mut concurrent = 0; // in progress on another delivery
    let mut replayed_entries = HashSet::new();
    let mut resend_skipped = HashSet::new();
    let mut in_progress_orders = HashSet::new();
    for d in &log {
        let Some(winner) = executed_by.get(d.order.as_str()) else {
            continue;
        };
        match d.outcome {
            Outcome::Replayed if d.entry == winner.entry => {
                assert!(
                    d.deliveries > 1,
                    "a replay of the same entry is a claimed redelivery"
                );
                claimed_replays += 1;
                replayed_entries.insert(d.entry.clone());
            }
            Outcome::Replayed => {
                resend_replays += 1;
                resend_skipped.insert(d.order.clone());
            }
            Outcome::InProgress => {
                concurrent += 1;
                in_progress_orders.insert(d.order.clone());
            }
            Outcome::Executed | Outcome::Failed | Outcome::Exhausted => {}
        }
    }
    // every entry the crasher executed was claimed by a live consumer and replayed
    let mut crash_replayed = 0;
    for d in log
        .iter()
        .filter(|d| d.consumer == "crasher" && d.outcome == Outcome::Executed)
    {
        assert!(d.settled.is_none());
        assert!(
            replayed_entries.contains(&d.entry),
            "{}: executed by the dead consumer, claimed and replayed",
            d.order
        );
        crash_replayed += 1;
    }
    assert!(crash_replayed > 0, "the dead consumer executed entries");
    for d in log.iter().filter(|d| d.consumer != "crasher") {
        assert!(
            !crashed_entries.contains(&d.entry) || d.deliveries > 1,
            "{}: an abandoned entry comes back as a redelivery",
            d.entry
        );
    }
    let resent: HashSet<String> = (0..ORDERS).filter(|&i| is_resend(i)).map(id).collect();
    for r in &resent {
        let winner = executed_by[r.as_str()];
        assert!(
            log.iter().any(|d| &d.order == r
                && d.entry != winner.entry
                && d.outcome == Outcome::Replayed
                && d.settled == Some(Settled::Acked)),
            "{r}: the resend was replayed and acknowledged"
        );
    }
    assert!(
        resend_skipped.is_subset(&resent),
        "only resent orders have a second entry"
    );
    // a slow order handled by a live consumer is claimed while it works (the dead
    // consumer's slow order finished before anyone could claim it)
    for s in world
        .business
        .slow
        .iter()
        .filter(|s| executed_by[s.as_str()].consumer != "crasher")
    {
        assert!(
            in_progress_orders.contains(s),
            "{s}: claimed by a consumer while another worked on it: in progress"
        );
    }
    for d in log.iter().filter(|d| d.outcome == Outcome::InProgress) {
        assert!(matches!(d.settled, None | Some(Settled::Pending)));
    }

    assert_eq!(n(Outcome::Failed), world.business.flaky.len() + 3 * POISON);
    assert_eq!(
        n(Outcome::Exhausted),
        POISON,
        "each poison entry dead-lettered once"
    );
    let dead: Vec<redis::streams::StreamId> = conn
        .xrange_all::<_, redis::streams::StreamRangeReply>(&dead_stream)
        .await
        .expect("XRANGE dead")
        .ids;
    let dead_ids: HashSet<String> = dead
        .iter()
        .map(|e| {
            e.get::<String>("order_id")
                .expect("dead letters keep the fields")
        })
        .collect();
    assert_eq!(dead_ids, world.business.poison);
    assert!(dead.iter().all(|e| e.contains_key("dead.reason")));

    for name in ["consumer-a", "consumer-b"] {
        assert!(
            log.iter()
                .any(|d| d.consumer == name && d.outcome == Outcome::Executed),
            "{name} executed nothing"
        );
    }
    let duplicates = n(Outcome::Replayed) + n(Outcome::InProgress);
    assert_eq!(
        claimed_replays + resend_replays + concurrent,
        duplicates,
        "every duplicate explained"
    );
    println!(
        "Redis Streams: {ORDERS} orders + {POISON} poison added, {resends} resends with new entry ids; \
         {} deliveries: {} executed ({crash_replayed} by the consumer that died before XACK), \
         {} replayed ({claimed_replays} claimed redeliveries of a completed entry, {resend_replays} resends), \
         {concurrent} in progress, {} failed, {} exhausted (dead-lettered); {} effects applied; \
         per consumer: crasher {}, a {}, b {}; {:.1} s",
        log.len(),
        n(Outcome::Executed),
        n(Outcome::Replayed),
        n(Outcome::Failed),
        n(Outcome::Exhausted),
        effects.values().sum::<u32>(),
        log.iter().filter(|d| d.consumer == "crasher").count(),
        log.iter().filter(|d| d.consumer == "consumer-a").count(),
        log.iter().filter(|d| d.consumer == "consumer-b").count(),
        started.elapsed().as_secs_f64(),
    );

    let _: () = conn.del(&[&stream, &dead_stream]).await.expect("DEL");
}
