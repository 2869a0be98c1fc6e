//! Transactional mode (`#[idempotent(tx = "tx")]`) on MySQL / MariaDB
//! (`IDEMPOTENT_MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`), PostgreSQL
//! (`IDEMPOTENT_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`) and
//! SQLite (a temporary file).
//!
//! Every handler inserts a ledger row in the caller's transaction; the ledger has no
//! unique constraint, so an effect applied twice shows up as two rows. The same cases
//! run on each database: concurrent consumers, a failing handler, a caller that rolls
//! back, a crash between the business write and the commit, a duplicate waiting on the
//! first delivery's transaction, another table, and `forget` / `inspect` of the stores.
//! Tests that need a server fail, naming the variable, when it is missing.
#![cfg(all(feature = "mysql", feature = "postgres", feature = "sqlite"))]

use futures_util::future::join_all;
use idempotent_runtime::sqlx::{self, Transaction};
use idempotent_runtime::store::RecordState;
use idempotent_runtime::{Error, RecordKey, Store, StoreErrorKind, idempotent};
use idempotent_tests::sql_support::{env_url, unique_name};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Issues the ledger's sequence numbers: each execution of a body takes a fresh one, so
/// a replayed receipt is told apart from a second execution.
static SEQ: AtomicI64 = AtomicI64::new(1);

#[derive(Debug)]
enum AppError {
    Idempotency(Error),
    Db(sqlx::Error),
    Declined,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idempotency(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    payment: String,
    seq: i64,
}

#[derive(Debug, Clone)]
struct Payment {
    id: String,
    amount: i64,
    decline: bool,
}

impl Payment {
    fn new(id: String) -> Payment {
        Payment {
            id,
            amount: 500,
            decline: false,
        }
    }

    fn declined(&self) -> Payment {
        Payment {
            decline: true,
            ..self.clone()
        }
    }
}

/// The per-database cases; each module defines `Db`, `INSERT`, `COUNT`, `CORRUPT`,
/// `env()`.
macro_rules! tx_cases {
    () => {
        /// Inserts the ledger row, then fails if the payment is declined.
        #[idempotent(key = "payment.id", tx = "tx")]
        async fn pay(payment: &Payment, tx: &mut Transaction<'_, Db>) -> Result<Receipt, AppError> {
            // the body sees its claim, as in the store mode
            let claim = idempotent_runtime::current_claim().expect("runs under a claim");
            assert!(claim.attempt >= 1 && claim.token.get() > 0);
            let seq = SEQ.fetch_add(1, Ordering::SeqCst);
            sqlx::query(INSERT)
                .bind(payment.id.as_str())
                .bind(seq)
                .bind(payment.amount)
                .execute(&mut **tx)
                .await
                .map_err(AppError::Db)?;
            if payment.decline {
                return Err(AppError::Declined);
            }
            Ok(Receipt {
                payment: payment.id.clone(),
                seq,
            })
        }

        /// The same, with its records in another table.
        #[idempotent(
            key = "payment.id",
            tx = "tx",
            table = "tx_custom_dedup",
            scope = "tx-custom",
            ttl = "1h"
        )]
        async fn pay_custom(
            payment: &Payment,
            tx: &mut Transaction<'_, Db>,
        ) -> Result<Receipt, AppError> {
            let seq = SEQ.fetch_add(1, Ordering::SeqCst);
            sqlx::query(INSERT)
                .bind(payment.id.as_str())
                .bind(seq)
                .bind(payment.amount)
                .execute(&mut **tx)
                .await
                .map_err(AppError::Db)?;
            Ok(Receipt {
                payment: payment.id.clone(),
                seq,
            })
        }

        /// The record of `pay` for a payment, as the stores address it.
        fn key(id: &str) -> RecordKey {
            RecordKey::new(concat!(module_path!(), "::pay"), id).expect("key")
        }

