//! What the end-to-end broker tests share beyond [`assert_applied_once`](crate::assert_applied_once):
//! names unique to one test run, so concurrent runs against the same servers never meet.

/// A random suffix unique to this test run, for stream, queue, topic, group and business ids.
pub fn run_id() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

use idempotent_runtime::{AsIdempotencyError, Error, current_claim};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// A delivered order, read from the message: its business id and the amount to charge.
pub struct Order {
    pub id: String,
    pub amount: u64,
}

/// What the handler returns (and the store caches): which delivery did the work.
#[derive(Debug, Serialize, Deserialize)]
pub struct Applied {
    pub by: String,
}

/// The handler's error: the idempotency layer's, or the business's own.
#[derive(Debug)]
pub enum HandleError {
    Idempotency(Error),
    /// A dependency failed; a redelivery retries.
    Gateway,
    /// The order is invalid; retried until `max_attempts`, then dead-lettered.
    Rejected,
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
            HandleError::Gateway | HandleError::Rejected => None,
        }
    }
}

/// The business side's books: how often each order was charged, and how much.
#[derive(Default)]
pub struct Ledger {
    /// business id → times the effect was applied (must end at 1 for every order)
    effects: Mutex<HashMap<String, u32>>,
    amounts: Mutex<HashMap<String, u64>>,
}

impl Ledger {
    /// Applies the business effect: one charge of `amount` to `order`.
    pub fn charge(&self, order: &str, amount: u64) {
        *self
            .effects
            .lock()
            .unwrap()
            .entry(order.to_owned())
            .or_default() += 1;
        *self
            .amounts
            .lock()
            .unwrap()
            .entry(order.to_owned())
            .or_default() += amount;
    }

    /// How many distinct orders were charged so far.
    pub fn applied(&self) -> usize {
        self.effects.lock().unwrap().len()
    }

    /// Business id → times charged, as of now.
    pub fn effects(&self) -> HashMap<String, u32> {
        self.effects.lock().unwrap().clone()
    }

    /// Every business effect exactly once, nothing lost, nothing for orders not listed
    /// (poison messages), each charged its `(order, amount)`. Returns the effects, for the report.
    pub fn assert_charged_once(
        &self,
        orders: impl IntoIterator<Item = (String, u64)>,
    ) -> HashMap<String, u32> {
        let orders: Vec<(String, u64)> = orders.into_iter().collect();
        let effects = self.effects();
        crate::assert_applied_once(&effects, orders.iter().map(|(o, _)| o.clone()));
        let amounts = self.amounts.lock().unwrap().clone();
        for (order, amount) in &orders {
            assert_eq!(amounts[order], *amount, "charged once, the right amount");
        }
        effects
    }
}

/// The business side of the NATS, RabbitMQ and Redis Streams tests: the ledger and the
/// behaviour of each id.
#[derive(Default)]
pub struct Business {
    pub ledger: Ledger,
    /// fail their first attempt (a dependency is down)
    pub flaky: HashSet<String>,
    /// take `slow_for` (their duplicates arrive while they are worked on)
    pub slow: HashSet<String>,
    /// always rejected, until dead-lettered
    pub poison: HashSet<String>,
}

impl Business {
    /// The handler's body: rejects poison, fails a flaky order's first attempt, waits
    /// `slow_for` on a slow one, then charges the order; `tag` names the delivery.
    pub async fn charge(
        &self,
        order: &Order,
        tag: &str,
        slow_for: Duration,
    ) -> Result<Applied, HandleError> {
        let attempt = current_claim().map_or(1, |c| c.attempt);
        if self.poison.contains(&order.id) {
            return Err(HandleError::Rejected);
        }
        if self.flaky.contains(&order.id) && attempt == 1 {
            return Err(HandleError::Gateway);
        }
        if self.slow.contains(&order.id) {
            tokio::time::sleep(slow_for).await;
        }
        self.ledger.charge(&order.id, order.amount);
        Ok(Applied { by: tag.to_owned() })
    }
}

/// A delivery as the broker tests log it: which order, and what became of it.
pub trait Logged {
    type Outcome: Ord + Copy;
    fn order(&self) -> &str;
    fn outcome(&self) -> Self::Outcome;
}

/// The outcomes of a delivery log, counted, and the one delivery that executed each order.
pub struct Tally<'a, D: Logged> {
    count: BTreeMap<D::Outcome, usize>,
    /// business id → the delivery that did the work
    pub executed_by: HashMap<&'a str, &'a D>,
}

impl<'a, D: Logged> Tally<'a, D> {
    /// Counts `log` and asserts exactly one `executed` delivery for each of `orders` orders.
    pub fn new(log: &'a [D], executed: D::Outcome, orders: usize) -> Self {
        let mut count: BTreeMap<D::Outcome, usize> = BTreeMap::new();
        for d in log {
            *count.entry(d.outcome()).or_default() += 1;
        }
        let executed_by: HashMap<&str, &D> = log
            .iter()
            .filter(|d| d.outcome() == executed)
            .map(|d| (d.order(), d))
            .collect();
        let tally = Tally { count, executed_by };
        assert_eq!(tally.n(executed), orders, "one execution per order");
        assert_eq!(tally.executed_by.len(), orders, "no order executed twice");
        tally
    }

    /// How many deliveries ended in `outcome`.
    pub fn n(&self, outcome: D::Outcome) -> usize {
        self.count.get(&outcome).copied().unwrap_or(0)
    }
}
