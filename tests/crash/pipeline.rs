//! `pg-outbox`: a two-stage pipeline through the transactional outbox, on PostgreSQL
//! and NATS JetStream, with every process in it killed at random.
//!
//! ```text
//!           orders                                                 payments
//! producer ────────▶ stage 1 ──▶ idempotent_outbox ──▶ dispatch, relays ────────▶ stage 2
//!                    crash_effects                      (JetStreamPublisher)      crash_payments
//! ```
//!
//! - **Stage 1** (the driver's workers) consumes the orders stream with
//!   `#[idempotent(key = "order.id", tx = "tx", outbox = "outbox")]`: in one
//!   transaction it writes the order's row in `crash_effects` and emits the payment
//!   message, whose id `message_id(("crash", order), 0)` is the same on every execution.
//!   Right after the commit it publishes what it emitted (`Relay::dispatch`).
//! - **Relays** (processes of their own, `Relay::run_until`) publish what dispatch left
//!   behind: rows of a worker killed between commit and dispatch, rows whose dispatch
//!   failed, rows of a publisher killed between the broker's ack and the row's mark
//!   (after their lease).
//! - Both publish with `nats::JetStreamPublisher`, the row's id in `Nats-Msg-Id`, to a
//!   payments stream whose duplicate window (1 s) is shorter than the rows' lease (2 s):
//!   a row published again after a lease ran out is stored again, so stage 2, not the
//!   broker, is what keeps its effect single. Repeats within the window are dropped by
//!   the stream and counted.
//! - Besides the kills, the producer plans two publish faults for a share of the
//!   payments, which dispatch meets on its publish: the **ack lost** (the stream stored
//!   the message, dispatch is told the publish failed: a relay publishes it again after
//!   the backoff, within the window) and the **publisher stalled** past its lease after
//!   the stream's ack (a relay claims the row and publishes it again, past the window,
//!   and the stalled mark is fenced out).
//! - **Stage 2** consumes the payments stream with
//!   `#[idempotent(key = "payment_key(order)", tx = "tx")]`, keyed by the `Nats-Msg-Id`,
//!   and inserts a row in `crash_payments` (no unique constraint) in the transaction of
//!   its dedup row. The transactional mode, not the store mode, because the payment row
//!   is the effect that must exist once: in store mode a worker killed between its
//!   insert and the completion would leave the row and run the body again.
//!
//! Both stages write the suite's history lines keyed by the order id, and each gets the
//! suite's checks (nothing lost, G1, G2, G7, every re-execution explained). Each
//! publisher also writes `U order id stream_seq duplicate` once the stream acked a
//! message. On top, this module checks the outbox after the drain: one row per order,
//! with the order's derived id, sent (none pending, none dead), each confirmed by the
//! broker; and each payment row carries its order's id.

use crate::check::{FinalState, Input, Report};
use crate::driver::{self, Profile, Rng, Workers};
use crate::history::{self, Line};
use crate::worker::{self, Ctx, Order, WorkError};
use crate::{SCOPE, nats};
use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use async_trait::async_trait;
use idempotent_runtime::nats::JetStreamPublisher;
use idempotent_runtime::outbox::{
    DEFAULT_OUTBOX_TABLE, Emission, Outbox, OutboxStore, OutgoingMessage, PublishError,
    PublishErrorKind, Publisher, Relay, RowStatus, Uuid, message_id,
};
use idempotent_runtime::sqlx::{self, Postgres, Transaction};
use idempotent_runtime::{PostgresOutbox, PostgresStore, RecordKey, idempotent};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Stage 2's scope.
const PAYMENTS_SCOPE: &str = "payments";
/// Relay processes beside the workers.
const RELAYS: usize = 2;
/// How long dispatch and the relays hold a claimed row.
const ROW_LEASE: Duration = Duration::from_secs(2);
/// The payments stream's duplicate window: shorter than [`ROW_LEASE`].
const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);
/// The backoff of a failed publish, doubled per failure up to the second value.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(2));
/// Shares of the payments whose dispatch loses the stream's ack / stalls past its lease.
const ACK_LOST: f64 = 0.05;
const STALLED: f64 = 0.05;
/// How long a stalled publisher waits after the stream's ack.
const STALL: Duration = Duration::from_millis(3500);