        /// A consumer: one transaction per delivery, committed when the handler
        /// succeeds; a retryable failure (a conflict, a failed commit) is delivered again.
        async fn deliver(pool: &sqlx::Pool<Db>, p: &Payment) -> Receipt {
            let mut last = String::new();
            for _ in 0..200 {
                let mut tx = pool.begin().await.expect("begin");
                match pay(p, &mut tx).await {
                    Ok(r) => match tx.commit().await {
                        Ok(()) => return r,
                        Err(e) => last = format!("commit: {e}"),
                    },
                    Err(AppError::Idempotency(e)) if e.is_retryable() => {
                        last = format!("{e}: {:?}", std::error::Error::source(&e));
                        let _ = tx.rollback().await;
                    }
                    Err(AppError::Db(e)) => {
                        last = format!("ledger: {e}");
                        let _ = tx.rollback().await;
                    }
                    Err(e) => panic!("delivery of {} failed: {e:?}", p.id),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("delivery of {} kept failing: {last}", p.id)
        }

        /// The payment's ledger rows and the smallest sequence number among them.
        async fn ledger(pool: &sqlx::Pool<Db>, id: &str) -> (i64, Option<i64>) {
            sqlx::query_as(COUNT)
                .bind(id)
                .fetch_one(pool)
                .await
                .expect("count ledger rows")
        }

        /// Neither a ledger row nor a record is left of the payment.
        async fn assert_no_mark(env: &Env, id: &str) {
            assert_eq!(ledger(&env.pool, id).await, (0, None), "ledger rows");
            let rec = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(id))
                .await
                .expect("inspect");
            assert!(rec.is_none(), "a record is left: {rec:?}");
        }

        fn payment(prefix: &str) -> Payment {
            Payment::new(unique_name(prefix))
        }

        /// Regression: a record holding a value the stores never write (here a status
        /// of 7) fails a delivery with a non-retryable `Corrupt` error that names the
        /// record's scope; the body does not run and the row is left as it was.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn corrupt_record_fails_the_delivery_as_corrupt() {
            let env = env().await;
            let p = payment("corrupt");
            deliver(&env.pool, &p).await;
            sqlx::query(CORRUPT)
                .bind(key(&p.id).key())
                .execute(&env.pool)
                .await
                .expect("corrupt the record");
            let mut tx = env.pool.begin().await.expect("begin");
            match pay(&p, &mut tx).await {
                Err(AppError::Idempotency(Error::Store(e))) => {
                    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
                    assert!(!e.is_retryable());
                    assert!(e.to_string().contains(key(&p.id).scope()), "{e}");
                }
                other => panic!("expected a Corrupt store error, got {other:?}"),
            }
            tx.rollback().await.expect("rollback");
            assert_eq!(ledger(&env.pool, &p.id).await.0, 1, "the body ran again");
            let e = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(&p.id))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:?}");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_consumers_apply_each_payment_once() {
            let env = env().await;
            let run = unique_name("race");
            let payments: Arc<Vec<Payment>> = Arc::new(
                (0..50)
                    .map(|i| Payment::new(format!("{run}-{i}")))
                    .collect(),
            );
            let consumers = (0..8).map(|c| {
                let pool = env.pool.clone();
                let payments = payments.clone();
                // spawned: the handler's future is Send
                tokio::spawn(async move {
                    let mut got = vec![None; payments.len()];
                    for k in 0..payments.len() {
                        let i = (k + c * 7) % payments.len();
                        got[i] = Some(deliver(&pool, &payments[i]).await);
                    }
                    got
                })
            });
            let receipts: Vec<Vec<Option<Receipt>>> = join_all(consumers)
                .await
                .into_iter()
                .map(|r| r.expect("consumer task"))
                .collect();
            for (i, p) in payments.iter().enumerate() {
                let first = receipts[0][i].clone().expect("a receipt");
                assert_eq!(first.payment, p.id);
                for (c, got) in receipts.iter().enumerate() {
                    assert_eq!(got[i].as_ref(), Some(&first), "consumer {c}, payment {i}");
                }
                assert_eq!(
                    ledger(&env.pool, &p.id).await,
                    (1, Some(first.seq)),
                    "payment {i}: one ledger row, from the execution whose receipt was replayed"
                );
                let rec = env
                    .store
                    .as_admin()
                    .unwrap()
                    .inspect(&key(&p.id))
                    .await
                    .expect("inspect")
                    .expect("record");
                assert_eq!(rec.state, RecordState::Completed);
                assert_eq!(rec.attempts, 1, "payment {i}");
            }
        }

        #[tokio::test]
        async fn first_delivery_and_duplicate() {
            let env = env().await;
            let p = payment("first");
            let first = deliver(&env.pool, &p).await;
            let rec = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(&p.id))
                .await
                .expect("inspect")
                .expect("record");
            assert_eq!(rec.state, RecordState::Completed);
            assert_eq!(rec.attempts, 1);
            assert_eq!(
                String::from_utf8(rec.output.expect("cached output")).expect("JSON"),
                format!("{{\"payment\":\"{}\",\"seq\":{}}}", p.id, first.seq),
                "the output is cached as JSON, as the stores cache it"
            );
            assert!(rec.expires_in.expect("expiry") > Duration::from_secs(6 * 24 * 3600));
            let again = deliver(&env.pool, &p).await;
            assert_eq!(again, first);
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(first.seq)));
        }

        #[tokio::test]
        async fn failing_handler_leaves_no_mark() {
            let env = env().await;
            let p = payment("declined");
            let mut tx = env.pool.begin().await.expect("begin");
            let r = pay(&p.declined(), &mut tx).await;
            assert!(matches!(r, Err(AppError::Declined)), "{r:?}");
            tx.rollback().await.expect("rollback");
            assert_no_mark(&env, &p.id).await;

            let receipt = deliver(&env.pool, &p).await;
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(receipt.seq)));
            let rec = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(&p.id))
                .await
                .expect("inspect")
                .expect("record");
            assert_eq!((rec.state, rec.attempts), (RecordState::Completed, 1));
            assert_eq!(deliver(&env.pool, &p).await, receipt);
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(receipt.seq)));
        }

        #[tokio::test]
        async fn commit_after_a_handler_error_leaves_the_key_claimable() {
            // the caller commits although the handler failed: the ledger row it wrote
            // stays (the caller's choice), the claim is not Completed and the next
            // delivery takes it over at once as the second attempt
            let env = env().await;
            let p = payment("committed-error");
            let mut tx = env.pool.begin().await.expect("begin");
            assert!(matches!(
                pay(&p.declined(), &mut tx).await,
                Err(AppError::Declined)
            ));
            tx.commit().await.expect("commit");
            let rec = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(&p.id))
                .await
                .expect("inspect")
                .expect("record");
            assert_ne!(rec.state, RecordState::Completed);
            assert_eq!(rec.lease_remaining, None);
            let receipt = deliver(&env.pool, &p).await;
            let rec = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(&p.id))
                .await
                .expect("inspect")
                .expect("record");
            assert_eq!((rec.state, rec.attempts), (RecordState::Completed, 2));
            assert_eq!(ledger(&env.pool, &p.id).await.0, 2);
            assert_eq!(deliver(&env.pool, &p).await, receipt);
        }

        #[tokio::test]
        async fn caller_rollback_after_success_leaves_no_mark() {
            let env = env().await;
            let p = payment("rolled-back");
            let mut tx = env.pool.begin().await.expect("begin");
            let lost = pay(&p, &mut tx).await.expect("first run");
            tx.rollback().await.expect("rollback");
            assert_no_mark(&env, &p.id).await;

            let receipt = deliver(&env.pool, &p).await;
            assert_ne!(receipt.seq, lost.seq, "the redelivery ran the body again");
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(receipt.seq)));
            assert_eq!(deliver(&env.pool, &p).await, receipt);
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(receipt.seq)));
        }

        #[tokio::test]
        async fn crash_before_commit_leaves_no_mark() {
            // the consumer dies between the business write (and the completion) and the
            // commit: its transaction is dropped, never committed
            let env = env().await;
            let p = payment("crashed");
            let mut tx = env.pool.begin().await.expect("begin");
            pay(&p, &mut tx).await.expect("the body ran");
            drop(tx);
            assert_no_mark(&env, &p.id).await;

            let receipt = deliver(&env.pool, &p).await;
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(receipt.seq)));
            assert_eq!(deliver(&env.pool, &p).await, receipt);
        }

        /// Runs the first delivery up to (not including) its commit, then starts a
        /// duplicate in another transaction: it waits on the row lock until the first
        /// ends. Returns the first's receipt and transaction, and the duplicate's task.
        async fn first_holds_the_lock(
            env: &Env,
            p: &Payment,
        ) -> (
            Receipt,
            Transaction<'static, Db>,
            tokio::task::JoinHandle<Result<Receipt, AppError>>,
        ) {
            let mut first_tx = env.pool.begin().await.expect("begin");
            let first = pay(p, &mut first_tx).await.expect("first delivery");
            let dup = {
                let pool = env.pool.clone();
                let p = p.clone();
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.expect("begin");
                    let r = pay(&p, &mut tx).await;
                    if r.is_ok() {
                        tx.commit().await.expect("commit the duplicate");
                    }
                    r
                })
            };
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(
                !dup.is_finished(),
                "the duplicate did not wait for the first transaction"
            );
            (first, first_tx, dup)
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_waits_then_replays_the_committed_output() {
            let env = env().await;
            let p = payment("wait-commit");
            let (first, first_tx, dup) = first_holds_the_lock(&env, &p).await;
            first_tx.commit().await.expect("commit");
            let replayed = dup.await.expect("task").expect("duplicate");
            assert_eq!(replayed, first);
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(first.seq)));
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_waits_then_claims_after_a_rollback() {
            let env = env().await;
            let p = payment("wait-rollback");
            let (first, first_tx, dup) = first_holds_the_lock(&env, &p).await;
            first_tx.rollback().await.expect("rollback");
            let second = dup.await.expect("task").expect("duplicate");
            assert_ne!(second.seq, first.seq, "the duplicate ran the body itself");
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(second.seq)));
            let rec = env
                .store
                .as_admin()
                .unwrap()
                .inspect(&key(&p.id))
                .await
                .expect("inspect")
                .expect("record");
            assert_eq!((rec.state, rec.attempts), (RecordState::Completed, 1));
        }

        #[tokio::test]
        async fn forget_of_the_store_frees_a_tx_record() {
            let env = env().await;
            let p = payment("forget");
            let first = deliver(&env.pool, &p).await;
            assert!(
                env.store
                    .as_admin()
                    .unwrap()
                    .forget(&key(&p.id))
                    .await
                    .expect("forget")
            );
            let second = deliver(&env.pool, &p).await;
            assert_ne!(second.seq, first.seq);
            assert_eq!(ledger(&env.pool, &p.id).await.0, 2);
        }

        #[tokio::test]
        async fn another_table() {
            let env = env().await;
            let p = payment("custom");
            let mut tx = env.pool.begin().await.expect("begin");
            let first = pay_custom(&p, &mut tx).await.expect("first");
            tx.commit().await.expect("commit");
            let mut tx = env.pool.begin().await.expect("begin");
            assert_eq!(pay_custom(&p, &mut tx).await.expect("duplicate"), first);
            tx.commit().await.expect("commit");
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(first.seq)));

            let key = RecordKey::new("tx-custom", p.id.as_str()).expect("key");
            let rec = env
                .custom
                .as_admin()
                .unwrap()
                .inspect(&key)
                .await
                .expect("inspect")
                .expect("record");
            assert_eq!(rec.state, RecordState::Completed);
            assert!(rec.expires_in.expect("expiry") <= Duration::from_secs(3600));
            assert!(
                env.store
                    .as_admin()
                    .unwrap()
                    .inspect(&key)
                    .await
                    .expect("inspect")
                    .is_none()
            );
        }
    };
}

