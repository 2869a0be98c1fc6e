//! The outbox conformance cases: one set of checks that proves an [`OutboxStore`] and
//! the transactions its rows are written in, with the [`Relay`] on top.
//!
//! Every case takes a fresh [`OutboxFixture`]: an empty outbox table of its own (so
//! cases can run in parallel on one server) and a way to write an execution's messages
//! in a transaction of the database. A case fails by panicking, as a test does.
//! [`outbox_conformance_suite!`](crate::outbox_conformance_suite) writes one
//! `#[tokio::test]` per case.

use super::support::unique_scope;
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::outbox::message::Outbox;
use crate::outbox::publisher::{MemoryPublisher, PublishErrorKind};
use crate::outbox::relay::Relay;
use crate::outbox::store::{ClaimedRow, OutboxStore, Retry, RowLease, RowStatus};
use crate::store::Fence;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// What the outbox cases need of a database.
#[async_trait]
pub trait OutboxFixture: Send + Sync {
    /// The empty outbox table of this case.
    fn store(&self) -> Arc<dyn OutboxStore>;

    /// Writes the messages of `outbox` in a new transaction of the database (with
    /// [`OutboxTransaction::enqueue_in_tx`](crate::outbox::OutboxTransaction::enqueue_in_tx)
    /// on the table of [`store`](Self::store)), then commits it when `commit`, else
    /// rolls it back. The error of the write, if any (the transaction is then rolled
    /// back).
    async fn write(&self, outbox: &Outbox, commit: bool) -> Result<(), StoreError>;

    /// Drops the table; called at the end of a case that passed.
    async fn drop_table(&self);
}

/// The long lease of the cases that do not wait for one to run out.
const LONG: Duration = Duration::from_secs(30);
/// The short lease and backoff of the cases that wait for them.
const SHORT: Duration = Duration::from_millis(300);
const HOUR: Duration = Duration::from_secs(3600);

/// An outbox bound to a new execution of a scope of its own.
fn execution(case: &str, key: &str) -> Outbox {
    let mut o = Outbox::new();
    o.bind(&RecordKey::new(&unique_scope(case), key).expect("valid key"));
    o
}

/// Writes and commits, panicking on an error.
async fn committed(f: &dyn OutboxFixture, o: &Outbox) {
    f.write(o, true).await.expect("writing the outbox");
}

/// The store of `f` with one message committed: its id.
async fn one_message(f: &dyn OutboxFixture, case: &str) -> (Arc<dyn OutboxStore>, Uuid) {
    let mut o = execution(case, "k");
    let id = o.emit("d", b"x".to_vec()).id();
    committed(f, &o).await;
    (f.store(), id)
}

fn ids(rows: &[ClaimedRow]) -> Vec<Uuid> {
    rows.iter().map(|r| r.lease.id).collect()
}

async fn pending_ids(s: &dyn OutboxStore) -> Vec<Uuid> {
    let page = s.list(RowStatus::Pending, None, 1000).await.unwrap();
    page.rows.iter().map(|r| r.message.id()).collect()
}

/// A rolled-back write leaves nothing; a committed one leaves every message pending,
/// as emitted (destination, payload, headers in order, ordering key, origin), in
/// emission order. Writing the same messages again, and an outbox with a mistake in
/// it, are errors that write nothing; an empty outbox writes nothing.
pub async fn written_in_the_transaction(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let mut o = execution("outbox-write", "order-1");
    o.emit("payments", b"{\"cents\":5}".to_vec())
        .header("content-type", "application/json")
        .header("x", "1")
        .header("x", "2")
        .ordering_key("customer-7");
    o.emit_named("receipt", "mail", Vec::new());
    o.emit("payments", vec![0, 159, 255]);
    f.write(&o, false).await.unwrap();
    assert!(pending_ids(&*s).await.is_empty(), "a rollback wrote rows");
    assert_eq!(s.stats().await.unwrap().pending(), 0);

    committed(&*f, &o).await;
    let page = s.list(RowStatus::Pending, None, 100).await.unwrap();
    assert_eq!(page.next, None);
    let got: Vec<_> = page.rows.iter().map(|r| r.message.clone()).collect();
    assert_eq!(
        got,
        o.messages(),
        "the rows hold the messages, in emission order"
    );
    for r in &page.rows {
        assert_eq!(r.status, RowStatus::Pending);
        assert_eq!(r.attempts, 0);
        assert_eq!(r.last_error, None);
        assert_eq!(r.leased_by, None);
        assert_eq!(r.due_in, Duration::ZERO);
        let origin = o.origin().unwrap();
        assert_eq!(r.origin_scope, origin.scope());
        assert_eq!(r.origin_key, origin.key());
    }
    assert!(page.rows.windows(2).all(|w| w[0].seq < w[1].seq));

    // the same execution's messages written twice: refused, nothing more written
    let e = f.write(&o, true).await.unwrap_err();
    assert_ne!(e.kind(), StoreErrorKind::Unavailable, "{e:?}");
    assert_eq!(pending_ids(&*s).await.len(), 3);

    // a mistake among the emissions, a bad destination: refused before any write
    let mut bad = execution("outbox-write", "order-2");
    bad.emit("", Vec::new());
    let e = f.write(&bad, true).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e:?}");
    let mut long = execution("outbox-write", "order-3");
    long.emit("d".repeat(600), Vec::new());
    let e = f.write(&long, true).await.unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e:?}");
    assert!(e.to_string().contains("600 bytes"), "{e}");
    f.write(&execution("outbox-write", "order-4"), true)
        .await
        .unwrap();
    assert_eq!(pending_ids(&*s).await.len(), 3);
    f.drop_table().await;
}

