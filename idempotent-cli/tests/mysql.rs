//! The `idempotent` binary against the shared MariaDB / MySQL server
//! (`IDEMPOTENT_MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`), on a table of
//! its own that `migrate` creates: every command's output and effect.
#![cfg(feature = "mysql")]

mod support;

use idempotent_runtime::MySqlStore;
use idempotent_runtime::sqlx::{self, AssertSqlSafe};
use support::{ERROR, FOUND, Target, check_every_command, refused_at_once, seed, unique};

#[tokio::test]
async fn every_command_on_mysql() {
    let url = std::env::var("IDEMPOTENT_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let table = unique("cli_test_");
    let target = Target::sql_table(&url, &table);
    let r = target.run(&["stats"]).expect(ERROR);
    assert!(r.stderr.contains("idempotent migrate"), "{}", r.stderr);
    let r = target.run(&["schema", "--print"]).expect(FOUND);
    assert!(
        r.stdout
            .contains(&format!("CREATE TABLE IF NOT EXISTS `{table}`")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("CREATE PROCEDURE"), "{}", r.stdout);
    target.run(&["migrate"]).expect(FOUND);
    let store = MySqlStore::connect_with_table(&url, &table)
        .await
        .unwrap_or_else(|e| {
            panic!("the MySQL tests need a server at {url} (set IDEMPOTENT_MYSQL_URL): {e}")
        });
    let scope = unique("orders-");
    let seeded = seed(&store, &scope).await;
    check_every_command(&target, &store, &seeded).await;
    for stmt in [
        format!("DROP TABLE `{table}`"),
        format!("DROP PROCEDURE IF EXISTS `{table}_claim_v1`"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(stmt))
            .execute(store.pool())
            .await
            .unwrap();
    }
}

#[test]
fn a_refused_connection_fails_at_once() {
    let port = idempotent_tests::stores::free_port();
    let r = refused_at_once(&format!("mysql://root:secret@127.0.0.1:{port}/test"));
    assert!(!r.stderr.contains("secret"), "{}", r.stderr);
    refused_at_once(&format!("mariadb://root@127.0.0.1:{port}/test"));
}

/// The outbox commands on an outbox table of the test's own.
#[tokio::test]
async fn outbox_commands_on_mysql() {
    let url = std::env::var("IDEMPOTENT_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let store = MySqlStore::connect(&url).await.unwrap_or_else(|e| {
        panic!("the MySQL tests need a server at {url} (set IDEMPOTENT_MYSQL_URL): {e}")
    });
    let table = unique("cli_outbox_");
    let target = Target::sql_table(&url, &unique("cli_test_"));
    let pool = store.pool().clone();
    support::check_outbox_commands(&target, &table, &pool, || {
        idempotent_runtime::MySqlOutbox::new(pool.clone(), &table).unwrap()
    })
    .await;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE `{table}`")))
        .execute(&pool)
        .await
        .unwrap();
}