/// The consumer's connection is killed between the business write (and the
/// completion) and the commit: the commit fails and leaves no mark, and the
/// redelivery applies the payment once. `$id` reads the connection's id, and `$kill`
/// kills the connection of that id from another connection of the pool.
macro_rules! killed_connection_case {
    ($id:expr, $kill:expr) => {
        #[tokio::test]
        async fn killed_connection_before_commit_leaves_no_mark() {
            let env = env().await;
            let p = payment("killed");
            let mut tx = env.pool.begin().await.expect("begin");
            let id = sqlx::query_scalar($id)
                .fetch_one(&mut *tx)
                .await
                .expect("connection id");
            pay(&p, &mut tx).await.expect("the body ran");
            let kill = $kill;
            kill(&env.pool, id).await;
            assert!(
                tx.commit().await.is_err(),
                "the commit reached a dead connection"
            );
            assert_no_mark(&env, &p.id).await;
            let receipt = deliver(&env.pool, &p).await;
            assert_eq!(ledger(&env.pool, &p.id).await, (1, Some(receipt.seq)));
        }
    };
}

/// An [`EnvOf`] on `$pool` (and its `$files`) with two stores of type `$store`, their
/// tables created.
macro_rules! env_of {
    ($store:ty, $pool:expr, $files:expr) => {{
        let pool = $pool;
        let store = <$store>::from_pool(pool.clone());
        store.migrate().await.expect("create the dedup table");
        let custom = <$store>::from_pool(pool.clone())
            .with_table("tx_custom_dedup")
            .expect("table name");
        custom
            .migrate()
            .await
            .expect("create the custom dedup table");
        EnvOf {
            pool,
            store: Arc::new(store),
            custom: Arc::new(custom),
            files: $files,
        }
    }};
}

