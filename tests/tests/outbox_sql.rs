//! The outbox on the SQL stores: the outbox conformance cases
//! (`idempotent_runtime::testing::conformance::outbox`) against MariaDB/MySQL
//! (`IDEMPOTENT_MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`), PostgreSQL
//! (`IDEMPOTENT_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`) and
//! SQLite (a file in the temporary directory), each case on a table of its own; and
//! what is particular to the SQL tables (names, schemas, the business writes the
//! messages commit or roll back with).
//!
//! The server tests fail, naming the variable, when their server is unreachable.

use idempotent_runtime::StoreError;
use idempotent_runtime::outbox::{Outbox, OutboxStore, OutboxTransaction};
use idempotent_runtime::testing::conformance::outbox::OutboxFixture;
use std::sync::Arc;

/// A fixture of one outbox table on a pool: writes go through `enqueue_in_tx` in a
/// transaction of the pool; `$drop` drops the table.
macro_rules! fixture {
    ($name:ident, $db:ty, $outbox:ty, $store:ty) => {
        struct $name {
            outbox: Arc<$outbox>,
            pool: idempotent_runtime::sqlx::Pool<$db>,
            table: String,
            cleanup: Vec<String>,
            files: Vec<std::path::PathBuf>,
        }

        impl $name {
            /// The fixture of the new outbox table `table` of `store`; `cleanup`
            /// drops it, and the `files` go with it.
            async fn on(
                store: &$store,
                table: String,
                cleanup: String,
                files: Vec<std::path::PathBuf>,
            ) -> Arc<dyn OutboxFixture> {
                let outbox = store
                    .outbox(&table)
                    .await
                    .expect("creating the outbox table");
                Arc::new($name {
                    outbox: Arc::new(outbox),
                    pool: store.pool().clone(),
                    cleanup: vec![cleanup],
                    files,
                    table,
                })
            }
        }

        #[async_trait::async_trait]
        impl OutboxFixture for $name {
            fn store(&self) -> Arc<dyn OutboxStore> {
                self.outbox.clone()
            }

            async fn write(&self, outbox: &Outbox, commit: bool) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await.expect("beginning a transaction");
                let written = tx.enqueue_in_tx(&self.table, outbox).await;
                if written.is_ok() && commit {
                    tx.commit().await.expect("committing");
                } else {
                    tx.rollback().await.expect("rolling back");
                }
                written
            }

            async fn drop_table(&self) {
                for stmt in &self.cleanup {
                    idempotent_runtime::sqlx::raw_sql(idempotent_runtime::sqlx::AssertSqlSafe(
                        stmt.clone(),
                    ))
                    .execute(&self.pool)
                    .await
                    .unwrap_or_else(|e| panic!("{stmt}: {e}"));
                }
                for f in &self.files {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
    };
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use idempotent_runtime::outbox::{DEFAULT_OUTBOX_TABLE, RowStatus};
    use idempotent_runtime::sqlx::{self, AssertSqlSafe, Postgres};
    use idempotent_runtime::{PostgresOutbox, PostgresStore, RecordKey, StoreErrorKind};
    use idempotent_tests::sql_support::{env_url, unique_name};

    const URL_VAR: &str = "IDEMPOTENT_POSTGRES_URL";

    async fn store() -> PostgresStore {
        let url = env_url(URL_VAR, "postgres://postgres@127.0.0.1:5432/test");
        PostgresStore::connect(&url).await.unwrap_or_else(|e| {
            panic!("the PostgreSQL outbox tests need a server at {url} (set {URL_VAR}): {e}")
        })
    }

    fixture!(PgFixture, Postgres, PostgresOutbox, PostgresStore);

    async fn make() -> Arc<dyn OutboxFixture> {
        let table = unique_name("outbox");
        let drop = format!("DROP TABLE \"{table}\"");
        PgFixture::on(&store().await, table, drop, Vec::new()).await
    }

    idempotent_runtime::outbox_conformance_suite!(make());

    /// A schema-qualified table, the messages committed or rolled back with the
    /// business writes of their transaction.
    #[tokio::test]
    async fn schema_table_commits_and_rolls_back_with_the_business_writes() {
        let store = store().await;
        let schema = unique_name("outbox_schema");
        let pool = store.pool().clone();
        let exec = async |s: String| {
            sqlx::raw_sql(AssertSqlSafe(s.clone()))
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        };
        exec(format!("CREATE SCHEMA \"{schema}\"")).await;
        exec(format!(
            "CREATE TABLE \"{schema}\".orders (id TEXT PRIMARY KEY)"
        ))
        .await;
        let table = format!("{schema}.{DEFAULT_OUTBOX_TABLE}");
        let outbox = store.outbox(&table).await.unwrap();
        assert_eq!(outbox.table(), table);
        assert!(outbox.schema()[0].contains(&format!("\"{schema}\".\"idempotent_outbox\"")));
        for (order, commit) in [("o-1", false), ("o-2", true)] {
            let mut o = Outbox::new();
            o.bind(&RecordKey::new("orders", order).unwrap());
            o.emit("payments", order.as_bytes().to_vec());
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{schema}\".orders VALUES ($1)"
            )))
            .bind(order)
            .execute(&mut *tx)
            .await
            .unwrap();
            tx.enqueue_in_tx(&table, &o).await.unwrap();
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
        }
        let page = outbox.list(RowStatus::Pending, None, 10).await.unwrap();
        let payloads: Vec<&[u8]> = page.rows.iter().map(|r| r.message.payload()).collect();
        assert_eq!(payloads, [b"o-2"]);
        let orders: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM \"{schema}\".orders"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(orders, 1);
        exec(format!("DROP SCHEMA \"{schema}\" CASCADE")).await;
    }

    /// Bad table names are refused, by the handle and by the transaction.
    #[tokio::test]
    async fn bad_table_names_are_refused() {
        let store = store().await;
        for bad in ["a.b.c", "x; DROP TABLE y", "q\"uote"] {
            let e = store.outbox(bad).await.unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Rejected, "{bad}: {e:?}");
            assert!(PostgresOutbox::new(store.pool().clone(), bad).is_err());
            let mut o = Outbox::new();
            o.bind(&RecordKey::new("s", "k").unwrap());
            o.emit("d", Vec::new());
            let mut tx = store.pool().begin().await.unwrap();
            let e = tx.enqueue_in_tx(bad, &o).await.unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Rejected, "{bad}: {e:?}");
        }
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use idempotent_runtime::sqlx::MySql;
    use idempotent_runtime::{MySqlOutbox, MySqlStore};
    use idempotent_tests::sql_support::{env_url, unique_name};

    const URL_VAR: &str = "IDEMPOTENT_MYSQL_URL";

    fixture!(MyFixture, MySql, MySqlOutbox, MySqlStore);

    async fn make() -> Arc<dyn OutboxFixture> {
        let url = env_url(URL_VAR, "mysql://root@127.0.0.1:3306/test");
        let store = MySqlStore::connect(&url).await.unwrap_or_else(|e| {
            panic!("the MySQL outbox tests need a server at {url} (set {URL_VAR}): {e}")
        });
        let table = unique_name("outbox");
        let drop = format!("DROP TABLE `{table}`");
        MyFixture::on(&store, table, drop, Vec::new()).await
    }

    idempotent_runtime::outbox_conformance_suite!(make());
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use idempotent_runtime::sqlx::Sqlite;
    use idempotent_runtime::{SqliteOutbox, SqliteStore};
    use idempotent_tests::sql_support::unique_name;

    fixture!(LiteFixture, Sqlite, SqliteOutbox, SqliteStore);

    async fn make() -> Arc<dyn OutboxFixture> {
        let path = std::env::temp_dir().join(format!("{}.db", unique_name("idempotent_outbox")));
        let store = SqliteStore::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("opening the SQLite database");
        let files = ["", "-wal", "-shm"]
            .iter()
            .map(|s| format!("{}{s}", path.display()).into())
            .collect();
        LiteFixture::on(&store, "outbox".into(), "DROP TABLE outbox".into(), files).await
    }

    idempotent_runtime::outbox_conformance_suite!(make());
}

