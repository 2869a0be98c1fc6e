//! `#[idempotent(tx = "tx", outbox = "outbox")]` end to end on a transaction of the
//! test's own (the SQL stores' transactions are proved in `outbox_sql.rs`): the outbox
//! is bound to the message's key before the body, the emitted messages are written in
//! the transaction before the completion, a failed body writes nothing, a duplicate
//! emits nothing, and a re-execution after a rollback emits the same ids.

use idempotent_runtime::outbox::{Outbox, OutboxTransaction, OutgoingMessage};
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, Token, TxFuture,
};
use idempotent_runtime::{Error, RecordKey, idempotent};
use std::collections::HashMap;

/// A committed database: dedup rows (completed outputs) and outbox rows.
#[derive(Default)]
struct Db {
    completed: HashMap<Vec<u8>, Vec<u8>>,
    outbox: Vec<(String, OutgoingMessage)>,
}

/// A transaction over [`Db`]: its writes land on commit, and vanish on drop.
struct Tx<'a> {
    db: &'a mut Db,
    completed: Vec<(Vec<u8>, Vec<u8>)>,
    outbox: Vec<(String, OutgoingMessage)>,
    statements: usize,
}

impl<'a> Tx<'a> {
    fn begin(db: &'a mut Db) -> Self {
        Tx {
            db,
            completed: Vec::new(),
            outbox: Vec::new(),
            statements: 0,
        }
    }

    fn commit(self) {
        self.db.completed.extend(self.completed);
        self.db.outbox.extend(self.outbox);
    }
}

impl DedupTransaction for Tx<'_> {
    fn claim_in_tx<'a>(
        &'a mut self,
        _table: &'a str,
        req: &'a ClaimRequest<'a>,
    ) -> TxFuture<'a, ClaimOutcome> {
        self.statements += 1;
        let done = self.db.completed.get(req.key.as_bytes()).cloned();
        Box::pin(async move {
            Ok(match done {
                Some(output) => ClaimOutcome::Completed {
                    output: Some(output),
                },
                None => ClaimOutcome::Acquired {
                    token: Token::new(1),
                    attempt: 1,
                },
            })
        })
    }

    fn complete_in_tx<'a>(
        &'a mut self,
        _table: &'a str,
        c: &'a Completion<'a>,
    ) -> TxFuture<'a, Fence> {
        self.statements += 1;
        self.completed.push((
            c.key.as_bytes().to_vec(),
            c.output.unwrap_or_default().to_vec(),
        ));
        Box::pin(async { Ok(Fence::Held) })
    }
}

impl OutboxTransaction for Tx<'_> {
    fn enqueue_in_tx<'a>(&'a mut self, table: &'a str, outbox: &'a Outbox) -> TxFuture<'a, ()> {
        self.statements += 1;
        for m in outbox.messages() {
            self.outbox.push((table.to_owned(), m.clone()));
        }
        Box::pin(async { Ok(()) })
    }
}

struct Order {
    id: String,
    cents: u64,
    fail: bool,
}

#[derive(Debug)]
enum AppError {
    Idempotency(Error),
    Declined,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

#[idempotent(key = "order.id", scope = "orders", tx = "tx", outbox = "outbox")]
async fn on_order(order: &Order, tx: &mut Tx<'_>, outbox: &mut Outbox) -> Result<u64, AppError> {
    let _ = &tx;
    outbox
        .emit("payments.charge", order.cents.to_string())
        .header("content-type", "text/plain")
        .ordering_key(order.id.clone());
    outbox.emit_named("receipt", "mail.receipt", order.id.clone());
    if order.fail {
        return Err(AppError::Declined);
    }
    Ok(order.cents)
}

#[idempotent(
    key = "order.id",
    scope = "audit",
    tx = "tx",
    outbox = "events",
    outbox_table = "audit_outbox"
)]
async fn on_audit(order: &Order, tx: &mut Tx<'_>, events: &mut Outbox) -> Result<(), AppError> {
    let _ = &tx;
    events.emit("audit", order.id.clone());
    Ok(())
}

#[idempotent(key = "order.id", scope = "twice", tx = "tx", outbox = "outbox")]
async fn names_twice(order: &Order, tx: &mut Tx<'_>, outbox: &mut Outbox) -> Result<(), AppError> {
    let _ = (&tx, &order);
    outbox.emit_named("n", "d", Vec::new());
    outbox.emit_named("n", "d", Vec::new());
    Ok(())
}

fn order(id: &str, fail: bool) -> Order {
    Order {
        id: id.into(),
        cents: 500,
        fail,
    }
}

