//! A consumer that meets every kind of duplicate delivery and processes each message once.
//!
//! An in-process broker delivers 1 000 `OrderPaid` messages at least once, to two
//! consumers, and produces the three ordinary kinds of duplicate:
//!
//! - **send retry**: the producer's send acknowledgement was lost, so it sent the
//!   message again (a second message with the same order id);
//! - **redelivery**: a consumer finished the work but its ack was lost, so the broker
//!   delivers the message again later;
//! - **rebalance**: the queue moves to the other consumer while the first is still
//!   working, so both hold the same message at the same time.
//!
//! Some handlers also fail on their first attempt (a flaky payment gateway) and are
//! retried by redelivery. The handler is an ordinary `async fn` with one attribute, on
//! the embedded memory store. The program prints what happened and exits with an error
//! if any order was charged twice or never.
//!
//! Run it with `cargo run --example demo`.

use idempotent_runtime::{Error, current_claim, idempotent};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ORDERS: u64 = 1_000;

#[derive(Clone, Debug)]
struct OrderPaid {
    order_id: String,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    order_id: String,
    charged_cents: u64,
}

#[derive(Debug)]
enum AppError {
    /// The dedup layer said no (in progress elsewhere, attempts exhausted, store down…).
    Idempotency(Error),
    /// The payment gateway failed; a redelivery retries.
    Gateway,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

/// The business effect that must happen exactly once per order.
#[derive(Default)]
struct Ledger {
    charges: Mutex<HashMap<String, u32>>,
    executions: AtomicU64,
}

/// The handler: business code only. `#[idempotent]` claims the order id before the
/// body runs, caches the receipt, and answers duplicates with it.
#[idempotent(key = "msg.order_id", ttl = "1h", lease = "10s", max_attempts = 5)]
async fn on_order_paid(msg: &OrderPaid, ledger: &Ledger) -> Result<Receipt, AppError> {
    ledger.executions.fetch_add(1, Ordering::Relaxed);
    // every 25th order meets a flaky gateway on its first attempt
    let attempt = current_claim().map_or(1, |c| c.attempt);
    if attempt == 1 && seeded(&msg.order_id).is_multiple_of(25) {
        return Err(AppError::Gateway);
    }
    tokio::time::sleep(Duration::from_millis(2)).await; // the gateway call
    *ledger
        .charges
        .lock()
        .unwrap()
        .entry(msg.order_id.clone())
        .or_default() += 1;
    Ok(Receipt {
        order_id: msg.order_id.clone(),
        charged_cents: msg.amount_cents,
    })
}

// ------------------------------------------------------------------ the broker

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Cause {
    First,
    SendRetry,
    LostAck,
    Rebalance,
    Nack,
}

#[derive(Clone, Debug)]
struct Delivery {
    msg: OrderPaid,
    cause: Cause,
}

#[derive(Default)]
struct Broker {
    queue: Mutex<VecDeque<Delivery>>,
    delivered: Mutex<HashMap<Cause, u64>>,
}

impl Broker {
    fn push(&self, msg: OrderPaid, cause: Cause) {
        self.queue
            .lock()
            .unwrap()
            .push_back(Delivery { msg, cause });
    }