/// Claimers racing on one table never claim a row twice, and between them claim
/// every row.
pub async fn concurrent_claims_are_disjoint(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let mut all = HashSet::new();
    for e in 0..10 {
        let mut o = execution("outbox-race", &format!("e-{e}"));
        for i in 0..20 {
            let m = o.emit("d", vec![i]);
            all.insert(m.id());
        }
        committed(&*f, &o).await;
    }
    let claimers = (0..4).map(|c| {
        let s = s.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let rows = s.claim_due(&format!("relay-{c}"), 7, LONG).await.unwrap();
                if rows.is_empty() {
                    return mine;
                }
                mine.extend(ids(&rows));
            }
        })
    });
    let mut seen = HashSet::new();
    for c in futures_util::future::join_all(claimers).await {
        for id in c.unwrap() {
            assert!(seen.insert(id), "{id} was claimed twice");
        }
    }
    assert_eq!(seen, all, "every row was claimed");
    f.drop_table().await;
}

/// A lease that runs out hands the row to another relay, with a larger fencing
/// token; the first relay's marks are then fenced out, the second's apply (and a
/// mark-sent repeated by it is still Held).
pub async fn lease_expiry_hands_over_and_fences(f: Arc<dyn OutboxFixture>) {
    let (s, id) = one_message(&*f, "outbox-lease").await;
    let first = s.claim_due("a", 10, SHORT).await.unwrap();
    assert_eq!(ids(&first), [id]);
    assert!(s.claim_due("b", 10, SHORT).await.unwrap().is_empty());
    assert!(s.claim_ids("b", &[id], SHORT).await.unwrap().is_empty());
    let listed = s.list(RowStatus::Pending, None, 10).await.unwrap();
    assert_eq!(listed.rows[0].leased_by.as_deref(), Some("a"));
    tokio::time::sleep(SHORT + Duration::from_millis(150)).await;
    let second = s.claim_due("b", 10, LONG).await.unwrap();
    assert_eq!(ids(&second), [id]);
    let (a, b) = (first[0].lease, second[0].lease);
    assert!(b.fence > a.fence, "{b:?} after {a:?}");
    assert_eq!(s.mark_sent(&[a]).await.unwrap(), [Fence::Lost]);
    assert_eq!(
        s.mark_failed(&a, "late", Retry::Dead).await.unwrap(),
        Fence::Lost
    );
    assert_eq!(s.mark_sent(&[b]).await.unwrap(), [Fence::Held]);
    assert_eq!(s.mark_sent(&[b]).await.unwrap(), [Fence::Held], "repeated");
    assert_eq!(
        s.mark_sent(&[a, b]).await.unwrap(),
        [Fence::Lost, Fence::Held]
    );
    assert!(s.claim_due("c", 10, LONG).await.unwrap().is_empty());
    let sent = s.list(RowStatus::Sent, None, 10).await.unwrap();
    assert_eq!(sent.rows.len(), 1);
    f.drop_table().await;
}

