//! A two-stage pipeline through the transactional outbox, in which every kind of
//! duplicate and failure between the stages happens, and each order is paid once.
//!
//! ```text
//!            orders                               payments
//! producer ─────────▶ stage 1 ──▶ outbox table ──────────────▶ stage 2
//!                     (SQLite)    dispatch, relay               (SQLite)
//! ```
//!
//! - **Stage 1** consumes orders with
//!   `#[idempotent(key = "order.id", tx = "tx", outbox = "outbox")]`. It writes the
//!   order row and emits a payment message. Both are written in the transaction that
//!   also holds the dedup row, so they commit or roll back together. Right after the
//!   commit, the worker publishes what it emitted (`Relay::dispatch`).
//! - **The relay** publishes whatever dispatch left behind: the rows of a worker that
//!   crashed between commit and dispatch, rows the broker refused during an outage,
//!   and rows of a relay that died in the middle of a publish.
//! - **Stage 2** consumes payments with `#[idempotent]` keyed by the message id. The
//!   outbox derives that id from the order id, so it is the same on every publish of
//!   the message: a payment published twice is recorded once.
//!
//! The brokers are in-process queues that deliver at least once: a message that was
//! not acknowledged is delivered again. The database is one SQLite file in a temporary
//! directory. One order meets each kind of trouble. The program prints a line for each
//! event, then checks three things: every order was paid exactly once, nothing was
//! lost, and nothing is left pending in the outbox. It exits with an error if any check
//! fails.
//!
//! Run it with `cargo run --example pipeline`.

use async_trait::async_trait;
use idempotent_runtime::outbox::{
    DEFAULT_OUTBOX_TABLE, Emission, Outbox, OutboxStore, OutgoingMessage, PublishError,
    PublishErrorKind, Publisher, Relay, RowStatus, Uuid, message_id,
};
use idempotent_runtime::sqlx::{self, Sqlite, SqlitePool, Transaction};
use idempotent_runtime::{Error, RecordKey, SqliteStore, idempotent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const ORDERS: usize = 60;
/// How long a relay keeps the rows it claimed (another relay takes them over after).
const LEASE: Duration = Duration::from_millis(300);
/// The backoff after a failed publish: this, doubled at each failure after the first.
const BACKOFF: Duration = Duration::from_millis(200);

/// What goes wrong, and to which order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Trouble {
    /// The producer did not get its send acknowledged, so it sends the order again.
    ProducerResend,
    /// Stage 1 committed and dispatched, but its ack was lost: the broker redelivers.
    LostAck,
    /// Stage 1 crashed after its commit, before dispatch and before its ack.
    CrashAfterCommit,
    /// Between stage 1's commit and its dispatch, another relay claimed the row,
    /// published it, and died before marking it sent.
    RelayDiesAfterPublish,
    /// The handler fails on its first try: the transaction rolls back, and the broker
    /// redelivers the order.
    FailsOnce,
    /// The payments broker is down for two publishes: dispatch fails, and the relay
    /// retries with backoff.
    BrokerDown,
}

const TROUBLES: [(usize, Trouble); 6] = [
    (7, Trouble::ProducerResend),
    (13, Trouble::LostAck),
    (21, Trouble::CrashAfterCommit),
    (34, Trouble::RelayDiesAfterPublish),
    (42, Trouble::FailsOnce),
    (55, Trouble::BrokerDown),
];

// ------------------------------------------------------------------ the handlers

#[derive(Clone, Debug)]
struct Order {
    id: String,
    customer: String,
    cents: i64,
}

/// The payment message stage 1 emits, as JSON.
#[derive(Serialize, Deserialize)]
struct PaymentRequest {
    order_id: String,
    cents: i64,
}

/// A payment as stage 2 receives it: the id comes from the broker's dedup field, and
/// the rest from the payload.
struct Payment {
    message_id: String,
    order_id: String,
    cents: i64,
}

/// Stage 1's result, which `#[idempotent]` caches and replays to duplicates.
#[derive(Debug, Serialize, Deserialize)]
struct Accepted {
    payment_id: String,
}

/// Stage 2's result.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    payment_row: i64,
}