    fn poll(&self) -> Option<Delivery> {
        let d = self.queue.lock().unwrap().pop_front()?;
        *self.delivered.lock().unwrap().entry(d.cause).or_default() += 1;
        Some(d)
    }
}

#[derive(Default)]
struct Outcomes {
    acked: AtomicU64,
    succeeded: AtomicU64,
    in_progress: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
}

/// A deterministic pseudo-random number per string, so every run is the same.
fn seeded(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn consume(delivery: Delivery, broker: &Broker, ledger: &Ledger, out: &Outcomes) {
    let result = on_order_paid(&delivery.msg, ledger).await;
    match result {
        Ok(receipt) => {
            assert_eq!(receipt.charged_cents, delivery.msg.amount_cents);
            out.succeeded.fetch_add(1, Ordering::Relaxed);
            // one first delivery in eight loses its ack: the broker redelivers it
            if delivery.cause == Cause::First && seeded(&delivery.msg.order_id) % 8 == 1 {
                broker.push(delivery.msg, Cause::LostAck);
            } else {
                out.acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(AppError::Idempotency(Error::InProgress { .. })) => {
            // another consumer holds it: nack with a delay, the broker redelivers
            out.in_progress.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            broker.push(delivery.msg, Cause::Nack);
        }
        Err(AppError::Idempotency(e)) if !e.is_retryable() => {
            eprintln!("dead-lettering {}: {e}", delivery.msg.order_id);
            out.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            out.failed.fetch_add(1, Ordering::Relaxed);
            broker.push(delivery.msg, Cause::Nack);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let broker = Arc::new(Broker::default());
    let ledger = Arc::new(Ledger::default());
    let out = Arc::new(Outcomes::default());

    for i in 0..ORDERS {
        let msg = OrderPaid {
            order_id: format!("order-{i:05}"),
            amount_cents: 100 + i,
        };
        let r = seeded(&msg.order_id);
        broker.push(msg.clone(), Cause::First);
        // one message in ten is sent twice by a producer retry
        if r % 10 == 3 {
            broker.push(msg.clone(), Cause::SendRetry);
        }
        // one in six is in flight during a rebalance: handed to both consumers at once
        if r % 6 == 5 {
            broker.push(msg, Cause::Rebalance);
        }
    }

    // two consumers, each handling up to 16 messages at a time
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let (broker, ledger, out) = (broker.clone(), ledger.clone(), out.clone());
        consumers.push(tokio::spawn(async move {
            let mut idle = 0;
            let mut inflight = tokio::task::JoinSet::new();
            while idle < 50 {
                while inflight.len() < 16 {
                    let Some(d) = broker.poll() else { break };
                    let (broker, ledger, out) = (broker.clone(), ledger.clone(), out.clone());
                    inflight.spawn(async move { consume(d, &broker, &ledger, &out).await });
                }
                if inflight.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                } else {
                    idle = 0;
                    inflight.join_next().await;
                }
            }
        }));
    }
    for c in consumers {
        c.await.expect("consumer task");
    }

    let delivered = broker.delivered.lock().unwrap().clone();
    let charges = ledger.charges.lock().unwrap();
    let count = |c| delivered.get(&c).copied().unwrap_or(0);
    let total: u64 = delivered.values().sum();
    let charged_twice = charges.values().filter(|&&n| n > 1).count();
    let never = ORDERS as usize - charges.len();
    // every successful result that did not come from a body run was a cached replay
    let charged: u64 = charges.values().map(|&n| u64::from(n)).sum();
    let replayed = out.succeeded.load(Ordering::Relaxed) - charged;

    println!("idempotent demo: {ORDERS} orders, two consumers, memory store");
    println!("  deliveries                     {total}");
    println!("    first deliveries             {}", count(Cause::First));
    println!(
        "    send retries (duplicates)    {}",
        count(Cause::SendRetry)
    );
    println!("    lost-ack redeliveries        {}", count(Cause::LostAck));
    println!(
        "    rebalance hand-overs         {}",
        count(Cause::Rebalance)
    );
    println!("    redeliveries after nack      {}", count(Cause::Nack));
    println!(
        "  handler body executions        {}",
        ledger.executions.load(Ordering::Relaxed)
    );
    println!(
        "    failed, retried later        {}",
        out.failed.load(Ordering::Relaxed)
    );
    println!("  duplicates answered from cache {}", replayed);
    println!(
        "  in progress elsewhere (nacked) {}",
        out.in_progress.load(Ordering::Relaxed)
    );
    println!(
        "  dead-lettered                  {}",
        out.dead_lettered.load(Ordering::Relaxed)
    );
    println!(
        "  orders charged once            {}",
        charges.values().filter(|&&n| n == 1).count()
    );
    println!("  orders charged twice or more   {charged_twice}");
    println!("  orders never charged           {never}");

    if charged_twice == 0 && never == 0 {
        println!("ok: every order was charged exactly once");
        ExitCode::SUCCESS
    } else {
        println!("FAILED: duplicates ran twice or messages were lost");
        ExitCode::FAILURE
    }
}
