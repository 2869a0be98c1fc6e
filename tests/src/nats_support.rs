//! Helpers for the NATS JetStream tests: the server's URL and a connection that fails
//! loudly, naming what is missing, when the server or JetStream is not there.
//!
//! Compiled with the `nats` feature only.
#![cfg(feature = "nats")]

use async_nats::jetstream;

/// The environment variable naming the NATS server.
pub const URL_VAR: &str = "IDEMPOTENT_NATS_URL";

/// The server's URL: `$IDEMPOTENT_NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A client and its JetStream context; panics, naming the variable, when the server is
/// unreachable or has JetStream disabled.
pub async fn connect(name: &str) -> (async_nats::Client, jetstream::Context) {
    let url = nats_url();
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connect(url.as_str())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the NATS tests need a server with JetStream at {url} \
                 (`nats-server -js`; set {URL_VAR} to use another): {e}"
            )
        });
    // a raw account-info request: its reply's shape varies across server versions;
    // an error or no responder means JetStream is off
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.request("$JS.API.INFO", "".into()),
    )
    .await;
    let ok =
        matches!(&reply, Ok(Ok(m)) if !String::from_utf8_lossy(&m.payload).contains("\"error\""));
    if !ok {
        panic!(
            "the NATS server at {url} does not answer JetStream requests (start it with -js): {:?}",
            reply.map(|r| r.map(|m| String::from_utf8_lossy(&m.payload).into_owned()))
        );
    }
    let js = jetstream::new(client.clone());
    (client, js)
}

/// A suffix unique to this test run, for stream, consumer and business ids.
pub fn run_id() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