/// Rows of one ordering key are claimed one at a time, in emission order across
/// executions, while other keys and rows without a key proceed; a failed row holds
/// its key back while it is pending, a dead row does not.
pub async fn order_per_key_while_other_keys_proceed(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let mut one = execution("outbox-order", "e1");
    let a = one.emit("d", b"a".to_vec()).ordering_key("k1").id();
    let b = one.emit("d", b"b".to_vec()).ordering_key("k1").id();
    let c = one.emit("d", b"c".to_vec()).ordering_key("k2").id();
    let d = one.emit("d", b"d".to_vec()).id();
    let g = one.emit("d", b"g".to_vec()).ordering_key("k3").id();
    let h = one.emit("d", b"h".to_vec()).ordering_key("k3").id();
    committed(&*f, &one).await;
    let mut two = execution("outbox-order", "e2");
    let e = two.emit("d", b"e".to_vec()).ordering_key("k1").id();
    let k2_later = two.emit("d", b"f".to_vec()).ordering_key("k2").id();
    committed(&*f, &two).await;

    let first = s.claim_due("r", 100, LONG).await.unwrap();
    assert_eq!(ids(&first), [a, c, d, g], "the head of each key, and d");
    let lease = |rows: &[ClaimedRow], id: Uuid| -> RowLease {
        rows.iter().find(|r| r.lease.id == id).unwrap().lease
    };
    assert_eq!(
        s.mark_sent(&[lease(&first, a)]).await.unwrap(),
        [Fence::Held]
    );
    let failed = s
        .mark_failed(&lease(&first, c), "broker down", Retry::After(HOUR))
        .await
        .unwrap();
    assert_eq!(failed, Fence::Held);
    let dead = s
        .mark_failed(&lease(&first, g), "too large", Retry::Dead)
        .await
        .unwrap();
    assert_eq!(dead, Fence::Held);
    // b is next of k1; k2's later row waits behind c (pending, backing off); d is
    // leased; the dead g does not hold h back
    let second = s.claim_due("r", 100, LONG).await.unwrap();
    assert_eq!(ids(&second), [b, h]);
    assert!(
        s.claim_ids("r", &[e, k2_later], LONG)
            .await
            .unwrap()
            .is_empty(),
        "rows behind a pending row of their key are not claimable by id either"
    );
    s.mark_sent(&[lease(&second, b)]).await.unwrap();
    let third = s.claim_due("r", 100, LONG).await.unwrap();
    assert_eq!(ids(&third), [e]);
    f.drop_table().await;
}

/// A failed row is due again after its backoff, with its attempts counted and its
/// last error kept; a row marked dead is never claimed and is listed as dead.
pub async fn failures_back_off_then_die(f: Arc<dyn OutboxFixture>) {
    let (s, id) = one_message(&*f, "outbox-backoff").await;
    let mut attempts = 0;
    for round in 0..2 {
        let rows = s.claim_due("r", 10, LONG).await.unwrap();
        assert_eq!(ids(&rows), [id], "round {round}");
        assert_eq!(rows[0].attempts, attempts);
        let fence = s
            .mark_failed(
                &rows[0].lease,
                &format!("failure {round}"),
                Retry::After(SHORT),
            )
            .await
            .unwrap();
        assert_eq!(fence, Fence::Held);
        attempts += 1;
        assert!(
            s.claim_due("r", 10, LONG).await.unwrap().is_empty(),
            "claimable during its backoff"
        );
        let listed = s.list(RowStatus::Pending, None, 10).await.unwrap();
        assert_eq!(listed.rows[0].attempts, attempts);
        assert_eq!(
            listed.rows[0].last_error.as_deref(),
            Some(&*format!("failure {round}"))
        );
        assert!(listed.rows[0].due_in > Duration::ZERO);
        tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    }
    let rows = s.claim_due("r", 10, LONG).await.unwrap();
    assert_eq!(rows[0].attempts, 2);
    let long_error = "é".repeat(5000);
    let fence = s
        .mark_failed(&rows[0].lease, &long_error, Retry::Dead)
        .await
        .unwrap();
    assert_eq!(fence, Fence::Held);
    assert_eq!(
        s.mark_failed(&rows[0].lease, &long_error, Retry::Dead)
            .await
            .unwrap(),
        Fence::Held,
        "a dead mark repeated by its claim"
    );
    assert!(s.claim_due("r", 10, LONG).await.unwrap().is_empty());
    assert!(s.claim_ids("r", &[id], LONG).await.unwrap().is_empty());
    let dead = s.list(RowStatus::Dead, None, 10).await.unwrap();
    assert_eq!(dead.rows.len(), 1);
    assert_eq!(dead.rows[0].attempts, 3);
    let kept = dead.rows[0].last_error.clone().unwrap();
    assert!(
        kept.len() <= 2000 && kept.chars().all(|c| c == 'é'),
        "{}",
        kept.len()
    );
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending(), stats.dead()), (0, 1));
    f.drop_table().await;
}

