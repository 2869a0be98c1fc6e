// A transactional handler with an outbox: the emitted messages get ids of the key, the
// handler's future is `Send`, and the outbox parameter can have any name.
use idempotent_runtime::outbox::{Emission, Outbox, OutboxTransaction, message_id};
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, Token, TxFuture,
};
use idempotent_runtime::{Error, RecordKey, idempotent};

struct Payment {
    id: String,
}

/// Stands in for `sqlx::Transaction<'_, Postgres>` (the UI cases build without drivers).
#[derive(Default)]
struct Transaction {
    written: usize,
}

impl DedupTransaction for Transaction {
    fn claim_in_tx<'a>(&'a mut self, _: &'a str, _: &'a ClaimRequest<'a>) -> TxFuture<'a, ClaimOutcome> {
        Box::pin(async { Ok(ClaimOutcome::Acquired { token: Token::new(1), attempt: 1 }) })
    }
    fn complete_in_tx<'a>(&'a mut self, _: &'a str, _: &'a Completion<'a>) -> TxFuture<'a, Fence> {
        Box::pin(async { Ok(Fence::Held) })
    }
}

impl OutboxTransaction for Transaction {
    fn enqueue_in_tx<'a>(&'a mut self, _: &'a str, outbox: &'a Outbox) -> TxFuture<'a, ()> {
        self.written += outbox.messages().len();
        Box::pin(async { Ok(()) })
    }
}

#[idempotent(key = "payment.id", tx = "tx", outbox = "out")]
async fn pay(payment: &Payment, tx: &mut Transaction, out: &mut Outbox) -> Result<(), Error> {
    let _ = &tx;
    out.emit("receipts", payment.id.clone()).ordering_key("c-1");
    tokio::task::yield_now().await;
    Ok(())
}

fn assert_send<T: Send>(t: T) -> T {
    t
}

#[tokio::main]
async fn main() {
    let mut tx = Transaction::default();
    let mut out = Outbox::new();
    assert_send(pay(&Payment { id: "p-1".into() }, &mut tx, &mut out)).await.unwrap();
    assert_eq!(tx.written, 1);
    let key = RecordKey::new(out.origin().unwrap().scope(), "p-1").unwrap();
    assert_eq!(out.messages()[0].id(), message_id(&key, Emission::Position(0)));
}