#[derive(Debug)]
enum AppError {
    /// The dedup layer said no.
    Idempotency(Error),
    Database(sqlx::Error),
    Json(serde_json::Error),
    /// The inventory service timed out; a redelivery retries.
    InventoryTimeout,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Database(e)
    }
}

impl From<serde_json::Error> for AppError {
    fn from(e: serde_json::Error) -> Self {
        AppError::Json(e)
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Idempotency(e) => write!(f, "{e}"),
            AppError::Database(e) => write!(f, "database: {e}"),
            AppError::Json(e) => write!(f, "payload: {e}"),
            AppError::InventoryTimeout => f.write_str("the inventory service timed out"),
        }
    }
}

impl std::error::Error for AppError {}

/// Stage 1: accepts an order and asks for its payment. The order row, the payment
/// message and the dedup row are written in `tx`: all three commit, or none does.
#[idempotent(key = "order.id", scope = "orders", tx = "tx", outbox = "outbox")]
async fn accept_order(
    order: &Order,
    tx: &mut Transaction<'_, Sqlite>,
    outbox: &mut Outbox,
    inventory: &Inventory,
) -> Result<Accepted, AppError> {
    sqlx::query("INSERT INTO orders (id, customer, cents) VALUES (?, ?, ?)")
        .bind(&order.id)
        .bind(&order.customer)
        .bind(order.cents)
        .execute(&mut **tx)
        .await?;
    let request = PaymentRequest {
        order_id: order.id.clone(),
        cents: order.cents,
    };
    // The id is derived from the scope ("orders"), the key (the order id) and the
    // emission (the first one): every execution for this order emits this same id.
    let payment_id = outbox
        .emit("payments", serde_json::to_vec(&request)?)
        .header("content-type", "application/json")
        .ordering_key(order.customer.clone())
        .id();
    inventory.reserve(&order.id)?;
    Ok(Accepted {
        payment_id: payment_id.to_string(),
    })
}

/// Stage 2: records a payment, keyed by the id the outbox gave the message. The
/// `payments` table has no unique constraint, so a payment recorded twice would show.
#[idempotent(key = "payment.message_id", scope = "payments", tx = "tx")]
async fn record_payment(
    payment: &Payment,
    tx: &mut Transaction<'_, Sqlite>,
    runs: &AtomicU64,
) -> Result<Recorded, AppError> {
    runs.fetch_add(1, Ordering::Relaxed);
    let done = sqlx::query("INSERT INTO payments (order_id, cents, message_id) VALUES (?, ?, ?)")
        .bind(&payment.order_id)
        .bind(payment.cents)
        .bind(&payment.message_id)
        .execute(&mut **tx)
        .await?;
    Ok(Recorded {
        payment_row: done.last_insert_rowid(),
    })
}

/// The inventory service stage 1 calls. It times out once for the orders in `flaky`,
/// and it counts its calls, which are the runs of stage 1's body that got that far.
#[derive(Default)]
struct Inventory {
    flaky: Mutex<HashSet<String>>,
    calls: AtomicU64,
}

impl Inventory {
    fn reserve(&self, order: &str) -> Result<(), AppError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.flaky.lock().unwrap().remove(order) {
            return Err(AppError::InventoryTimeout);
        }
        Ok(())
    }
}

/// The id of the payment message of `order`, as stage 1's outbox derives it. Any
/// service can compute it, so the program checks with it that the ids are stable.
fn payment_id(order: &str) -> Uuid {
    let key = RecordKey::new("orders", order).expect("a valid key");
    message_id(&key, Emission::Position(0))
}

// ------------------------------------------------------------------ the brokers

/// An in-process broker queue that delivers at least once. A received message stays
/// unacknowledged until [`ack`](Self::ack). [`nack`](Self::nack) puts it back at once.
/// [`redeliver_unacked`](Self::redeliver_unacked), the broker's ack timeout, puts back
/// every message whose ack never came.
#[derive(Debug)]
struct Queue<T> {
    state: Mutex<QueueState<T>>,
}

#[derive(Debug)]
struct QueueState<T> {
    ready: VecDeque<T>,
    unacked: BTreeMap<u64, T>,
    next_tag: u64,
    deliveries: u64,
}

struct Delivery<T> {
    tag: u64,
    msg: T,
}