mod postgres {
    use super::*;
    use idempotent_runtime::PostgresStore;
    use idempotent_runtime::sqlx::postgres::PgPoolOptions;

    type Db = sqlx::Postgres;
    type Env = super::EnvOf<Db>;
    const URL_VAR: &str = "IDEMPOTENT_POSTGRES_URL";
    const INSERT: &str = "INSERT INTO tx_ledger (payment_id, seq, amount) VALUES ($1, $2, $3)";
    const COUNT: &str = "SELECT COUNT(*), MIN(seq) FROM tx_ledger WHERE payment_id = $1";
    const CORRUPT: &str = "UPDATE message_idempotent SET status = 7 WHERE message_id = $1";

    async fn env() -> Env {
        let url = env_url(URL_VAR, "postgres://postgres@127.0.0.1:5432/test");
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!("the tx tests need PostgreSQL at {url} (set {URL_VAR} to use another): {e}")
            });
        // serialized like the stores' migrations: concurrent CREATE TABLE IF NOT EXISTS
        // can collide in PostgreSQL's catalog
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tx_ledger')::int8)")
            .execute(&mut *tx)
            .await
            .expect("lock");
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tx_ledger (\
             payment_id VARCHAR(100) NOT NULL, seq BIGINT NOT NULL, amount BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .expect("create the ledger");
        tx.commit().await.expect("commit");
        env_of!(PostgresStore, pool, Vec::new())
    }

    tx_cases!();

    killed_connection_case!(
        "SELECT pg_backend_pid()",
        async |pool: &sqlx::PgPool, pid: i32| {
            let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(pool)
                .await
                .expect("terminate");
            assert!(killed);
        }
    );

    /// Under REPEATABLE READ (and SERIALIZABLE) a duplicate whose snapshot predates the
    /// first delivery's commit cannot see that row: its claim fails with a retryable
    /// `Conflict`, and the redelivery, in a new transaction, replays.
    #[tokio::test]
    async fn repeatable_read_duplicate_is_a_retryable_conflict() {
        for level in ["REPEATABLE READ", "SERIALIZABLE"] {
            let env = env().await;
            let p = payment("rr");
            let mut late = env.pool.begin().await.expect("begin");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SET TRANSACTION ISOLATION LEVEL {level}"
            )))
            .execute(&mut *late)
            .await
            .expect("isolation");
            // the snapshot is taken here, before the first delivery commits
            sqlx::query("SELECT 1")
                .execute(&mut *late)
                .await
                .expect("snapshot");
            let first = deliver(&env.pool, &p).await;
            match pay(&p, &mut late).await {
                Err(AppError::Idempotency(Error::Store(e))) => {
                    assert_eq!(e.kind(), StoreErrorKind::Conflict, "{level}: {e:?}");
                    assert!(Error::Store(e).is_retryable());
                }
                other => panic!("{level}: expected a conflict, got {other:?}"),
            }
            late.rollback().await.expect("rollback");
            assert_eq!(deliver(&env.pool, &p).await, first, "{level}");
            assert_eq!(
                ledger(&env.pool, &p.id).await,
                (1, Some(first.seq)),
                "{level}"
            );
        }
    }
}

