//! What the `Idempotency-Key` layer makes of a request's input, over real sockets
//! (`axum::serve` on 127.0.0.1:0 with hyper's client): header values that are not one
//! Structured Field Item are refused before anything runs or is recorded, and the
//! default fingerprint tells requests apart by their content type and encoding, and a
//! `multipart/form-data` body by its parts rather than by its boundary.
#![cfg(feature = "axum")]

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idempotent_runtime::MemoryStore;
use idempotent_runtime::http::{IdempotencyKey, IdempotencyLayer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------- the application

/// How many times the handler ran, per idempotency key.
#[derive(Default)]
struct Runs(Mutex<HashMap<String, u32>>);

impl Runs {
    fn run(&self, key: &str) -> u32 {
        let mut runs = self.0.lock().unwrap();
        let n = runs.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }

    fn of(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn total(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
    }
}

async fn create(
    State(runs): State<Arc<Runs>>,
    IdempotencyKey(key): IdempotencyKey,
    body: Bytes,
) -> impl IntoResponse {
    let n = runs.run(&key);
    (
        StatusCode::CREATED,
        [("x-run", n.to_string())],
        format!("created {key} on run {n} from {} bytes", body.len()),
    )
}

/// The one place the layer under test is built.
fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::new()).shared_key_space()
}

/// A server for `POST /orders` behind the layer, with its run counter.
async fn serve() -> (SocketAddr, Arc<Runs>) {
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route("/orders", post(create))
        .route_layer(layer())
        .with_state(runs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, runs)
}

// ---------------------------------------------------------------- requests

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed").is_some()
    }

    fn code(&self) -> String {
        let body: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body));
        body["code"].as_str().unwrap().to_owned()
    }

    fn assert_problem(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(
            self.headers.get("content-type").unwrap(),
            "application/problem+json"
        );
        assert_eq!(self.code(), code, "{:?}", self.body);
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `POST /orders` over the socket with `headers` (raw values) and `body`.
async fn post_orders(
    client: &HttpClient,
    addr: SocketAddr,
    headers: &[(&str, &[u8])],
    body: impl Into<Bytes>,
) -> Answer {
    let mut b = Request::post(format!("http://{addr}/orders"));
    for (name, value) in headers {
        b = b.header(*name, HeaderValue::from_bytes(value).unwrap());
    }
    let res = client
        .request(b.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A `multipart/form-data` body as curl writes it for `-F amount=5 -F note=@note.txt`,
/// with `boundary`.
fn form(boundary: &str) -> Vec<u8> {
    format!(
        "--{boundary}\r\n\
         Content-Disposition: form-data; name=\"amount\"\r\n\
         \r\n\
         5\r\n\
         --{boundary}\r\n\
         Content-Disposition: form-data; name=\"note\"; filename=\"note.txt\"\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         for the July invoice\r\n\
         --{boundary}--\r\n"
    )
    .into_bytes()
}

// ---------------------------------------------------------------- malformed keys

/// `bad` is answered 400 with `code` before the handler runs, and nothing is recorded
/// under the key `good` it starts with: `good` sent afterwards runs fresh, then replays.
async fn refused_before_anything_runs(bad: &[u8], code: &str, good: &str) {
    let (addr, runs) = serve().await;
    let client = http_client();
    let res = post_orders(&client, addr, &[("idempotency-key", bad)], "x").await;
    res.assert_problem(StatusCode::BAD_REQUEST, code);
    assert_eq!(runs.total(), 0);

    let key = good.trim_matches('"');
    let header: &[(&str, &[u8])] = &[("idempotency-key", good.as_bytes())];
    let res = post_orders(&client, addr, header, "x").await;
    assert_eq!(res.status, StatusCode::CREATED, "{:?}", res.body);
    assert!(!res.replayed(), "{key} was recorded by the refused request");
    let res = post_orders(&client, addr, header, "x").await;
    assert!(res.replayed());
    assert_eq!(runs.of(key), 1);
    assert_eq!(runs.total(), 1);
}

/// A valid key followed by a second list member holds two keys: refused as repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_with_a_second_member_is_400_repeated() {
    refused_before_anything_runs(
        b"\"q-1\";v=1, \"other\"",
        "idempotency_key_repeated",
        "\"q-1\"",
    )
    .await;
}

/// A valid key followed by parameters that are not parameters: refused as malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_with_broken_parameters_is_400_malformed() {
    refused_before_anything_runs(b"\"r-1\";;;!!", "idempotency_key_malformed", "\"r-1\"").await;
}

// ---------------------------------------------------------------- the default fingerprint

/// The same form sent twice under one key, each time with a new multipart boundary (as
/// curl does): the retry gets the first response, replayed; the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_form_with_a_new_boundary_replays() {
    let (addr, runs) = serve().await;
    let client = http_client();
    let key: &[u8] = b"\"form-1\"";

    let mut answers = Vec::new();
    for boundary in [
        "------------------------d74496d66958873e",
        "------------------------5c0a7d2f3e9b8841",
    ] {
        let content_type = format!("multipart/form-data; boundary={boundary}");
        answers.push(
            post_orders(
                &client,
                addr,
                &[
                    ("idempotency-key", key),
                    ("content-type", content_type.as_bytes()),
                ],
                form(boundary),
            )
            .await,
        );
    }
    let (first, retry) = (&answers[0], &answers[1]);
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert!(!first.replayed());
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert_eq!(retry.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.of("form-1"), 1);
}

/// The same bytes under one key, first as JSON, then as a URL-encoded form: two
/// different requests, so the second is refused as a reused key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_bytes_as_json_then_as_form_is_422() {
    let (addr, runs) = serve().await;
    let client = http_client();
    let key: &[u8] = b"\"typed-1\"";
    let body = r#"{"amount":5}"#;

    let first = post_orders(
        &client,
        addr,
        &[
            ("idempotency-key", key),
            ("content-type", b"application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let second = post_orders(
        &client,
        addr,
        &[
            ("idempotency-key", key),
            ("content-type", b"application/x-www-form-urlencoded"),
        ],
        body,
    )
    .await;
    second.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(runs.of("typed-1"), 1);
}
