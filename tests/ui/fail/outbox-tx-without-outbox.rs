use idempotent_runtime::outbox::Outbox;
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture,
};
use idempotent_runtime::{Error, idempotent};

struct Payment {
    id: String,
}

/// A transaction the dedup row can be written in, but not outbox messages.
struct Transaction;

impl DedupTransaction for Transaction {
    fn claim_in_tx<'a>(&'a mut self, _: &'a str, _: &'a ClaimRequest<'a>) -> TxFuture<'a, ClaimOutcome> {
        unimplemented!()
    }
    fn complete_in_tx<'a>(&'a mut self, _: &'a str, _: &'a Completion<'a>) -> TxFuture<'a, Fence> {
        unimplemented!()
    }
}

#[idempotent(key = "payment.id", tx = "tx", outbox = "outbox")]
async fn pay(payment: &Payment, tx: &mut Transaction, outbox: &mut Outbox) -> Result<(), Error> {
    let _ = tx;
    outbox.emit("receipts", payment.id.clone());
    Ok(())
}

fn main() {}
