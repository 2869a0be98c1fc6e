//! An axum service whose POST routes are idempotent under the `Idempotency-Key` header,
//! and a client that meets every answer of the layer:
//!
//! ```sh
//! cargo run -p idempotent-examples --example http --features http                      # memory store
//! cargo run -p idempotent-examples --example http --features http -- --store redis      # $IDEMPOTENT_REDIS_URL
//! cargo run -p idempotent-examples --example http --features http -- --serve 127.0.0.1:3000
//! ```
//!
//! With `--serve ADDR` it only serves (try
//! `curl -i -X POST localhost:3000/payments -H 'Idempotency-Key: "k-1"' -H 'x-api-key: alice' -d 'amount=5'`
//! twice, then as `x-api-key: bob`, then without `x-api-key`); otherwise it serves on a
//! free port and runs the client below against it.

mod support;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idempotent_runtime::http::{IdempotencyKey, IdempotencyLayer};
use idempotent_runtime::{MemoryStore, RedisStore, Store, current_claim};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The business side: how many payments were charged, and a gateway that fails once.
#[derive(Default)]
struct Payments {
    charged: AtomicU32,
    gateway_calls: AtomicU32,
}

async fn pay(
    State(p): State<Arc<Payments>>,
    IdempotencyKey(key): IdempotencyKey,
    body: String,
) -> impl IntoResponse {
    // the claim's fencing token can fence downstream writes, as in message handlers
    let token = current_claim().map(|c| c.token.get()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(200)).await; // the payment gateway
    let n = p.charged.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        format!(r#"{{"payment":{n},"key":{key:?},"request":{body:?},"fence":{token}}}"#),
    )
}

async fn refund(State(p): State<Arc<Payments>>) -> impl IntoResponse {
    // the gateway is down on the first call: 503 releases the key, the retry runs
    if p.gateway_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "gateway down, retry")
    } else {
        (StatusCode::OK, "refunded")
    }
}

fn app(store: Arc<dyn Store>, payments: Arc<Payments>) -> Router {
    let idempotency = IdempotencyLayer::with_shared_store(store)
        .required()
        // one client cannot see another's responses, even with the same key
        .client_identity(|req| {
            req.headers
                .get("x-api-key")?
                .to_str()
                .ok()
                .map(str::to_owned)
        });
    // On each method's route (`route_layer` of the method router): a path no route
    // matches gets the router's 404, a method the route does not take its 405, and
    // neither is recorded. Authentication (an API-key check, a session) goes outside,
    // so a request it refuses is not recorded either, and the client that fixes its
    // credentials retries with the same key.
    Router::new()
        .route("/payments", post(pay).route_layer(idempotency.clone()))
        .route("/refunds", post(refund).route_layer(idempotency))
        .with_state(payments)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Sends a POST and prints the answer.
async fn post_to(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> StatusCode {
    post_as(client, addr, Some("alice"), path, key, body).await
}

/// Sends a POST as the client with API key `who` (none: anonymous) and prints the answer.
async fn post_as(
    client: &HttpClient,
    addr: SocketAddr,
    who: Option<&str>,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> StatusCode {
    let mut req = Request::post(format!("http://{addr}{path}"));
    if let Some(who) = who {
        req = req.header("x-api-key", who);
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", HeaderValue::from_str(k).expect("header"));
    }
    let res = client
        .request(
            req.body(Full::new(Bytes::from(body.to_owned())))
                .expect("request"),
        )
        .await
        .expect("the server answers");
    let status = res.status();
    let replayed = res.headers().contains_key("idempotent-replayed");
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| format!(" Retry-After: {}", v.to_str().unwrap_or("?")));
    let body = res.into_body().collect().await.expect("body").to_bytes();
    println!(
        "  POST {path} as {} key={} -> {status}{}{}\n      {}",
        who.unwrap_or("(anonymous)"),
        key.unwrap_or("(none)"),
        if replayed { " (replayed)" } else { "" },
        retry_after.unwrap_or_default(),
        String::from_utf8_lossy(&body)
    );
    status
}

async fn client_session(addr: SocketAddr, payments: &Payments) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let run = std::process::id();
    let key = format!("\"pay-{run}\"");

    println!("1. a payment, and the retry after a lost response:");
    post_to(&client, addr, "/payments", Some(&key), "amount=5").await;
    post_to(&client, addr, "/payments", Some(&key), "amount=5").await;

    println!("2. three concurrent retries of a new payment:");
    let key2 = format!("\"pay-{run}-b\"");
    let (a, b, c) = tokio::join!(
        post_to(&client, addr, "/payments", Some(&key2), "amount=7"),
        post_to(&client, addr, "/payments", Some(&key2), "amount=7"),
        post_to(&client, addr, "/payments", Some(&key2), "amount=7"),
    );
    let in_use = [a, b, c]
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    println!("   {in_use} of 3 were told to retry later (409)");

    println!("3. the same key with another amount, and no key at all:");
    post_to(&client, addr, "/payments", Some(&key), "amount=500").await;
    post_to(&client, addr, "/payments", None, "amount=5").await;

    println!("4. a refund whose first try fails with 503, retried with the same key:");
    let key3 = format!("\"refund-{run}\"");
    post_to(&client, addr, "/refunds", Some(&key3), "").await;
    post_to(&client, addr, "/refunds", Some(&key3), "").await;
    post_to(&client, addr, "/refunds", Some(&key3), "").await;

    println!("5. another client sending alice's key and body, and a client without an API key:");
    post_as(
        &client,
        addr,
        Some("bob"),
        "/payments",
        Some(&key),
        "amount=5",
    )
    .await;
    post_as(&client, addr, None, "/payments", Some(&key), "amount=5").await;

    let charged = payments.charged.load(Ordering::SeqCst);
    println!("\ncharged {charged} payments for 3 distinct requests (alice's two, bob's one)");
    assert_eq!(charged, 3, "each payment charged once");
}

async fn store_from_args(args: &[String]) -> Arc<dyn Store> {
    let choice = match args.iter().position(|a| a == "--store") {
        None => "memory",
        Some(i) => args.get(i + 1).map_or("", String::as_str),
    };
    match choice {
        "memory" => Arc::new(MemoryStore::new()),
        "redis" => {
            let url = std::env::var("IDEMPOTENT_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
            let store = support::Server::redis(&url)
                .reach(RedisStore::connect(&url))
                .await;
            Arc::new(store.unwrap_or_else(|e| support::fail(e)))
        }
        _ => {
            eprintln!("usage: http [--store memory|redis] [--serve ADDR]");
            std::process::exit(2);
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let store = store_from_args(&args).await;
    let payments = Arc::new(Payments::default());
    let serve_at = args.iter().position(|a| a == "--serve").map(|i| {
        match args.get(i + 1).map(|a| a.parse::<SocketAddr>()) {
            Some(Ok(addr)) => addr,
            _ => {
                eprintln!("--serve needs an address such as 127.0.0.1:3000");
                std::process::exit(2);
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(serve_at.unwrap_or(([127, 0, 0, 1], 0).into()))
        .await
        .unwrap_or_else(|e| {
            eprintln!("cannot listen: {e}");
            std::process::exit(1);
        });
    let addr = listener.local_addr().expect("bound address");
    let server = tokio::spawn(axum::serve(listener, app(store, payments.clone())).into_future());
    if serve_at.is_some() {
        println!("serving on http://{addr} (Ctrl-C stops)");
        let _ = server.await;
        return;
    }
    println!("serving on http://{addr}\n");
    client_session(addr, &payments).await;
    server.abort();
}