#[tokio::test]
async fn emitted_messages_are_written_in_the_transaction_with_ids_of_the_key() {
    let mut db = Db::default();
    let mut tx = Tx::begin(&mut db);
    let mut outbox = Outbox::new();
    let got = on_order(&order("o-1", false), &mut tx, &mut outbox)
        .await
        .unwrap();
    assert_eq!(got, 500);
    // claim, outbox rows, completion: one statement for all the messages
    assert_eq!(tx.statements, 3);
    tx.commit();

    assert_eq!(db.outbox.len(), 2);
    let key = RecordKey::new("orders", "o-1").unwrap();
    use idempotent_runtime::outbox::{Emission, message_id};
    let (table, charge) = &db.outbox[0];
    assert_eq!(table, "idempotent_outbox");
    assert_eq!(charge.id(), message_id(&key, Emission::Position(0)));
    assert_eq!(charge.destination(), "payments.charge");
    assert_eq!(charge.payload(), b"500");
    assert_eq!(charge.ordering_key(), Some("o-1"));
    assert_eq!(
        charge.headers(),
        [("content-type".into(), "text/plain".into())]
    );
    assert_eq!(
        db.outbox[1].1.id(),
        message_id(&key, Emission::Named("receipt"))
    );
    // the outbox still holds the messages, for a dispatch right after the commit
    assert_eq!(outbox.messages().len(), 2);
    assert_eq!(outbox.origin(), Some(&key));
}

#[tokio::test]
async fn a_duplicate_emits_nothing_and_replays_the_output() {
    let mut db = Db::default();
    let mut tx = Tx::begin(&mut db);
    on_order(&order("o-2", false), &mut tx, &mut Outbox::new())
        .await
        .unwrap();
    tx.commit();

    let mut tx = Tx::begin(&mut db);
    let mut outbox = Outbox::new();
    on_order(&order("o-other", false), &mut tx, &mut outbox)
        .await
        .unwrap();
    drop(tx);
    assert_eq!(
        outbox.messages().len(),
        2,
        "another message's emissions, then the duplicate"
    );
    let mut tx = Tx::begin(&mut db);
    let replayed = on_order(&order("o-2", false), &mut tx, &mut outbox)
        .await
        .unwrap();
    assert_eq!(replayed, 500);
    assert_eq!(tx.statements, 1, "only the claim");
    tx.commit();
    assert!(outbox.is_empty());
    assert_eq!(db.outbox.len(), 2);
}

#[tokio::test]
async fn a_failed_body_writes_nothing_and_a_re_execution_emits_the_same_ids() {
    let mut db = Db::default();
    let mut outbox = Outbox::new();
    let mut tx = Tx::begin(&mut db);
    let err = on_order(&order("o-3", true), &mut tx, &mut outbox)
        .await
        .unwrap_err();
    assert!(matches!(err, AppError::Declined));
    assert!(tx.outbox.is_empty() && tx.completed.is_empty());
    assert!(
        outbox.is_empty(),
        "what a failed execution emitted is dropped"
    );
    drop(tx); // rolled back

    let mut tx = Tx::begin(&mut db);
    on_order(&order("o-3", false), &mut tx, &mut outbox)
        .await
        .unwrap();
    tx.commit();
    let key = RecordKey::new("orders", "o-3").unwrap();
    use idempotent_runtime::outbox::{Emission, message_id};
    let ids: Vec<_> = db.outbox.iter().map(|(_, m)| m.id()).collect();
    assert_eq!(
        ids,
        [
            message_id(&key, Emission::Position(0)),
            message_id(&key, Emission::Named("receipt"))
        ]
    );
}

#[tokio::test]
async fn the_outbox_table_and_parameter_name_are_the_handlers() {
    let mut db = Db::default();
    let mut tx = Tx::begin(&mut db);
    on_audit(&order("o-4", false), &mut tx, &mut Outbox::new())
        .await
        .unwrap();
    tx.commit();
    assert_eq!(db.outbox.len(), 1);
    assert_eq!(db.outbox[0].0, "audit_outbox");
}

#[tokio::test]
async fn an_invalid_emission_fails_the_handler_and_writes_nothing() {
    let mut db = Db::default();
    let mut tx = Tx::begin(&mut db);
    let mut outbox = Outbox::new();
    let err = names_twice(&order("o-5", false), &mut tx, &mut outbox)
        .await
        .unwrap_err();
    match err {
        AppError::Idempotency(e @ Error::InvalidEmission { .. }) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("\"n\""), "{e}");
        }
        other => panic!("expected InvalidEmission, got {other:?}"),
    }
    assert!(tx.outbox.is_empty() && tx.completed.is_empty());
    assert!(outbox.is_empty());
}

#[tokio::test]
async fn a_reused_outbox_is_bound_to_each_message_in_turn() {
    let mut db = Db::default();
    let mut outbox = Outbox::new();
    for id in ["a", "b"] {
        let mut tx = Tx::begin(&mut db);
        on_order(&order(id, false), &mut tx, &mut outbox)
            .await
            .unwrap();
        tx.commit();
        assert_eq!(outbox.messages().len(), 2);
        assert_eq!(
            outbox.origin(),
            Some(&RecordKey::new("orders", id).unwrap())
        );
    }
    let distinct: std::collections::HashSet<_> = db.outbox.iter().map(|(_, m)| m.id()).collect();
    assert_eq!(distinct.len(), 4);
}
