//! The `idempotent` binary against the shared PostgreSQL server
//! (`IDEMPOTENT_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`), on a
//! table of its own that `migrate` creates: every command's output and effect.
#![cfg(feature = "postgres")]

mod support;

use idempotent_runtime::PostgresStore;
use support::{ERROR, FOUND, Target, check_every_command, refused_at_once, seed, unique};

#[tokio::test]
async fn every_command_on_postgres() {
    let url = std::env::var("IDEMPOTENT_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = unique("cli_test_");
    let target = Target::sql_table(&url, &table);
    let r = target.run(&["list"]).expect(ERROR);
    assert!(r.stderr.contains("idempotent migrate"), "{}", r.stderr);
    let r = target.run(&["schema", "--print"]).expect(FOUND);
    assert!(
        r.stdout
            .contains(&format!("CREATE TABLE IF NOT EXISTS \"{table}\""))
    );
    target.run(&["migrate"]).expect(FOUND);
    let store = PostgresStore::connect_with_table(&url, &table)
        .await
        .unwrap_or_else(|e| {
            panic!("the PostgreSQL tests need a server at {url} (set IDEMPOTENT_POSTGRES_URL): {e}")
        });
    let scope = unique("orders-");
    let seeded = seed(&store, &scope).await;
    check_every_command(&target, &store, &seeded).await;
    let r =
        support::run(&["--store", &url.replace("/test", "/no_such_db_cli"), "list"]).expect(ERROR);
    assert!(r.stderr.contains("database name"), "{}", r.stderr);
    idempotent_runtime::sqlx::query(idempotent_runtime::sqlx::AssertSqlSafe(format!(
        "DROP TABLE \"{table}\""
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

#[test]
fn a_refused_connection_fails_at_once() {
    let port = idempotent_tests::stores::free_port();
    let r = refused_at_once(&format!("postgres://root:secret@127.0.0.1:{port}/test"));
    assert!(!r.stderr.contains("secret"), "{}", r.stderr);
    refused_at_once(&format!("postgresql://root@127.0.0.1:{port}/test"));
}

/// The outbox commands on an outbox table of the test's own.
#[tokio::test]
async fn outbox_commands_on_postgres() {
    let url = std::env::var("IDEMPOTENT_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = PostgresStore::connect(&url).await.unwrap_or_else(|e| {
        panic!("the PostgreSQL tests need a server at {url} (set IDEMPOTENT_POSTGRES_URL): {e}")
    });
    let table = unique("cli_outbox_");
    let target = Target::sql_table(&url, &unique("cli_test_"));
    let pool = store.pool().clone();
    support::check_outbox_commands(&target, &table, &pool, || {
        idempotent_runtime::PostgresOutbox::new(pool.clone(), &table).unwrap()
    })
    .await;
    idempotent_runtime::sqlx::query(idempotent_runtime::sqlx::AssertSqlSafe(format!(
        "DROP TABLE \"{table}\""
    )))
    .execute(&pool)
    .await
    .unwrap();
}
