use idempotent_runtime::outbox::{Outbox, OutboxTransaction};
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture,
};
use idempotent_runtime::{Error, idempotent};

struct Payment {
    id: String,
}

/// A transaction both rows can be written in (the UI cases build without drivers).
struct Transaction;

impl DedupTransaction for Transaction {
    fn claim_in_tx<'a>(&'a mut self, _: &'a str, _: &'a ClaimRequest<'a>) -> TxFuture<'a, ClaimOutcome> {
        unimplemented!()
    }
    fn complete_in_tx<'a>(&'a mut self, _: &'a str, _: &'a Completion<'a>) -> TxFuture<'a, Fence> {
        unimplemented!()
    }
}

impl OutboxTransaction for Transaction {
    fn enqueue_in_tx<'a>(&'a mut self, _: &'a str, _: &'a Outbox) -> TxFuture<'a, ()> {
        unimplemented!()
    }
}

#[idempotent(key = "payment.id", tx = "tx", outbox = "events")]
async fn pay(payment: &Payment, tx: &mut Transaction, events: &mut Vec<String>) -> Result<(), Error> {
    let _ = tx;
    events.push(payment.id.clone());
    Ok(())
}

fn main() {}