impl<T: Clone> Queue<T> {
    fn new() -> Self {
        Queue {
            state: Mutex::new(QueueState {
                ready: VecDeque::new(),
                unacked: BTreeMap::new(),
                next_tag: 0,
                deliveries: 0,
            }),
        }
    }

    fn send(&self, msg: T) {
        self.state.lock().unwrap().ready.push_back(msg);
    }

    fn receive(&self) -> Option<Delivery<T>> {
        let mut s = self.state.lock().unwrap();
        let msg = s.ready.pop_front()?;
        s.next_tag += 1;
        s.deliveries += 1;
        let tag = s.next_tag;
        s.unacked.insert(tag, msg.clone());
        Some(Delivery { tag, msg })
    }

    fn ack(&self, tag: u64) {
        self.state.lock().unwrap().unacked.remove(&tag);
    }

    fn nack(&self, tag: u64) {
        let mut s = self.state.lock().unwrap();
        if let Some(msg) = s.unacked.remove(&tag) {
            s.ready.push_back(msg);
        }
    }

    /// Puts the unacknowledged messages back: how many.
    fn redeliver_unacked(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        let unacked = std::mem::take(&mut s.unacked);
        let n = unacked.len();
        s.ready.extend(unacked.into_values());
        n
    }

    fn deliveries(&self) -> u64 {
        self.state.lock().unwrap().deliveries
    }
}

/// The broker between the stages: a publish puts the message into stage 2's queue.
///
/// It has no dedup of its own (or its dedup window has passed), so a message published
/// twice is delivered twice, and stage 2's `#[idempotent]` is what makes the repeat
/// harmless. It can be made to fail its next publishes (an outage), or to take the next
/// message and never confirm it, as when the relay publishing it dies.
#[derive(Debug)]
struct PaymentsBroker {
    queue: Queue<OutgoingMessage>,
    faults: Mutex<BrokerFaults>,
    /// Signalled when a publish took its message and will never return.
    hung: Notify,
}

#[derive(Debug, Default)]
struct BrokerFaults {
    fail_next: u32,
    hang_next: bool,
}

impl PaymentsBroker {
    fn fail_next(&self, n: u32) {
        self.faults.lock().unwrap().fail_next = n;
    }

    fn hang_after_next_publish(&self) {
        self.faults.lock().unwrap().hang_next = true;
    }
}