mod mysql {
    use super::*;
    use idempotent_runtime::MySqlStore;
    use idempotent_runtime::sqlx::AssertSqlSafe;
    use idempotent_runtime::sqlx::mysql::MySqlPoolOptions;

    type Db = sqlx::MySql;
    type Env = super::EnvOf<Db>;
    const URL_VAR: &str = "IDEMPOTENT_MYSQL_URL";
    const INSERT: &str = "INSERT INTO tx_ledger (payment_id, seq, amount) VALUES (?, ?, ?)";
    const COUNT: &str = "SELECT COUNT(*), MIN(seq) FROM tx_ledger WHERE payment_id = ?";
    const CORRUPT: &str = "UPDATE message_idempotent SET status = 7 WHERE message_id = ?";

    async fn env() -> Env {
        let url = env_url(URL_VAR, "mysql://root@127.0.0.1:3306/test");
        let pool = MySqlPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!("the tx tests need MySQL at {url} (set {URL_VAR} to use another): {e}")
            });
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tx_ledger (\
             payment_id VARCHAR(100) NOT NULL, seq BIGINT NOT NULL, amount BIGINT NOT NULL) \
             ENGINE = InnoDB",
        )
        .execute(&pool)
        .await
        .expect("create the ledger");
        env_of!(MySqlStore, pool, Vec::new())
    }

    tx_cases!();

    killed_connection_case!(
        "SELECT CONNECTION_ID()",
        async |pool: &sqlx::MySqlPool, id: u64| {
            sqlx::query(AssertSqlSafe(format!("KILL {id}")))
                .execute(pool)
                .await
                .expect("kill");
        }
    );

    /// InnoDB: the claim's locking statements read the latest committed row whatever
    /// the transaction's snapshot, so under REPEATABLE READ (the default) and
    /// SERIALIZABLE a duplicate whose snapshot predates the first commit still replays.
    #[tokio::test]
    async fn repeatable_read_duplicate_replays() {
        for level in ["REPEATABLE READ", "SERIALIZABLE", "READ COMMITTED"] {
            let env = env().await;
            let p = payment("rr");
            let mut conn = env.pool.acquire().await.expect("connection");
            sqlx::query(AssertSqlSafe(format!(
                "SET SESSION TRANSACTION ISOLATION LEVEL {level}"
            )))
            .execute(&mut *conn)
            .await
            .expect("isolation");
            let mut late = sqlx::Connection::begin(&mut *conn).await.expect("begin");
            // the snapshot is taken here, before the first delivery commits (a read of
            // another table: under SERIALIZABLE reads lock what they scan)
            let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tx_custom_dedup WHERE scope = ?")
                .bind("tx-snapshot")
                .fetch_one(&mut *late)
                .await
                .expect("snapshot");
            let first = deliver(&env.pool, &p).await;
            assert_eq!(pay(&p, &mut late).await.expect(level), first, "{level}");
            late.commit().await.expect("commit");
            sqlx::query("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *conn)
                .await
                .expect("isolation");
            assert_eq!(
                ledger(&env.pool, &p.id).await,
                (1, Some(first.seq)),
                "{level}"
            );
        }
    }
}