/// The relay's metrics, per destination: the gauges of pending and dead rows and of
/// the oldest pending row's age, the publish latency histogram and the dead counter.
#[cfg(all(feature = "metrics", feature = "sqlite"))]
mod metrics {
    use super::*;
    use ::metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder};
    use ::metrics::{GaugeFn, HistogramFn, SharedString, Unit};
    use idempotent_runtime::outbox::{MemoryPublisher, PublishErrorKind, Relay};
    use idempotent_runtime::{RecordKey, SqliteStore};
    use idempotent_tests::sql_support::unique_name;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Every value recorded, by `name{label=value,…}`: a gauge's last value, a
    /// histogram's values, a counter's increments.
    #[derive(Default)]
    struct Seen(Mutex<HashMap<String, Vec<f64>>>);

    struct Slot(Arc<Seen>, String, bool);

    impl Slot {
        fn put(&self, v: f64) {
            let mut seen = self.0.0.lock().unwrap();
            let values = seen.entry(self.1.clone()).or_default();
            if self.2 {
                values.clear();
            }
            values.push(v);
        }
    }

    impl GaugeFn for Slot {
        fn increment(&self, _: f64) {
            unreachable!("the relay sets its gauges")
        }
        fn decrement(&self, _: f64) {
            unreachable!("the relay sets its gauges")
        }
        fn set(&self, v: f64) {
            self.put(v);
        }
    }

    impl HistogramFn for Slot {
        fn record(&self, v: f64) {
            self.put(v);
        }
    }

    impl ::metrics::CounterFn for Slot {
        fn increment(&self, n: u64) {
            self.put(n as f64);
        }
        fn absolute(&self, _: u64) {
            unreachable!("the relay increments its counters")
        }
    }

    struct Rec(Arc<Seen>);

    impl Rec {
        fn slot(&self, key: &Key, last_only: bool) -> Arc<Slot> {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            Arc::new(Slot(self.0.clone(), name, last_only))
        }
    }

    impl Recorder for Rec {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.slot(key, false))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.slot(key, true))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.slot(key, false))
        }
    }

    #[tokio::test]
    async fn relay_metrics_per_destination() {
        let seen = Arc::new(Seen::default());
        ::metrics::set_global_recorder(Rec(seen.clone())).expect("the only recorder");
        let values = |name: &str| {
            seen.0
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .unwrap_or_default()
        };

        let path = std::env::temp_dir().join(format!("{}.db", unique_name("outbox_metrics")));
        let store = SqliteStore::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        let outbox = store.outbox("outbox").await.unwrap();
        let broker = Arc::new(MemoryPublisher::new());
        let relay = Relay::shared(Arc::new(outbox), broker.clone()).max_attempts(1);
        let mut o = Outbox::new();
        o.bind(&RecordKey::new("metrics", "k").unwrap());
        o.emit("alpha", b"1".to_vec());
        o.emit("alpha", b"2".to_vec());
        o.emit("beta", b"3".to_vec());
        let mut tx = store.pool().begin().await.unwrap();
        tx.enqueue_in_tx("outbox", &o).await.unwrap();
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        relay.report_stats().await.unwrap();
        assert_eq!(
            values("idempotent_outbox_pending{destination=alpha}"),
            [2.0]
        );
        assert_eq!(values("idempotent_outbox_pending{destination=beta}"), [1.0]);
        assert_eq!(values("idempotent_outbox_dead{destination=beta}"), [0.0]);
        let age = values("idempotent_outbox_oldest_pending_seconds{destination=alpha}");
        assert!(age[0] >= 0.04 && age[0] < 60.0, "{age:?}");

        // the three rows are claimed in one batch and published at once; one publish
        // (whichever comes first) is rejected, and with one attempt allowed, dead
        broker.fail_next(1, PublishErrorKind::Rejected);
        let pass = relay.drain().await.unwrap();
        assert_eq!((pass.sent, pass.dead), (2, 1), "{pass:?}");
        let count = |outcome: &str| -> usize {
            ["alpha", "beta"]
                .iter()
                .map(|d| {
                    let key = format!(
                        "idempotent_outbox_publish_seconds{{destination={d},outcome={outcome}}}"
                    );
                    values(&key).len()
                })
                .sum()
        };
        assert_eq!((count("ok"), count("rejected")), (2, 1));
        relay.report_stats().await.unwrap();
        let dead: f64 = ["alpha", "beta"]
            .iter()
            .map(|d| values(&format!("idempotent_outbox_dead{{destination={d}}}"))[0])
            .sum();
        assert_eq!(dead, 1.0);
        let dead_total: f64 = ["alpha", "beta"]
            .iter()
            .flat_map(|d| values(&format!("idempotent_outbox_dead_total{{destination={d}}}")))
            .sum();
        assert_eq!(dead_total, 1.0);
        assert_eq!(
            values("idempotent_outbox_pending{destination=alpha}")[0]
                + values("idempotent_outbox_pending{destination=beta}")[0],
            0.0
        );
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