/// The id of `order`'s payment message, as stage 1's outbox derives it.
pub fn payment_id(order: &str) -> Uuid {
    let key = RecordKey::new(SCOPE, order).expect("a valid key");
    message_id(&key, Emission::Position(0))
}

/// Stage 2's key: the message's `Nats-Msg-Id`, the outbox row's id.
fn payment_key(order: &Order) -> &str {
    order.header(idempotent_runtime::nats::MESSAGE_ID_HEADER)
}

// ------------------------------------------------------------------ the processes

/// A worker process's stage (`CRASH_ROLE`).
pub enum Stage {
    /// Stage 1: its pool, its dispatcher, and the payments subject.
    Orders {
        pool: sqlx::PgPool,
        dispatch: Box<Relay>,
        payments: String,
    },
    /// Stage 2.
    Payments { pool: sqlx::PgPool },
}

/// A publisher that writes, once the stream acked a message, `U order id seq dup`;
/// dispatch's also meets the message's planned publish fault (`Publish-Fault`).
struct Recorded {
    publisher: JetStreamPublisher,
    ctx: Arc<Ctx>,
    faults: bool,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded").finish_non_exhaustive()
    }
}

#[async_trait]
impl Publisher for Recorded {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        let ack = self.publisher.publish_acked(message).await?;
        let header = |name: &str| {
            message
                .headers()
                .iter()
                .find(|(n, _)| n == name)
                .map_or("", |(_, v)| v.as_str())
        };
        self.ctx.history.event(
            "U",
            &[
                &header("Order-Id"),
                &message.id(),
                &ack.sequence,
                &u8::from(ack.duplicate),
            ],
        );
        match header("Publish-Fault") {
            "ack-lost" if self.faults => Err(PublishError::new(
                PublishErrorKind::Unavailable,
                "the stream's ack was lost (planned)",
            )),
            "stall" if self.faults => {
                tokio::time::sleep(STALL).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A relay named `name` over the run's outbox table, publishing to JetStream (and
/// meeting the planned publish faults when `faults`).
async fn relay(pool: &sqlx::PgPool, ctx: &Arc<Ctx>, name: String, faults: bool) -> Relay {
    let (_client, js) = nats(&format!("crash-{name}")).await;
    let table = PostgresOutbox::new(pool.clone(), DEFAULT_OUTBOX_TABLE).expect("outbox table");
    let publisher = Recorded {
        publisher: JetStreamPublisher::new(js),
        ctx: ctx.clone(),
        faults,
    };
    Relay::new(table, publisher)
        .name(name)
        .lease(ROW_LEASE)
        .backoff(BACKOFF.0, BACKOFF.1)
}

impl Stage {
    /// This process's stage; a relay process runs its relay loop here until it is
    /// killed or stopped.
    pub async fn start(ctx: &Arc<Ctx>, connections: u32) -> Stage {
        let pool = crate::pg_pool(connections).await;
        match worker::env("CRASH_ROLE").as_str() {
            "orders" => Stage::Orders {
                dispatch: Box::new(relay(&pool, ctx, format!("dispatch-{}", ctx.pid), true).await),
                payments: worker::env("CRASH_PAYMENTS"),
                pool,
            },
            "payments" => Stage::Payments { pool },
            "relay" => {
                let relay = relay(&pool, ctx, format!("relay-{}", ctx.pid), false).await;
                ctx.history.event("W", &[&ctx.pid]);
                relay.run_until(std::future::pending()).await;
                unreachable!("the relay runs until the process ends")
            }
            role => panic!("unknown CRASH_ROLE {role:?}"),
        }
    }

    /// Runs the stage's handler on one delivery and commits: its token and outcome.
    pub async fn handle(
        &self,
        order: &Order,
        ctx: &Ctx,
        mine: &AtomicU64,
    ) -> Result<(u64, &'static str), WorkError> {
        match self {
            Stage::Orders {
                pool,
                dispatch,
                payments,
            } => {
                let mut tx = pool.begin().await.map_err(WorkError::Db)?;
                let mut outbox = Outbox::new();
                let t = accept_order(order, ctx, mine, payments, &mut tx, &mut outbox).await?;
                let done = worker::commit(tx, order, ctx, t).await?;
                // the fast path; what it does not publish is the relays' (a duplicate
                // answered from its record emitted nothing)
                if !outbox.is_empty() {
                    match dispatch.dispatch(&outbox).await {
                        Ok(pass) => ctx
                            .history
                            .event("D", &[&order.id, &pass.sent, &pass.failed, &pass.fenced]),
                        Err(e) => eprintln!("{}: dispatch: {e}", order.id),
                    }
                }
                Ok(done)
            }
            Stage::Payments { pool } => {
                let mut tx = pool.begin().await.map_err(WorkError::Db)?;
                let t = record_payment(order, ctx, mine, &mut tx).await?;
                worker::commit(tx, order, ctx, t).await
            }
        }
    }
}

/// Stage 1: the order's row and its payment message, in the transaction of the dedup
/// row. The payment carries the plan the producer drew for stage 2.
#[idempotent(key = "order.id", tx = "tx", outbox = "outbox", scope = "crash")]
async fn accept_order(
    order: &Order,
    ctx: &Ctx,
    mine: &AtomicU64,
    payments: &str,
    tx: &mut Transaction<'_, Postgres>,
    outbox: &mut Outbox,
) -> Result<u64, WorkError> {
    let token = worker::body_start(order, ctx, mine).await;
    worker::write_effect_pg(tx, order, ctx, token).await?;
    outbox
        .emit(payments, order.id.clone())
        .header("Order-Id", order.id.clone())
        .header("Plan", order.header("Pay-Plan"))
        .header("Work-Ms", order.header("Pay-Work-Ms"))
        .header("Publish-Fault", order.header("Pay-Publish"));
    worker::body_plan(order, ctx, token)?;
    ctx.history.event("E", &[&order.id, &token]);
    Ok(token)
}

/// Stage 2: the payment's row, keyed by the message id, in the transaction of the dedup
/// row.
#[idempotent(key = "payment_key(order)", tx = "tx", scope = "payments")]
async fn record_payment(
    order: &Order,
    ctx: &Ctx,
    mine: &AtomicU64,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<u64, WorkError> {
    let token = worker::body_start(order, ctx, mine).await;
    sqlx::query(
        "INSERT INTO crash_payments (order_id, message_id, token, pid) VALUES ($1, $2, $3, $4)",
    )
    .bind(&order.id)
    .bind(payment_key(order))
    .bind(token as i64)
    .bind(i64::from(ctx.pid))
    .execute(&mut **tx)
    .await
    .map_err(WorkError::Db)?;
    worker::body_plan(order, ctx, token)?;
    ctx.history.event("E", &[&order.id, &token]);
    Ok(token)
}

// ------------------------------------------------------------------ the driver's side

/// What the driver adds for `pg-outbox`: the outbox table, the payments stream, the
/// stage-2 workers and the relays, their kills, and the checks after the drain.
pub struct Pipeline {
    /// The driver's pool in the run's schema (its connections are not cut).
    pool: sqlx::PgPool,
    table: PostgresOutbox,
    js: jetstream::Context,
    stream: String,
    consumer: PullConsumer,
    /// Stage 2's plan and work, and the publish fault, per order.
    plans: Vec<(&'static str, u64, &'static str)>,
    stage2: Workers,
    relays: Workers,
    stage2_kills: Vec<(u32, u64)>,
    relay_kills: Vec<(u32, u64)>,
    stage2_dir: PathBuf,
    relay_dir: PathBuf,
}

/// `env` with `set` put over it.
fn with(env: &[(String, String)], set: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| set.iter().all(|(s, _)| s != k))
        .cloned()
        .collect();
    out.extend(set.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    out
}

impl Pipeline {
    /// Sets up the pipeline's tables and stream, starts stage 2 and the relays, and
    /// adds stage 1's variables to `env` (the stage-1 workers' environment).
    pub async fn start(
        p: &Profile,
        seed: u64,
        run: &str,
        dir: &Path,
        js: &jetstream::Context,
        env: &mut Vec<(String, String)>,
    ) -> Pipeline {
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name} in the workers' environment"))
        };
        let (schema, app) = (var("CRASH_PG_SCHEMA"), var("CRASH_APP"));
        let pool = crate::pg_pool_in(&schema, &format!("{app}-driver"), 2).await;
        let table = PostgresStore::from_pool(pool.clone())
            .outbox(DEFAULT_OUTBOX_TABLE)
            .await
            .expect("create the outbox table");
        // no unique constraint: a payment recorded twice is two rows
        driver::exec_pg(
            &pool,
            "CREATE TABLE crash_payments (order_id TEXT NOT NULL, message_id TEXT NOT NULL, \
             token BIGINT NOT NULL, pid BIGINT NOT NULL)",
        )
        .await;
        let stream = format!("CRASH_{run}_PAYMENTS");
        let subject = format!("crash.{run}.payments");
        let consumer = driver::durable(
            js,
            stream::Config {
                name: stream.clone(),
                subjects: vec![subject.clone()],
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            },
            "payments",
        )
        .await;
        let mut rng = Rng::new(seed ^ 0x7061_796d_656e_7473);
        let plans = (0..p.orders)
            .map(|_| {
                let (plan, work_ms) = driver::draw_plan(&mut rng, p);
                let fault = if rng.chance(ACK_LOST) {
                    "ack-lost"
                } else if rng.chance(STALLED) {
                    "stall"
                } else {
                    "none"
                };
                (plan, work_ms, fault)
            })
            .collect();

        let (stage2_dir, relay_dir) = (dir.join("stage2"), dir.join("relay"));
        for d in [&stage2_dir, &relay_dir] {
            std::fs::create_dir_all(d).expect("stage directory");
        }
        let stage2 = Workers::start(
            with(
                env,
                &[
                    ("CRASH_ROLE", "payments"),
                    ("CRASH_DIR", &stage2_dir.display().to_string()),
                    ("CRASH_STREAM", &stream),
                    ("CRASH_CONSUMER", "payments"),
                ],
            ),
            &stage2_dir,
            p.workers,
        );
        let relays = Workers::start(
            with(
                env,
                &[
                    ("CRASH_ROLE", "relay"),
                    ("CRASH_DIR", &relay_dir.display().to_string()),
                ],
            ),
            &relay_dir,
            RELAYS,
        );
        *env = with(
            env,
            &[("CRASH_ROLE", "orders"), ("CRASH_PAYMENTS", &subject)],
        );
        Pipeline {
            pool,
            table,
            js: js.clone(),
            stream,
            consumer,
            plans,
            stage2,
            relays,
            stage2_kills: Vec::new(),
            relay_kills: Vec::new(),
            stage2_dir,
            relay_dir,
        }
    }

    /// The headers of order `i`'s messages: stage 2's plan and the publish fault,
    /// which stage 1 passes on.
    pub fn order_headers(&self, i: usize) -> Vec<(&'static str, String)> {
        let (plan, work_ms, fault) = self.plans[i];
        vec![
            ("Pay-Plan", plan.to_owned()),
            ("Pay-Work-Ms", work_ms.to_string()),
            ("Pay-Publish", fault.to_owned()),
        ]
    }

    /// What is left downstream (payments pending or unacknowledged, outbox rows not
    /// sent) and the payments consumer's deliveries; `None` when it cannot be read now.
    pub async fn backlog(&mut self) -> Option<(usize, u64)> {
        let info = self.consumer.info().await.ok()?;
        let rows = self.table.stats().await.ok()?.pending() as usize;
        Some((
            info.num_pending as usize + info.num_ack_pending + rows,
            info.delivered.consumer_sequence,
        ))
    }

    /// Two times in three, `kill -9` of a stage-2 worker or a relay (then a new one in
    /// its place); false when the kill is stage 1's.
    pub fn kill_downstream(&mut self, rng: &mut Rng) -> bool {
        let (workers, kills) = match rng.below(3) {
            0 => return false,
            1 => (&mut self.stage2, &mut self.stage2_kills),
            _ => (&mut self.relays, &mut self.relay_kills),
        };
        let i = rng.below(workers.len() as u64) as usize;
        kills.push(workers.kill_and_restart(i));
        true
    }

    pub fn stop_all(&mut self) -> Vec<u32> {
        let mut pids = self.stage2.stop_all();
        pids.extend(self.relays.stop_all());
        pids
    }

    /// Checks stage 2 with the suite's checker (its report becomes `report`'s
    /// downstream) and the outbox after the drain; counts what the publishers did.
    pub async fn finish(mut self, stage1: &Input<'_>, report: &mut Report) {
        let info = self
            .consumer
            .info()
            .await
            .expect("payments consumer info")
            .clone();
        let stored = self
            .js
            .get_stream(&self.stream)
            .await
            .expect("the payments stream")
            .info()
            .await
            .expect("payments stream info")
            .state
            .messages as usize;
        let keys: Vec<(String, String)> = stage1
            .orders
            .iter()
            .map(|o| (o.clone(), payment_id(o).to_string()))
            .collect();
        let store = PostgresStore::from_pool(self.pool.clone());
        let records = driver::records(&store, PAYMENTS_SCOPE, &keys).await;
        let effects = driver::effects_pg(&self.pool, "crash_payments").await;
        let lines = history::read_all(&self.stage2_dir);
        let planned = |plan: &str| self.plans.iter().filter(|(p, ..)| *p == plan).count();
        let downstream = crate::check::check(&Input {
            lines: &lines,
            messages: stored,
            // rows published again past the stream's duplicate window
            duplicates: stored.saturating_sub(stage1.orders.len()),
            planned_failures: planned("fail"),
            planned_panics: planned("panic"),
            kills: &self.stage2_kills,
            final_state: FinalState {
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
                deliveries: info.delivered.consumer_sequence,
                records,
                effects: Some(effects),
            },
            ..*stage1
        });
        let relay_lines = history::read_all(&self.relay_dir);
        let figures = Figures::read(stage1.lines, &relay_lines);
        let drained = self.drained().await;
        report
            .violations
            .extend(outbox_violations(stage1.orders, &drained, &figures));
        let faults = |f: &str| self.plans.iter().filter(|(.., x)| *x == f).count();
        report.notes = figures.render(
            stored,
            self.relay_kills.len(),
            (faults("ack-lost"), faults("stall")),
            &drained,
        );
        report.downstream = Some(Box::new(downstream));
        let _ = self.js.delete_stream(&self.stream).await;
    }

    /// The outbox table's rows and the payment rows, after the drain.
    async fn drained(&self) -> Drained {
        let mut rows: HashMap<String, Vec<(Uuid, RowStatus)>> = HashMap::new();
        for status in [RowStatus::Pending, RowStatus::Sent, RowStatus::Dead] {
            let mut after = None;
            loop {
                let page = self
                    .table
                    .list(status, after, 1000)
                    .await
                    .expect("list the outbox rows");
                for row in page.rows {
                    let m = &row.message;
                    let order = String::from_utf8_lossy(m.payload()).into_owned();
                    rows.entry(order).or_default().push((m.id(), row.status));
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        let paid = sqlx::query_as("SELECT order_id, message_id FROM crash_payments")
            .fetch_all(&self.pool)
            .await
            .expect("read the payments");
        Drained { rows, paid }
    }
}

/// The outbox table and the payments as the drain left them.
struct Drained {
    /// Each order's outbox rows (their payload is the order id): id and status.
    rows: HashMap<String, Vec<(Uuid, RowStatus)>>,
    /// The payment rows: the order and the message id stage 2 recorded it under.
    paid: Vec<(String, String)>,
}

/// The outbox after the drain: each order has one row, with the id derived from the
/// order, sent (none pending, none dead), and acked by the stream before it was marked;
/// each payment row carries its order's message id.
fn outbox_violations(orders: &[String], d: &Drained, published: &Figures) -> Vec<String> {
    let mut v = Vec::new();
    for order in orders {
        let want = payment_id(order);
        match d.rows.get(order).map(Vec::as_slice) {
            Some([(id, RowStatus::Sent)]) if *id == want => {
                if !published.confirmed.contains_key(id) {
                    v.push(format!(
                        "outbox: {order}: row {id} marked sent, never acked by the stream"
                    ));
                }
            }
            other => v.push(format!(
                "outbox: {order}: rows {other:?} after the drain, expected one sent row with \
                 the id {want}"
            )),
        }
    }
    for order in d.rows.keys().filter(|o| !orders.contains(o)) {
        v.push(format!("outbox: a row for {order}, never ordered"));
    }
    for (order, id) in &d.paid {
        if *id != payment_id(order).to_string() {
            v.push(format!(
                "payments: {order} recorded from message {id}, not {}",
                payment_id(order)
            ));
        }
    }
    v
}

/// What the publishers did, from their `U` and `D` lines.
#[derive(Default)]
struct Figures {
    /// Publishes the stream acked, per message: (by dispatch, by a relay, dropped by
    /// the stream as duplicates).
    confirmed: HashMap<Uuid, (usize, usize, usize)>,
    /// Messages whose first acked publish was dispatch's / a relay's.
    first: (usize, usize),
    /// Dispatch passes: rows marked sent, failed, fenced out.
    dispatch: (u64, u64, u64),
}

impl Figures {
    fn read(dispatch: &[Line], relays: &[Line]) -> Figures {
        let mut f = Figures::default();
        for l in dispatch.iter().filter(|l| l.kind == "D") {
            let n = |i: usize| l.fields[i].parse::<u64>().expect("a count");
            f.dispatch.0 += n(1);
            f.dispatch.1 += n(2);
            f.dispatch.2 += n(3);
        }
        let mut all: Vec<(&Line, bool)> = dispatch
            .iter()
            .map(|l| (l, true))
            .chain(relays.iter().map(|l| (l, false)))
            .filter(|(l, _)| l.kind == "U")
            .collect();
        all.sort_by_key(|(l, _)| l.at);
        for (l, by_dispatch) in all {
            let id: Uuid = l.fields[1].parse().expect("a message id");
            let c = f.confirmed.entry(id).or_default();
            if c.0 + c.1 == 0 {
                if by_dispatch {
                    f.first.0 += 1;
                } else {
                    f.first.1 += 1;
                }
            }
            if by_dispatch {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
            if l.fields[3] == "1" {
                c.2 += 1;
            }
        }
        f
    }

    fn render(
        &self,
        stored: usize,
        relay_kills: usize,
        faults: (usize, usize),
        drained: &Drained,
    ) -> Vec<String> {
        let rows = |status: RowStatus| {
            drained
                .rows
                .values()
                .flatten()
                .filter(|(_, s)| *s == status)
                .count()
        };
        let sum = |f: fn(&(usize, usize, usize)) -> usize| -> usize {
            self.confirmed.values().map(f).sum()
        };
        let (by_dispatch, by_relay, dropped) = (sum(|c| c.0), sum(|c| c.1), sum(|c| c.2));
        let again = self.confirmed.values().filter(|c| c.0 + c.1 > 1).count();
        let per_count: BTreeMap<usize, usize> =
            self.confirmed.values().fold(BTreeMap::new(), |mut m, c| {
                *m.entry(c.0 + c.1).or_default() += 1;
                m
            });
        vec![
            format!(
                "outbox rows after the drain: {} sent, {} pending, {} dead",
                rows(RowStatus::Sent),
                rows(RowStatus::Pending),
                rows(RowStatus::Dead)
            ),
            format!(
                "outbox: {} payment messages acked by the stream, first published by dispatch \
                 {} / by a relay {}; {RELAYS} relays, {relay_kills} kill -9 of a relay",
                self.confirmed.len(),
                self.first.0,
                self.first.1
            ),
            format!(
                "planned publish faults at dispatch: ack lost {}, publisher stalled {}; \
                 dispatch marked {} rows sent, {} failed, {} fenced out",
                faults.0, faults.1, self.dispatch.0, self.dispatch.1, self.dispatch.2
            ),
            format!(
                "publishes acked: {} (dispatch {by_dispatch}, relays {by_relay}); messages \
                 published more than once {again} (publishes per message: {per_count:?}); \
                 dropped by the stream as duplicates {dropped}; payment messages stored {stored}",
                by_dispatch + by_relay
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    //! The outbox checks and the publishers' figures on hand-written rows and lines.
    use super::*;

    fn line(pid: u32, at: u64, kind: &str, fields: &[String]) -> Line {
        Line {
            kind: kind.to_owned(),
            fields: fields.to_vec(),
            at,
            pid,
        }
    }

    /// `U` of order `o`'s payment, `dup` when the stream dropped it.
    fn acked(at: u64, o: &str, dup: bool) -> Line {
        let f = [
            o,
            &payment_id(o).to_string(),
            "7",
            if dup { "1" } else { "0" },
        ];
        line(1, at, "U", &f.map(str::to_owned))
    }

    fn orders() -> Vec<String> {
        vec!["o1".to_owned(), "o2".to_owned()]
    }

    /// Both orders' rows sent and paid, o1 published by dispatch, o2 by a relay.
    fn clean() -> (Drained, Figures) {
        let rows = orders()
            .into_iter()
            .map(|o| {
                let id = payment_id(&o);
                (o, vec![(id, RowStatus::Sent)])
            })
            .collect();
        let paid = orders()
            .into_iter()
            .map(|o| {
                let id = payment_id(&o).to_string();
                (o, id)
            })
            .collect();
        let figures = Figures::read(&[acked(10, "o1", false)], &[acked(20, "o2", false)]);
        (Drained { rows, paid }, figures)
    }

    #[test]
    fn a_clean_drain_passes() {
        let (d, f) = clean();
        assert_eq!(outbox_violations(&orders(), &d, &f), Vec::<String>::new());
    }

    #[test]
    fn rows_not_sent_missing_doubled_or_with_another_id_are_reported() {
        let id = payment_id("o1");
        for rows in [
            vec![(id, RowStatus::Pending)],
            vec![(id, RowStatus::Dead)],
            vec![],
            vec![(id, RowStatus::Sent), (id, RowStatus::Sent)],
            vec![(payment_id("o2"), RowStatus::Sent)],
        ] {
            let (mut d, f) = clean();
            d.rows.insert("o1".to_owned(), rows.clone());
            let v = outbox_violations(&orders(), &d, &f);
            assert!(
                v.len() == 1 && v[0].starts_with("outbox: o1: rows"),
                "{rows:?}: {v:?}"
            );
        }
        let (mut d, f) = clean();
        d.rows.insert("o9".to_owned(), vec![(id, RowStatus::Sent)]);
        assert_eq!(
            outbox_violations(&orders(), &d, &f),
            ["outbox: a row for o9, never ordered"]
        );
    }

    #[test]
    fn a_row_marked_sent_that_no_publish_was_acked_for_is_reported() {
        let (d, _) = clean();
        let f = Figures::read(&[acked(10, "o1", false)], &[]);
        let v = outbox_violations(&orders(), &d, &f);
        assert!(
            v.len() == 1 && v[0].contains("never acked by the stream"),
            "{v:?}"
        );
    }

    #[test]
    fn a_payment_recorded_under_another_id_is_reported() {
        let (mut d, f) = clean();
        d.paid[0].1 = Uuid::nil().to_string();
        let v = outbox_violations(&orders(), &d, &f);
        assert!(v.len() == 1 && v[0].starts_with("payments: "), "{v:?}");
    }

    #[test]
    fn figures_count_who_published_first_the_repeats_and_the_dropped() {
        let dispatch = [
            acked(10, "o1", false),
            line(1, 11, "D", &["o1", "0", "1", "0"].map(str::to_owned)),
            acked(30, "o2", false),
            line(1, 31, "D", &["o2", "1", "0", "1"].map(str::to_owned)),
        ];
        // o1's lost ack: a relay published it again, dropped by the stream; o2 was
        // published by a relay first, then by a stalled dispatch
        let relays = [acked(20, "o1", true), acked(25, "o2", false)];
        let f = Figures::read(&dispatch, &relays);
        assert_eq!(f.first, (1, 1));
        assert_eq!(f.dispatch, (1, 1, 1));
        assert_eq!(f.confirmed[&payment_id("o1")], (1, 1, 1));
        assert_eq!(f.confirmed[&payment_id("o2")], (1, 1, 0));
    }
}