/// An operator's retry puts a dead row back to pending, due at once, attempts from
/// zero; it answers `false` for a row that is not dead.
pub async fn retry_dead_makes_it_pending(f: Arc<dyn OutboxFixture>) {
    let (s, id) = one_message(&*f, "outbox-retry").await;
    assert!(!s.retry_dead(id).await.unwrap(), "a pending row");
    let rows = s.claim_due("r", 10, LONG).await.unwrap();
    s.mark_failed(&rows[0].lease, "rejected", Retry::Dead)
        .await
        .unwrap();
    assert!(s.retry_dead(id).await.unwrap());
    assert!(!s.retry_dead(id).await.unwrap(), "already pending");
    assert!(
        !s.retry_dead(Uuid::from_u128(7)).await.unwrap(),
        "no such row"
    );
    let listed = s.list(RowStatus::Pending, None, 10).await.unwrap();
    assert_eq!(listed.rows[0].attempts, 0);
    let again = s.claim_due("r", 10, LONG).await.unwrap();
    assert_eq!(ids(&again), [id]);
    assert!(again[0].lease.fence > rows[0].lease.fence);
    assert_eq!(s.mark_sent(&[again[0].lease]).await.unwrap(), [Fence::Held]);
    f.drop_table().await;
}

/// Sent rows older than the retention are deleted, in batches; newer sent rows and
/// pending rows stay.
pub async fn purge_deletes_old_sent_rows(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let mut old = execution("outbox-purge", "old");
    for i in 0..5 {
        old.emit("d", vec![i]);
    }
    committed(&*f, &old).await;
    let rows = s.claim_due("r", 4, LONG).await.unwrap();
    let leases: Vec<RowLease> = rows.iter().map(|r| r.lease).collect();
    s.mark_sent(&leases).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut new = execution("outbox-purge", "new");
    let fresh = new.emit("d", b"n".to_vec()).id();
    committed(&*f, &new).await;
    let rows = s.claim_ids("r", &[fresh], LONG).await.unwrap();
    s.mark_sent(&[rows[0].lease]).await.unwrap();

    assert_eq!(s.purge_sent(HOUR, 2).await.unwrap(), 0, "none that old");
    assert_eq!(
        s.purge_sent(Duration::from_millis(300), 3).await.unwrap(),
        4,
        "in batches of 3"
    );
    assert_eq!(
        s.purge_sent(Duration::from_millis(300), 3).await.unwrap(),
        0
    );
    let sent = s.list(RowStatus::Sent, None, 10).await.unwrap();
    assert_eq!(
        sent.rows.iter().map(|r| r.message.id()).collect::<Vec<_>>(),
        [fresh]
    );
    assert_eq!(pending_ids(&*s).await.len(), 1, "the pending row stays");
    f.drop_table().await;
}

/// Statistics per destination: pending, dead and sent rows and the age of the oldest
/// pending row.
pub async fn stats_per_destination(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    assert_eq!(s.stats().await.unwrap().destinations, []);
    let mut o = execution("outbox-stats", "k");
    o.emit("alpha", Vec::new());
    o.emit("alpha", Vec::new());
    let b1 = o.emit("beta", Vec::new()).id();
    let b2 = o.emit("beta", Vec::new()).id();
    o.emit("beta", Vec::new());
    committed(&*f, &o).await;
    let rows = s.claim_ids("r", &[b1, b2], LONG).await.unwrap();
    s.mark_sent(&[rows[0].lease]).await.unwrap();
    s.mark_failed(&rows[1].lease, "no", Retry::Dead)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = s.stats().await.unwrap();
    let by: BTreeMap<_, _> = stats
        .destinations
        .iter()
        .map(|d| (d.destination.as_str(), (d.pending, d.dead, d.sent)))
        .collect();
    assert_eq!(
        by,
        BTreeMap::from([("alpha", (2, 0, 0)), ("beta", (1, 1, 1))])
    );
    let oldest = stats.oldest_pending().unwrap();
    assert!(
        oldest >= Duration::from_millis(150) && oldest < Duration::from_secs(60),
        "{oldest:?}"
    );
    assert_eq!((stats.pending(), stats.dead(), stats.sent()), (3, 1, 1));
    f.drop_table().await;
}