mod sqlite {
    use super::*;
    use idempotent_runtime::SqliteStore;
    use idempotent_runtime::sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions,
    };
    use std::str::FromStr;

    type Db = sqlx::Sqlite;
    type Env = super::EnvOf<Db>;
    const INSERT: &str = "INSERT INTO tx_ledger (payment_id, seq, amount) VALUES (?1, ?2, ?3)";
    const COUNT: &str = "SELECT COUNT(*), MIN(seq) FROM tx_ledger WHERE payment_id = ?1";
    const CORRUPT: &str = "UPDATE message_idempotent SET status = 7 WHERE message_id = ?1";

    /// One database file per test, removed with the test's `Env`.
    async fn env() -> Env {
        let file = std::env::temp_dir().join(format!("{}.db", unique_name("idempotent_tx")));
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}?mode=rwc", file.display()))
                .expect("url")
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(12)
            .connect_with(options)
            .await
            .expect("open the SQLite file");
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tx_ledger (\
             payment_id TEXT NOT NULL, seq INTEGER NOT NULL, amount INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("create the ledger");
        env_of!(SqliteStore, pool, vec![file])
    }

    tx_cases!();
}

/// A database's pool and two stores on it: the default table and `tx_custom_dedup`.
struct EnvOf<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    store: Arc<dyn Store>,
    custom: Arc<dyn Store>,
    /// Database files (SQLite) removed, with their WAL files, when the test ends.
    files: Vec<std::path::PathBuf>,
}

impl<DB: sqlx::Database> Drop for EnvOf<DB> {
    fn drop(&mut self) {
        for file in &self.files {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = file.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