#[async_trait]
impl Publisher for PaymentsBroker {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        let hang = {
            let mut f = self.faults.lock().unwrap();
            if f.fail_next > 0 {
                f.fail_next -= 1;
                return Err(PublishError::new(
                    PublishErrorKind::Unavailable,
                    "the payments broker does not answer",
                ));
            }
            std::mem::take(&mut f.hang_next)
        };
        // A real publisher puts message.id() in the broker's dedup field (Nats-Msg-Id,
        // the RabbitMQ message_id, …). Here the whole message travels.
        self.queue.send(message.clone());
        if hang {
            // The broker has the message, but the publisher never gets its confirmation.
            self.hung.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ the pipeline

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Prints one event, `who` in a column of its own.
fn say(who: &str, what: impl std::fmt::Display) {
    println!("  {who:<10} {what}");
}

/// The first 8 hex digits of a message id, enough to tell the messages apart here.
fn short(id: impl std::fmt::Display) -> String {
    id.to_string().chars().take(8).collect()
}

#[derive(Default)]
struct Counts {
    resends: u64,
    stage1_replays: u64,
    rollbacks: u64,
    dispatched: u64,
    dispatch_failed: u64,
    relayed: u64,
    relay_failed: u64,
    stage2_replays: u64,
}

struct Pipeline {
    pool: SqlitePool,
    orders: Queue<Order>,
    broker: Arc<PaymentsBroker>,
    /// The outbox table, for the relays and for the operator's view of it.
    outbox: Arc<dyn OutboxStore>,
    /// The fast path of stage 1's worker, right after each commit.
    dispatcher: Relay,
    /// The relay loop of another stage-1 process: it dies in the middle of a publish.
    relay_1: Relay,
    /// The relay loop that publishes whatever is left.
    relay_2: Relay,
    inventory: Inventory,
    stage2_runs: AtomicU64,
    troubles: HashMap<String, Trouble>,
    /// The troubles whose handling was seen to the end.
    met: BTreeSet<Trouble>,
    counts: Counts,
}

impl Pipeline {
    fn trouble(&self, order: &str) -> Option<Trouble> {
        self.troubles.get(order).copied()
    }

    /// The producer sends an order; the order of [`Trouble::ProducerResend`] is sent
    /// twice.
    fn produce(&mut self, order: Order) {
        if self.trouble(&order.id) == Some(Trouble::ProducerResend) {
            self.orders.send(order.clone());
            self.counts.resends += 1;
        }
        self.orders.send(order);
    }

    /// Stage 1's worker, until the orders queue is empty and every delivery was
    /// acknowledged. When an ack is missing, the broker's ack timeout redelivers the
    /// message.
    async fn run_stage1(&mut self) -> Fallible<()> {
        loop {
            while let Some(d) = self.orders.receive() {
                self.stage1(d).await?;
            }
            if self.orders.redeliver_unacked() == 0 {
                return Ok(());
            }
        }
    }

    /// Stage 1's worker, one delivery: begin, run the handler, commit, dispatch, ack.
    /// The lines marked TROUBLE are where this program makes things go wrong.
    async fn stage1(&mut self, d: Delivery<Order>) -> Fallible<()> {
        let order = &d.msg;
        let trouble = self.trouble(&order.id);
        // SQLite: take the write lock at BEGIN (see the README's Transactional mode)
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut outbox = Outbox::new();
        let accepted = match accept_order(order, &mut tx, &mut outbox, &self.inventory).await {
            Ok(accepted) => accepted,
            Err(AppError::InventoryTimeout) => {
                tx.rollback().await?;
                self.counts.rollbacks += 1;
                // Nothing of the failed run is anywhere: the attribute emptied the
                // outbox, and the rollback took the order row with it.
                let order_rows = self.order_rows(&order.id).await?;
                let pending = self.outbox.stats().await?.pending();
                say(
                    &order.id,
                    format_args!(
                        "the inventory service timed out: rolled back ({order_rows} order \
                         rows, {} messages emitted, {pending} pending in the outbox); nacked",
                        outbox.messages().len()
                    ),
                );
                self.orders.nack(d.tag);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;

        if outbox.is_empty() {
            // A duplicate. The attribute found the committed dedup row and answered
            // with its cached result: the body did not run, and nothing was emitted.
            self.counts.stage1_replays += 1;
            let why = match trouble {
                Some(Trouble::ProducerResend) => "the producer's resend",
                Some(Trouble::LostAck) => "redelivered after its lost ack",
                Some(Trouble::CrashAfterCommit) => "redelivered to the restarted worker",
                _ => "a duplicate",
            };
            say(
                &order.id,
                format_args!(
                    "{why}: answered from stage 1's dedup row (payment {}), nothing emitted",
                    short(&accepted.payment_id)
                ),
            );
            if let Some(t @ (Trouble::ProducerResend | Trouble::LostAck)) = trouble {
                self.met.insert(t);
            }
            self.orders.ack(d.tag);
            return Ok(());
        }

        let id = outbox.messages()[0].id();
        match trouble {
            Some(Trouble::FailsOnce) => {
                say(
                    &order.id,
                    format_args!(
                        "redelivered: committed, with payment {}, the id \
                         message_id(\"orders\", \"{}\", 0) that every run of it emits",
                        short(id),
                        order.id
                    ),
                );
                if id == payment_id(&order.id) {
                    self.met.insert(Trouble::FailsOnce);
                }
            }
            Some(Trouble::CrashAfterCommit) => {
                // TROUBLE: the worker dies here, so there is no dispatch and no ack.
                say(
                    &order.id,
                    format_args!(
                        "committed, then the worker crashed before dispatch: payment {} \
                         waits in the outbox",
                        short(id)
                    ),
                );
                return Ok(());
            }
            Some(Trouble::RelayDiesAfterPublish) => {
                self.relay_1_dies_mid_publish(&order.id, id).await?
            }
            // TROUBLE: the payments broker goes down.
            Some(Trouble::BrokerDown) => self.broker.fail_next(2),
            _ => {}
        }

        // The fast path: publish what this run emitted, now that it is committed.
        let pass = self.dispatcher.dispatch(&outbox).await?;
        self.counts.dispatched += pass.sent as u64;
        if pass.failed > 0 {
            self.counts.dispatch_failed += pass.failed as u64;
            say(
                &order.id,
                format_args!(
                    "the payments broker is down: dispatch of payment {} failed (attempt 1); \
                     the row stays pending, the relay retries it after a backoff",
                    short(id)
                ),
            );
        } else if pass.claimed == 0 {
            say(
                &order.id,
                format_args!(
                    "dispatch found payment {} leased by relay-1 and left it to the relays",
                    short(id)
                ),
            );
        }

        if trouble == Some(Trouble::LostAck) {
            // TROUBLE: the ack is lost on its way to the broker.
            say(
                &order.id,
                format_args!(
                    "committed and dispatched payment {}, but the ack was lost",
                    short(id)
                ),
            );
            return Ok(());
        }
        self.orders.ack(d.tag);
        Ok(())
    }

    /// TROUBLE: relay-1, the relay loop of another stage-1 process, claims the row
    /// before this worker's dispatch does. It publishes the row, and its process is
    /// killed before the broker's confirmation reaches it. The row stays pending,
    /// leased to relay-1.
    async fn relay_1_dies_mid_publish(&self, order: &str, id: Uuid) -> Fallible<()> {
        self.broker.hang_after_next_publish();
        tokio::select! {
            pass = self.relay_1.run_once() => {
                return Err(format!("relay-1 was to die in its pass, but it ended: {pass:?}").into());
            }
            // The broker took the message. Dropping the pass here is the kill.
            () = self.broker.hung.notified() => {}
        }
        say(
            "relay-1",
            format_args!(
                "claimed payment {} ({order}) right after its commit, published it, and \
                 died before marking it sent",
                short(id)
            ),
        );
        Ok(())
    }

    /// The relay: passes until nothing is pending, waiting for backoffs and leases to
    /// run out. In a service this is `relay.spawn()`, which polls on its own.
    async fn run_relay(&mut self) -> Fallible<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut told = HashSet::new();
        loop {
            let pass = self.relay_2.run_once().await?;
            for id in &pass.sent_ids {
                self.counts.relayed += 1;
                let order = self.order_of(*id).await?;
                let what = match self.trouble(&order) {
                    Some(Trouble::CrashAfterCommit) => {
                        self.met.insert(Trouble::CrashAfterCommit);
                        "which the crashed worker left behind"
                    }
                    Some(Trouble::RelayDiesAfterPublish) => "again, once relay-1's lease ran out",
                    Some(Trouble::BrokerDown) => {
                        self.met.insert(Trouble::BrokerDown);
                        "now that the broker is back"
                    }
                    _ => "",
                };
                say(
                    "relay-2",
                    format_args!("published payment {} ({order}) {what}", short(id)),
                );
            }
            let pending = self.outbox.list(RowStatus::Pending, None, 100).await?.rows;
            if pass.failed > 0 {
                self.counts.relay_failed += pass.failed as u64;
                for row in pending.iter().filter(|r| r.attempts > 0) {
                    say(
                        "relay-2",
                        format_args!(
                            "retried payment {}: failed again (attempt {}: {}); backing off",
                            short(row.message.id()),
                            row.attempts,
                            row.last_error.as_deref().unwrap_or("?")
                        ),
                    );
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            for row in &pending {
                if let Some(owner) = &row.leased_by
                    && owner != "relay-2"
                    && told.insert(row.message.id())
                {
                    say(
                        "relay-2",
                        format_args!(
                            "payment {} is leased by {owner}: it waits for the lease to run out",
                            short(row.message.id())
                        ),
                    );
                }
            }
            if Instant::now() > deadline {
                return Err(format!("the relay left {} rows pending", pending.len()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stage 2's worker, until the payments queue is empty.
    async fn run_stage2(&mut self) -> Fallible<()> {
        while let Some(d) = self.broker.queue.receive() {
            let request: PaymentRequest = serde_json::from_slice(d.msg.payload())?;
            let payment = Payment {
                message_id: d.msg.id().to_string(),
                order_id: request.order_id,
                cents: request.cents,
            };
            let runs = self.stage2_runs.load(Ordering::Relaxed);
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let recorded = record_payment(&payment, &mut tx, &self.stage2_runs).await?;
            tx.commit().await?;
            if self.stage2_runs.load(Ordering::Relaxed) == runs {
                self.counts.stage2_replays += 1;
                say(
                    "stage 2",
                    format_args!(
                        "payment {} ({}) delivered again: answered from stage 2's dedup row \
                         (payment row {}), not recorded twice",
                        short(&payment.message_id),
                        payment.order_id,
                        recorded.payment_row
                    ),
                );
                if self.trouble(&payment.order_id) == Some(Trouble::RelayDiesAfterPublish) {
                    self.met.insert(Trouble::RelayDiesAfterPublish);
                }
            }
            self.broker.queue.ack(d.tag);
        }
        Ok(())
    }

    /// The order whose payment message is `id`, read from the outbox row's payload.
    async fn order_of(&self, id: Uuid) -> Fallible<String> {
        let mut after = None;
        loop {
            let page = self.outbox.list(RowStatus::Sent, after, 100).await?;
            if let Some(row) = page.rows.iter().find(|r| r.message.id() == id) {
                let request: PaymentRequest = serde_json::from_slice(row.message.payload())?;
                return Ok(request.order_id);
            }
            after = page
                .next
                .ok_or("a sent message missing from the outbox")?
                .into();
        }
    }

    async fn order_rows(&self, order: &str) -> Fallible<i64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE id = ?")
            .bind(order)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}

// ------------------------------------------------------------------ the program

async fn open(dir: &std::path::Path) -> Fallible<Pipeline> {
    let url = format!("sqlite://{}?mode=rwc", dir.join("pipeline.db").display());
    // the dedup table
    let store = SqliteStore::connect(&url).await?;
    let pool = store.pool().clone();
    // the business tables: no unique constraints, so a double effect would show
    for table in [
        "CREATE TABLE orders (id TEXT NOT NULL, customer TEXT NOT NULL, cents INTEGER NOT NULL)",
        "CREATE TABLE payments (order_id TEXT NOT NULL, cents INTEGER NOT NULL, \
         message_id TEXT NOT NULL)",
    ] {
        sqlx::query(table).execute(&pool).await?;
    }
    // the outbox table, and the relays that publish from it
    let outbox: Arc<dyn OutboxStore> = Arc::new(store.outbox(DEFAULT_OUTBOX_TABLE).await?);
    let broker = Arc::new(PaymentsBroker {
        queue: Queue::new(),
        faults: Mutex::default(),
        hung: Notify::new(),
    });
    let relay = Relay::shared(outbox.clone(), broker.clone())
        .lease(LEASE)
        .backoff(BACKOFF, Duration::from_secs(2));
    Ok(Pipeline {
        pool,
        orders: Queue::new(),
        dispatcher: relay.clone().name("stage-1"),
        relay_1: relay.clone().name("relay-1"),
        relay_2: relay.name("relay-2"),
        outbox,
        broker,
        inventory: Inventory::default(),
        stage2_runs: AtomicU64::new(0),
        troubles: TROUBLES
            .iter()
            .map(|&(i, t)| (format!("order-{i:03}"), t))
            .collect(),
        met: BTreeSet::new(),
        counts: Counts::default(),
    })
}

async fn run(p: &mut Pipeline) -> Fallible<bool> {
    for i in 1..=ORDERS {
        let order = Order {
            id: format!("order-{i:03}"),
            customer: format!("customer-{}", i % 7),
            cents: 1000 + 10 * i as i64,
        };
        if p.trouble(&order.id) == Some(Trouble::FailsOnce) {
            p.inventory.flaky.lock().unwrap().insert(order.id.clone());
        }
        p.produce(order);
        p.run_stage1().await?;
        p.run_relay().await?;
        p.run_stage2().await?;
    }

    // ---- the checks, on what the databases and the outbox hold
    let paid: Vec<(String, i64, i64, String)> = sqlx::query_as(
        "SELECT order_id, COUNT(*), MIN(cents), MIN(message_id) FROM payments GROUP BY order_id",
    )
    .fetch_all(&p.pool)
    .await?;
    let orders: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT id, COUNT(*), MIN(cents) FROM orders GROUP BY id")
            .fetch_all(&p.pool)
            .await?;
    let stats = p.outbox.stats().await?;
    let ordered: HashMap<&str, (i64, i64)> = orders
        .iter()
        .map(|(id, n, cents)| (id.as_str(), (*n, *cents)))
        .collect();

    let once = paid.iter().filter(|(_, n, ..)| *n == 1).count();
    let twice = paid.iter().filter(|(_, n, ..)| *n > 1).count();
    let never = ORDERS - paid.len();
    let orders_once = orders.iter().filter(|(_, n, _)| *n == 1).count();
    // each payment matches its order and carries the id derived from the order id
    let matching = paid
        .iter()
        .filter(|(order, _, cents, id)| {
            ordered.get(order.as_str()).map(|o| o.1) == Some(*cents)
                && *id == payment_id(order).to_string()
        })
        .count();
    let stage1_runs = p.inventory.calls.load(Ordering::Relaxed);
    let stage2_runs = p.stage2_runs.load(Ordering::Relaxed);
    let c = &p.counts;

    println!();
    println!("summary");
    println!(
        "  orders sent                          {ORDERS} (+{} resent by the producer)",
        c.resends
    );
    println!(
        "  stage 1 deliveries                   {}",
        p.orders.deliveries()
    );
    println!(
        "    answered from its dedup rows       {}",
        c.stage1_replays
    );
    println!("    rolled back, then redelivered      {}", c.rollbacks);
    println!("  stage 1 body runs                    {stage1_runs}");
    println!(
        "  payment messages in the outbox       {} sent, {} pending, {} dead",
        stats.sent(),
        stats.pending(),
        stats.dead()
    );
    println!(
        "    published at dispatch              {} ({} failed)",
        c.dispatched, c.dispatch_failed
    );
    println!(
        "    published by the relay             {} ({} failed)",
        c.relayed, c.relay_failed
    );
    println!(
        "  stage 2 deliveries                   {}",
        p.broker.queue.deliveries()
    );
    println!(
        "    answered from its dedup rows       {}",
        c.stage2_replays
    );
    println!("  stage 2 body runs                    {stage2_runs}");
    println!("  orders written once                  {orders_once} of {ORDERS}");
    println!("  orders paid once                     {once} of {ORDERS}");
    println!("  orders paid twice or more            {twice}");
    println!("  orders never paid                    {never}");
    println!(
        "  payments matching their order        {matching} of {} (amount, message id)",
        paid.len()
    );
    println!(
        "  troubles met and handled             {} of {}",
        p.met.len(),
        TROUBLES.len()
    );

    let ok = once == ORDERS
        && twice == 0
        && never == 0
        && orders_once == ORDERS
        && orders.len() == ORDERS
        && matching == ORDERS
        && stats.pending() == 0
        && stats.dead() == 0
        && stats.sent() == ORDERS as u64
        && stage2_runs == ORDERS as u64
        && stage1_runs == ORDERS as u64 + c.rollbacks
        && p.met.len() == TROUBLES.len();
    if ok {
        println!(
            "ok: every order was paid exactly once downstream, nothing was lost, nothing is \
             pending in the outbox"
        );
    } else {
        let missed: Vec<_> = TROUBLES
            .iter()
            .filter(|(_, t)| !p.met.contains(t))
            .map(|(i, t)| format!("{t:?} (order-{i:03})"))
            .collect();
        println!("FAILED: an order was paid twice or never, or a message is still pending");
        if !missed.is_empty() {
            println!("  troubles not seen to their end: {}", missed.join(", "));
        }
    }
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let dir = std::env::temp_dir().join(format!("idempotent-pipeline-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("pipeline: creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    println!(
        "idempotent pipeline: {ORDERS} orders, stage 1 → outbox → relay → stage 2, on SQLite \
         ({})",
        dir.join("pipeline.db").display()
    );
    println!("  relays lease rows for {LEASE:?}; a failed publish backs off {BACKOFF:?}, doubling");
    let result = match open(&dir).await {
        Ok(mut p) => {
            let result = run(&mut p).await;
            p.pool.close().await;
            result
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}
