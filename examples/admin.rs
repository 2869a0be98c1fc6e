//! Looks at and repairs dedup records: what a store holds for a message, forgetting a
//! record so the message can be processed again, purging expired records.
//!
//! ```sh
//! cargo run -p idempotent-examples --example admin --features stores -- \
//!     redis://127.0.0.1:6379 inspect my_app::Orders::handle order-17
//! cargo run -p idempotent-examples --example admin --features stores -- \
//!     postgres://postgres@127.0.0.1/test forget orders order-17
//! cargo run -p idempotent-examples --example admin --features stores -- \
//!     sqlite://dedup.db purge
//! ```
//!
//! A key of several parts (a tuple key such as `(msg.topic, msg.id)`) is given as
//! several arguments: `inspect orders payments 17`. The scope is the handler's `scope`,
//! or its path (`my_crate::module::Type::method`) when it has none.

use idempotent_runtime::{
    MySqlStore, PostgresStore, Record, RecordKey, RecordState, RedisStore, SqliteStore, Store,
    StoreError,
};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: admin <store-url> inspect <scope> <key part>...\n       \
                     admin <store-url> forget <scope> <key part>...\n       \
                     admin <store-url> purge\n\
                     store URLs: redis://…, rediss://…, mysql://…, postgres://…, sqlite://…";

async fn connect(url: &str) -> Result<Box<dyn Store>, StoreError> {
    Ok(match url.split("://").next().unwrap_or_default() {
        "redis" | "rediss" => Box::new(RedisStore::connect(url).await?),
        "mysql" | "mariadb" => Box::new(MySqlStore::connect(url).await?),
        "postgres" | "postgresql" => Box::new(PostgresStore::connect(url).await?),
        "sqlite" => Box::new(SqliteStore::connect(url).await?),
        other => {
            return Err(StoreError::new(
                idempotent_runtime::StoreErrorKind::Rejected,
                format!("unknown store URL scheme `{other}`"),
            ));
        }
    })
}

/// The record key of `parts` under `scope`, encoded as the attribute encodes it.
fn record_key(scope: &str, parts: &[String]) -> Result<RecordKey, String> {
    let mut b = idempotent_runtime::KeyBuilder::new();
    for p in parts {
        b.push(p.as_bytes());
    }
    b.finish(scope).map_err(|e| e.to_string())
}

fn show_duration(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d.as_secs() >= 3600 => format!("{:.1} h", d.as_secs_f64() / 3600.0),
        Some(d) => format!("{:.3} s", d.as_secs_f64()),
    }
}

fn show(key: &RecordKey, r: &Record) {
    let state = match r.state {
        RecordState::InProgress if r.lease_remaining.is_some() => "in progress",
        RecordState::InProgress => "in progress, lease expired (claimable)",
        RecordState::Completed => "completed",
        RecordState::Released => "released after a failed attempt (claimable)",
        _ => "unknown",
    };
    println!("record    {key}");
    println!("state     {state}");
    println!("attempts  {}", r.attempts);
    println!("token     {}", r.token);
    println!("lease     {}", show_duration(r.lease_remaining));
    println!("expires   in {}", show_duration(r.expires_in));
    if let Some(fp) = &r.fingerprint {
        let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
        println!("fingerprint {hex}");
    }
    match &r.output {
        Some(o) => println!("output    {}", String::from_utf8_lossy(o)),
        None if r.state == RecordState::Completed => println!("output    (not cached)"),
        None => {}
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, command, rest) = match args.as_slice() {
        [url, command, rest @ ..] => (url, command.as_str(), rest),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let store = match connect(url).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open {url}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match (command, rest) {
        ("inspect", [scope, parts @ ..]) if !parts.is_empty() => match record_key(scope, parts) {
            Err(e) => Err(e),
            Ok(key) => match store.inspect(&key).await {
                Ok(Some(r)) => {
                    show(&key, &r);
                    Ok(())
                }
                Ok(None) => {
                    println!("no record for {key}: the next delivery will run");
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
        },
        ("forget", [scope, parts @ ..]) if !parts.is_empty() => match record_key(scope, parts) {
            Err(e) => Err(e),
            Ok(key) => match store.forget(&key).await {
                Ok(true) => {
                    println!("forgot {key}: the next delivery will run the handler again");
                    Ok(())
                }
                Ok(false) => {
                    println!("no record for {key}");
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
        },
        ("purge", []) => match store.purge_expired().await {
            Ok(n) => {
                println!("purged {n} expired records");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