/// Listing pages through the rows of a status in emission order.
pub async fn list_pages_in_emission_order(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let mut o = execution("outbox-list", "k");
    let mut all = Vec::new();
    for i in 0..7 {
        all.push(o.emit("d", vec![i]).id());
    }
    committed(&*f, &o).await;
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = s.list(RowStatus::Pending, after, 3).await.unwrap();
        pages += 1;
        assert!(page.rows.len() <= 3);
        seen.extend(page.rows.iter().map(|r| r.message.id()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, all);
    assert_eq!(pages, 3);
    assert!(
        s.list(RowStatus::Dead, None, 3)
            .await
            .unwrap()
            .rows
            .is_empty()
    );
    f.drop_table().await;
}

/// The fast path after a commit publishes the execution's messages at once, in order
/// per key; what fails is left to the loop, which publishes it after its backoff.
pub async fn dispatch_publishes_an_execution_at_once(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let broker = Arc::new(MemoryPublisher::new());
    let relay = Relay::shared(s.clone(), broker.clone())
        .backoff(Duration::from_millis(50), Duration::from_millis(50));
    let mut o = execution("outbox-dispatch", "k");
    for i in 0..3 {
        o.emit("d", vec![i]).ordering_key("same");
    }
    o.emit("other", b"x".to_vec());
    committed(&*f, &o).await;
    let pass = relay.dispatch(&o).await.unwrap();
    assert_eq!(pass.sent, 4, "{pass:?}");
    let emitted: Vec<Uuid> = o.messages().iter().map(|m| m.id()).collect();
    let published: Vec<Uuid> = broker.published().iter().map(|m| m.id()).collect();
    let same: Vec<Uuid> = published
        .iter()
        .copied()
        .filter(|id| emitted[..3].contains(id))
        .collect();
    assert_eq!(same, emitted[..3], "in emission order");
    assert_eq!(relay.dispatch(&o).await.unwrap().sent, 0, "already sent");

    // a failure: the rest of that key waits for the loop
    let mut o2 = execution("outbox-dispatch", "k2");
    for i in 0..3 {
        o2.emit("d", vec![i]).ordering_key("same");
    }
    committed(&*f, &o2).await;
    broker.fail_next(1, PublishErrorKind::Unavailable);
    let pass = relay.dispatch(&o2).await.unwrap();
    assert_eq!((pass.sent, pass.failed), (0, 1), "{pass:?}");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let drained = relay.drain().await.unwrap();
    assert_eq!(drained.sent, 3, "{drained:?}");
    assert_eq!(broker.published().len(), 7);
    assert_eq!(broker.repeats(), 0);
    f.drop_table().await;
}

/// Rows the broker rejects are dead after the relay's attempt limit and published
/// after an operator's retry.
pub async fn relay_marks_rejected_rows_dead(f: Arc<dyn OutboxFixture>) {
    let (s, id) = one_message(&*f, "outbox-rejected").await;
    let broker = Arc::new(MemoryPublisher::new());
    let relay = Relay::shared(s.clone(), broker.clone())
        .max_attempts(2)
        .backoff(Duration::from_millis(20), Duration::from_millis(20));
    broker.fail_next(2, PublishErrorKind::Rejected);
    assert_eq!(relay.run_once().await.unwrap().failed, 1);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let pass = relay.run_once().await.unwrap();
    assert_eq!((pass.failed, pass.dead), (1, 1), "{pass:?}");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(relay.drain().await.unwrap().claimed, 0, "dead rows stay");
    assert!(broker.published().is_empty());
    assert_eq!(relay.report_stats().await.unwrap().dead(), 1);
    assert!(s.retry_dead(id).await.unwrap());
    assert_eq!(relay.drain().await.unwrap().sent, 1);
    assert_eq!(broker.published()[0].id(), id);
    f.drop_table().await;
}

/// Two relays and the fast path, racing on one table while the broker fails now and
/// then: every message is published exactly once (by id), each ordering key in
/// emission order, and nothing is left pending or dead.
pub async fn relays_publish_everything_once_under_failures(f: Arc<dyn OutboxFixture>) {
    let s = f.store();
    let broker = Arc::new(MemoryPublisher::new());
    let relay = |name: &str| {
        Relay::shared(s.clone(), broker.clone())
            .name(name)
            .batch_size(8)
            .backoff(Duration::from_millis(5), Duration::from_millis(20))
    };
    let (r1, r2) = (relay("r1"), relay("r2"));
    let mut emitted: Vec<(Uuid, Option<String>)> = Vec::new();
    let mut executions = Vec::new();
    for e in 0..6 {
        let mut o = execution("outbox-relays", &format!("e-{e}"));
        for i in 0..15u8 {
            let key = (i % 3 != 0).then(|| format!("k{}", i % 4));
            let m = o.emit(format!("dest-{}", i % 2), vec![e, i]);
            let m = match &key {
                Some(k) => m.ordering_key(k.clone()),
                None => m,
            };
            emitted.push((m.id(), key));
        }
        committed(&*f, &o).await;
        executions.push(o);
    }
    broker.fail_next(5, PublishErrorKind::Unavailable);
    let dispatcher = relay("fast");
    let run = |r: Relay| {
        let broker = broker.clone();
        tokio::spawn(async move {
            for round in 0..200 {
                if round == 3 {
                    broker.fail_next(4, PublishErrorKind::Unavailable);
                }
                let pass = r.run_once().await.unwrap();
                if pass.claimed == 0 {
                    let stats = r.store().stats().await.unwrap();
                    if stats.pending() == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            panic!("the relay did not drain the table");
        })
    };
    let (a, b) = (run(r1), run(r2));
    for o in &executions[..2] {
        dispatcher.dispatch(o).await.unwrap();
    }
    a.await.unwrap();
    b.await.unwrap();
    let published = broker.published();
    let got: HashSet<Uuid> = published.iter().map(|m| m.id()).collect();
    let want: HashSet<Uuid> = emitted.iter().map(|(id, _)| *id).collect();
    assert_eq!(got, want, "every message published");
    assert_eq!(published.len(), emitted.len(), "each once");
    assert_eq!(broker.repeats(), 0, "none published twice");
    for k in ["k1", "k2", "k3"] {
        let want: Vec<Uuid> = emitted
            .iter()
            .filter(|(_, key)| key.as_deref() == Some(k))
            .map(|(id, _)| *id)
            .collect();
        let got: Vec<Uuid> = published
            .iter()
            .filter(|m| m.ordering_key() == Some(k))
            .map(|m| m.id())
            .collect();
        assert_eq!(got, want, "key {k} in emission order");
    }
    let stats = s.stats().await.unwrap();
    assert_eq!(
        (stats.pending(), stats.dead(), stats.sent()),
        (0, 0, emitted.len() as u64)
    );
    f.drop_table().await;
}

/// One `#[tokio::test]` per outbox case ([`outbox`](crate::testing::conformance::outbox)),
/// each with a fixture from `$make` (an expression, usually an `async` block,
/// evaluating to a future of `Arc<dyn OutboxFixture>`, a fresh table each time). Needs
/// `tokio` with the `macros` and `rt-multi-thread` features in the calling crate.
#[macro_export]
macro_rules! outbox_conformance_suite {
    ($make:expr) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn written_in_the_transaction() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::written_in_the_transaction(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_claims_are_disjoint() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::concurrent_claims_are_disjoint(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn lease_expiry_hands_over_and_fences() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::lease_expiry_hands_over_and_fences(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn order_per_key_while_other_keys_proceed() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::order_per_key_while_other_keys_proceed(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failures_back_off_then_die() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::failures_back_off_then_die(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retry_dead_makes_it_pending() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::retry_dead_makes_it_pending(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn purge_deletes_old_sent_rows() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::purge_deletes_old_sent_rows(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn stats_per_destination() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::stats_per_destination(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn list_pages_in_emission_order() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::list_pages_in_emission_order(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn dispatch_publishes_an_execution_at_once() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::dispatch_publishes_an_execution_at_once(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn relay_marks_rejected_rows_dead() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::relay_marks_rejected_rows_dead(f).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn relays_publish_everything_once_under_failures() {
            let f: ::std::sync::Arc<dyn $crate::testing::conformance::outbox::OutboxFixture> =
                $make.await;
            $crate::testing::conformance::outbox::relays_publish_everything_once_under_failures(f)
                .await;
        }
    };
}
