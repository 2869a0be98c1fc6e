//! The `Idempotency-Key` layer (`idempotent_runtime::http`) under axum, in process
//! (`tower::ServiceExt::oneshot`) and over real sockets (`axum::serve` on 127.0.0.1:0
//! with hyper's client), on the memory, Redis, PostgreSQL and SQLite stores: replays,
//! concurrent duplicates, changed bodies, missing and hostile keys, released 5xx,
//! clients that disconnect mid-request, and a server process killed mid-request.
//!
//! Every case uses its own client identity (`x-client`) and keys, so runs sharing the
//! servers never meet.
#![cfg(all(
    feature = "axum",
    feature = "redis",
    feature = "postgres",
    feature = "sqlite"
))]

use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idempotent_runtime::http::{Anonymous, IdempotencyKey, IdempotencyLayer, client_digest};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::testing::FaultyStore;
use idempotent_runtime::{
    MemoryStore, OnInProgress, OnStoreError, PostgresStore, RedisStore, SqliteStore, Store,
};
use idempotent_tests::redis_support::redis_url;
use idempotent_tests::sql_support::{env_url, unique_name};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

// ---------------------------------------------------------------- the application

/// What the handlers did, per idempotency key.
struct Effects {
    runs: Mutex<HashMap<String, u32>>,
    finished: Mutex<HashMap<String, u32>>,
    /// how long `/slow` works
    slow_for: Duration,
    /// `/slow` prints `STARTED key` (the child server's signal to its parent)
    announce: bool,
    /// `/events` sends its second event when notified
    second: Arc<tokio::sync::Notify>,
}

impl Effects {
    fn new(slow_for: Duration) -> Arc<Effects> {
        Arc::new(Effects {
            runs: Mutex::default(),
            finished: Mutex::default(),
            slow_for,
            announce: false,
            second: Arc::default(),
        })
    }

    fn run(&self, key: &str) -> u32 {
        let mut runs = self.runs.lock().unwrap();
        let n = runs.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }

    fn runs(&self, key: &str) -> u32 {
        self.runs.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn total_runs(&self) -> u32 {
        self.runs.lock().unwrap().values().sum()
    }

    fn finished(&self, key: &str) -> u32 {
        self.finished.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

type Fx = State<Arc<Effects>>;

async fn create_order(
    State(fx): Fx,
    IdempotencyKey(key): IdempotencyKey,
    body: String,
) -> impl IntoResponse {
    let n = fx.run(&key);
    (
        StatusCode::CREATED,
        [
            ("content-type", "application/json".to_owned()),
            ("x-order-run", n.to_string()),
            ("set-cookie", format!("order={key}")),
        ],
        format!(r#"{{"key":{key:?},"run":{n},"echo":{body:?}}}"#),
    )
}

async fn unknown_customer(State(fx): Fx, IdempotencyKey(key): IdempotencyKey) -> impl IntoResponse {
    let n = fx.run(&key);
    (
        StatusCode::NOT_FOUND,
        [("x-order-run", n.to_string())],
        "no such customer",
    )
}

async fn flaky(State(fx): Fx, IdempotencyKey(key): IdempotencyKey) -> impl IntoResponse {
    match fx.run(&key) {
        1 => (StatusCode::BAD_GATEWAY, "payment gateway down".to_owned()),
        n => (StatusCode::CREATED, format!("charged on run {n}")),
    }
}

async fn slow(State(fx): Fx, IdempotencyKey(key): IdempotencyKey) -> impl IntoResponse {
    let n = fx.run(&key);
    if fx.announce {
        println!("STARTED {key}");
    }
    tokio::time::sleep(fx.slow_for).await;
    *fx.finished.lock().unwrap().entry(key.clone()).or_default() += 1;
    (
        StatusCode::CREATED,
        format!("slow work {key} done on run {n}"),
    )
}

async fn big(State(fx): Fx, IdempotencyKey(key): IdempotencyKey) -> impl IntoResponse {
    fx.run(&key);
    (StatusCode::OK, [("x-big", "yes")], vec![b'x'; 100 * 1024])
}

/// Server-sent events: the first event at once, the second when the test says so
/// (`/events` waits on `Effects::release_second`), then the end.
async fn events(State(fx): Fx, IdempotencyKey(key): IdempotencyKey) -> impl IntoResponse {
    let n = fx.run(&key);
    let second = fx.second.clone();
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let second = second.clone();
        async move {
            let event = match step {
                0 => format!("data: first of run {n}\n\n"),
                1 => {
                    second.notified().await;
                    format!("data: second of run {n}\n\n")
                }
                _ => return None,
            };
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(event)),
                step + 1,
            ))
        }
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
}

/// A body followed by trailers, as gRPC answers.
async fn with_trailers(State(fx): Fx, IdempotencyKey(key): IdempotencyKey) -> impl IntoResponse {
    let n = fx.run(&key);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-run", HeaderValue::from(n));
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(format!(
            "message of run {n}"
        )))),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    (
        [
            ("content-type", "application/grpc"),
            // HTTP/1.1 sends the trailers a response declares
            ("trailer", "grpc-status, x-run"),
        ],
        Body::new(http_body_util::StreamBody::new(frames)),
    )
}

/// Checks its credentials inside the layer, as an axum extractor or a handler does:
/// 401 without `authorization: Bearer good`, 403 with `Bearer read-only`.
async fn charge(
    State(fx): Fx,
    IdempotencyKey(key): IdempotencyKey,
    headers: HeaderMap,
) -> impl IntoResponse {
    let n = fx.run(&key);
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some("Bearer good") => (StatusCode::CREATED, format!("charged on run {n}")),
        Some("Bearer read-only") => (StatusCode::FORBIDDEN, "read-only token".to_owned()),
        _ => (StatusCode::UNAUTHORIZED, "token expired".to_owned()),
    }
}

fn client_identity(req: &axum::http::request::Parts) -> Option<String> {
    req.headers
        .get("x-client")?
        .to_str()
        .ok()
        .map(str::to_owned)
}

/// The routes of the application, without the layer.
fn routes() -> Router<Arc<Effects>> {
    Router::new()
        .route("/orders", post(create_order).get(|| async { "orders" }))
        .route("/customers/{id}/orders", post(unknown_customer))
        .route("/flaky", post(flaky))
        .route("/slow", post(slow))
        .route("/big", post(big))
        .route("/events", post(events))
        .route("/grpc", post(with_trailers))
        .route("/charge", post(charge))
}

/// The application: every POST needs a key; the client is `x-client`; the layer runs
/// on matched routes only (`route_layer`).
fn app(
    store: Arc<dyn Store>,
    fx: Arc<Effects>,
    configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
) -> Router {
    let layer = configure(
        IdempotencyLayer::with_shared_store(store)
            .required()
            .client_identity(client_identity),
    );
    routes().route_layer(layer).with_state(fx)
}

// ---------------------------------------------------------------- stores

/// A store under test, with the temporary file of SQLite.
struct Backend {
    store: Arc<dyn Store>,
    _file: Option<TempFile>,
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

fn postgres_url() -> String {
    env_url(
        "IDEMPOTENT_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Opens a store of `kind` at `url`; panics, naming the server, when it cannot.
async fn open_store(kind: &str, url: &str) -> Arc<dyn Store> {
    let r: Result<Arc<dyn Store>, _> = match kind {
        "redis" => RedisStore::connect(url).await.map(|s| Arc::new(s) as _),
        "postgres" => PostgresStore::connect(url).await.map(|s| Arc::new(s) as _),
        "sqlite" => SqliteStore::connect(url).await.map(|s| Arc::new(s) as _),
        other => panic!("unknown store kind {other}"),
    };
    r.unwrap_or_else(|e| {
        panic!(
            "the HTTP tests need the {kind} store at {url} (IDEMPOTENT_REDIS_URL, \
             IDEMPOTENT_POSTGRES_URL): {e} ({:?})",
            std::error::Error::source(&e)
        )
    })
}

impl Backend {
    async fn memory() -> Backend {
        Backend {
            store: Arc::new(MemoryStore::new()),
            _file: None,
        }
    }

    async fn redis() -> Backend {
        Backend {
            store: open_store("redis", &redis_url()).await,
            _file: None,
        }
    }

    async fn postgres() -> Backend {
        Backend {
            store: open_store("postgres", &postgres_url()).await,
            _file: None,
        }
    }

    async fn sqlite() -> Backend {
        let file = TempFile(std::env::temp_dir().join(format!("{}.db", unique_name("http"))));
        Backend {
            store: open_store("sqlite", &sqlite_url(&file.0)).await,
            _file: Some(file),
        }
    }
}

// ---------------------------------------------------------------- requests

fn unique(tag: &str) -> String {
    unique_name(tag)
}

/// `"key"` as a Structured Field String.
fn sf(key: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{key}\"")).unwrap()
}

fn post_req(path: &str, client: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(path).header("x-client", client);
    if let Some(k) = key {
        b = b.header("idempotency-key", sf(k));
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

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
        let body = String::from_utf8_lossy(&self.body);
        let at = body
            .find("\"code\":\"")
            .unwrap_or_else(|| panic!("no problem code in {body}"));
        body[at + 8..].split('"').next().unwrap().to_owned()
    }

    /// Headers without the replay marker and the date the server writes at send time.
    fn headers_as_sent(&self) -> HeaderMap {
        let mut h = self.headers.clone();
        h.remove("idempotent-replayed");
        h.remove("date");
        h
    }

    /// As sent, without `Set-Cookie` (never recorded).
    fn headers_without_cookies(&self) -> HeaderMap {
        let mut h = self.headers_as_sent();
        h.remove("set-cookie");
        h
    }

    fn assert_problem(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(
            self.headers.get("content-type").unwrap(),
            "application/problem+json"
        );
        assert_eq!(self.code(), code);
    }
}

async fn oneshot(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A POST over the socket; `keys` are the raw values of the `Idempotency-Key` headers.
async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    who: &str,
    keys: &[&[u8]],
    body: &str,
) -> Result<Answer, hyper_util::client::legacy::Error> {
    let mut b = Request::post(format!("http://{addr}{path}")).header("x-client", who);
    for k in keys {
        b = b.header("idempotency-key", HeaderValue::from_bytes(k).unwrap());
    }
    let res = client
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await?;
    let (parts, body) = res.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    })
}

/// The answer to `send`, sent again while it is 409 (at most 2 s): a completion follows
/// the handler's return at once, and a retry in between finds the key in use.
async fn past_in_use<T>(status: impl Fn(&T) -> StatusCode, mut send: impl AsyncFnMut() -> T) -> T {
    let mut answer = send().await;
    for _ in 0..100 {
        if status(&answer) != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = send().await;
    }
    answer
}

async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- cases on every store

/// A 201 and a 404 are recorded and replayed with the same status, headers and body,
/// marked `Idempotent-Replayed`; the handler ran once each.
async fn replays_2xx_and_4xx_identically(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let app = app(store, fx.clone(), |l| l);
    let (who, key) = (unique("client"), unique("key"));

    let first = oneshot(&app, post_req("/orders", &who, Some(&key), "pay 5")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let again = oneshot(&app, post_req("/orders", &who, Some(&key), "pay 5")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    // the first caller's cookie is its own: never recorded, never replayed
    assert_eq!(first.headers["set-cookie"], format!("order={key}"));
    assert!(!again.headers.contains_key("set-cookie"));
    assert_eq!(again.headers_as_sent(), first.headers_without_cookies());
    assert_eq!(again.body, first.body);
    assert_eq!(fx.runs(&key), 1);

    let key4 = unique("key");
    let path = "/customers/c-9/orders";
    let first = oneshot(&app, post_req(path, &who, Some(&key4), "")).await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    let again = oneshot(&app, post_req(path, &who, Some(&key4), "")).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert!(again.replayed());
    assert_eq!(again.headers_as_sent(), first.headers_as_sent());
    assert_eq!(again.body, first.body);
    assert_eq!(fx.runs(&key4), 1);

    // over the socket too: a fresh 201, then its replay
    let addr = serve(app).await;
    let client = http_client();
    let key = unique("key");
    let k = format!("\"{key}\"");
    let first = send(&client, addr, "/orders", &who, &[k.as_bytes()], "x")
        .await
        .unwrap();
    let again = send(&client, addr, "/orders", &who, &[k.as_bytes()], "x")
        .await
        .unwrap();
    assert_eq!(
        (first.status, again.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!first.replayed() && again.replayed());
    assert_eq!(again.headers_as_sent(), first.headers_without_cookies());
    assert_eq!(again.body, first.body);
    assert_eq!(fx.runs(&key), 1);
}

/// The same key with another body is 422; another client's identical key is its own.
async fn changed_body_is_422_and_clients_are_separate(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let app = app(store, fx.clone(), |l| l);
    let (who, key) = (unique("client"), unique("key"));
    let first = oneshot(&app, post_req("/orders", &who, Some(&key), "amount=5")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let changed = oneshot(&app, post_req("/orders", &who, Some(&key), "amount=500")).await;
    changed.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(fx.runs(&key), 1);

    // another client with the same key: its own record, its own execution
    let other = unique("client");
    let theirs = oneshot(&app, post_req("/orders", &other, Some(&key), "amount=500")).await;
    assert_eq!(theirs.status, StatusCode::CREATED);
    assert!(!theirs.replayed());
    assert_eq!(fx.runs(&key), 2);
}

/// A POST without the key is 400 with a problem body that says what is missing; a GET
/// passes through untouched.
async fn missing_key_is_400_when_required(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let app = app(store, fx.clone(), |l| l);
    let who = unique("client");
    let res = oneshot(&app, post_req("/orders", &who, None, "x")).await;
    res.assert_problem(StatusCode::BAD_REQUEST, "idempotency_key_missing");
    assert!(String::from_utf8_lossy(&res.body).contains("requires an Idempotency-Key header"));
    assert_eq!(fx.total_runs(), 0);

    let get = Request::get("/orders").body(Body::empty()).unwrap();
    let res = oneshot(&app, get).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(&res.body[..], b"orders");
}

/// A 502 releases the key: the retry runs again and its 201 is then replayed.
async fn server_error_releases_and_retry_runs(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let app = app(store, fx.clone(), |l| l);
    let (who, key) = (unique("client"), unique("key"));
    let first = oneshot(&app, post_req("/flaky", &who, Some(&key), "")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert!(!first.replayed());
    let retry = oneshot(&app, post_req("/flaky", &who, Some(&key), "")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    let again = oneshot(&app, post_req("/flaky", &who, Some(&key), "")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    assert_eq!(fx.runs(&key), 2);
}

/// 20 concurrent requests with one key over real sockets: one runs, 19 get 409 with
/// `Retry-After`; afterwards the key replays.
async fn twenty_concurrent_requests_run_once(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::from_millis(600));
    let addr = serve(app(store, fx.clone(), |l| l)).await;
    let client = http_client();
    let (who, key) = (unique("client"), unique("key"));
    let k = format!("\"{key}\"");
    let answers = futures_util::future::join_all((0..20).map(|_| {
        let (client, who, k) = (client.clone(), who.clone(), k.clone());
        async move {
            send(&client, addr, "/slow", &who, &[k.as_bytes()], "")
                .await
                .unwrap()
        }
    }))
    .await;
    let created = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    let in_use: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .collect();
    assert_eq!((created, in_use.len()), (1, 19));
    for a in in_use {
        a.assert_problem(StatusCode::CONFLICT, "idempotency_key_in_use");
        // a short hint (1 s by default), not the 60 s left on the lease
        assert_eq!(a.headers["retry-after"], "1");
    }
    assert_eq!(fx.runs(&key), 1);
    let after = send(&client, addr, "/slow", &who, &[k.as_bytes()], "")
        .await
        .unwrap();
    assert_eq!(after.status, StatusCode::CREATED);
    assert!(after.replayed());
    assert_eq!(fx.runs(&key), 1);
}

/// Keys of hostile shapes get 400 with a problem code naming what is wrong, over real
/// sockets; the handler never runs.
async fn hostile_keys_get_400(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let addr = serve(app(store, fx.clone(), |l| l)).await;
    let client = http_client();
    let who = unique("client");
    let long = format!("\"{}\"", "k".repeat(10 * 1024));
    let cases: [(&[&[u8]], &str); 7] = [
        (&[b"\"\""], "idempotency_key_empty"),
        (&[long.as_bytes()], "idempotency_key_too_long"),
        (
            &["\"caf\u{e9}-\u{1f600}\"".as_bytes()],
            "idempotency_key_not_ascii",
        ),
        (&[b"\"a\"", b"\"a\""], "idempotency_key_repeated"),
        (&[b"\"a\", \"b\""], "idempotency_key_repeated"),
        (&[b"\"unterminated"], "idempotency_key_malformed"),
        (&[b"\"a\\x\""], "idempotency_key_malformed"),
    ];
    for (keys, code) in cases {
        let res = send(&client, addr, "/orders", &who, keys, "x")
            .await
            .unwrap();
        res.assert_problem(StatusCode::BAD_REQUEST, code);
    }
    assert_eq!(fx.total_runs(), 0);
}

/// A client that goes away mid-request: the handler still finishes once and its response
/// is recorded, so the retry gets the replay. Over a real socket (closed by the client)
/// and in process (the response future dropped).
async fn client_disconnect_still_completes_once(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::from_millis(300));
    let app = app(store, fx.clone(), |l| l);
    let addr = serve(app.clone()).await;
    let (who, key) = (unique("client"), unique("key"));

    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let raw = format!(
        "POST /slow HTTP/1.1\r\nhost: {addr}\r\nx-client: {who}\r\nidempotency-key: \"{key}\"\r\ncontent-length: 2\r\n\r\nhi"
    );
    socket.write_all(raw.as_bytes()).await.unwrap();
    eventually("the handler to start", Duration::from_secs(5), || {
        fx.runs(&key) == 1
    })
    .await;
    drop(socket);
    eventually("the handler to finish", Duration::from_secs(5), || {
        fx.finished(&key) == 1
    })
    .await;
    let client = http_client();
    let k = format!("\"{key}\"");
    // the completion follows the handler's return at once; a retry in between is 409
    let retry = past_in_use(
        |a: &Answer| a.status,
        async || {
            send(&client, addr, "/slow", &who, &[k.as_bytes()], "hi")
                .await
                .unwrap()
        },
    )
    .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(fx.runs(&key), 1);

    // in process: the response future is dropped after 50 ms
    let key = unique("key");
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        app.clone()
            .oneshot(post_req("/slow", &who, Some(&key), "hi")),
    )
    .await;
    assert!(dropped.is_err(), "the handler takes 300 ms");
    eventually(
        "the detached handler to finish",
        Duration::from_secs(5),
        || fx.finished(&key) == 1,
    )
    .await;
    let retry = past_in_use(
        |a: &Answer| a.status,
        async || oneshot(&app, post_req("/slow", &who, Some(&key), "hi")).await,
    )
    .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(fx.runs(&key), 1);
}

macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        on_every_store!(@store memory: $($case),*);
        on_every_store!(@store redis: $($case),*);
        on_every_store!(@store postgres: $($case),*);
        on_every_store!(@store sqlite: $($case),*);
    };
    (@store $store:ident: $($case:ident),*) => {
        mod $store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::Backend::$store().await;
                    super::$case(backend.store.clone()).await;
                }
            )*
        }
    };
}

on_every_store!(
    replays_2xx_and_4xx_identically,
    changed_body_is_422_and_clients_are_separate,
    missing_key_is_400_when_required,
    server_error_releases_and_retry_runs,
    twenty_concurrent_requests_run_once,
    hostile_keys_get_400,
    client_disconnect_still_completes_once,
);

// ---------------------------------------------------------------- policies (memory store)

/// With `on_in_progress = wait`, concurrent duplicates wait and get the first
/// request's response, replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_duplicates_get_the_first_response() {
    let fx = Effects::new(Duration::from_millis(200));
    let app = app(Arc::new(MemoryStore::new()), fx.clone(), |l| {
        l.on_in_progress(OnInProgress::Wait)
    });
    let (who, key) = (unique("client"), unique("key"));
    let answers = futures_util::future::join_all(
        (0..5).map(|_| oneshot(&app, post_req("/slow", &who, Some(&key), ""))),
    )
    .await;
    assert!(answers.iter().all(|a| a.status == StatusCode::CREATED));
    assert_eq!(answers.iter().filter(|a| a.replayed()).count(), 4);
    assert!(answers.iter().all(|a| a.body == answers[0].body));
    assert_eq!(fx.runs(&key), 1);
}

/// A store that is down: 503 with `Retry-After` and nothing runs (fail closed); with
/// `on_store_error = process` the request runs without deduplication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_is_503_or_passes_through() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    store.set_down(true);
    let fx = Effects::new(Duration::ZERO);
    let closed = app(store.clone(), fx.clone(), |l| l);
    let (who, key) = (unique("client"), unique("key"));
    let res = oneshot(&closed, post_req("/orders", &who, Some(&key), "")).await;
    res.assert_problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "idempotency_store_unavailable",
    );
    assert_eq!(res.headers["retry-after"], "1");
    assert_eq!(fx.runs(&key), 0);

    let open = app(store, fx.clone(), |l| {
        l.on_store_error(OnStoreError::Process)
    });
    for _ in 0..2 {
        let res = oneshot(&open, post_req("/orders", &who, Some(&key), "")).await;
        assert_eq!(res.status, StatusCode::CREATED);
    }
    assert_eq!(fx.runs(&key), 2, "no deduplication while the store is down");
}

/// A response body over the cache cap streams to the client whole; its replay has the
/// status and headers, no body, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_cap_is_streamed_and_its_replay_says_omitted() {
    let fx = Effects::new(Duration::ZERO);
    let app = app(Arc::new(MemoryStore::new()), fx.clone(), |l| {
        l.max_cached_body(16 * 1024)
    });
    let (who, key) = (unique("client"), unique("key"));
    let first = oneshot(&app, post_req("/big", &who, Some(&key), "")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 100 * 1024);
    let again = oneshot(&app, post_req("/big", &who, Some(&key), "")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed());
    assert_eq!(again.headers["idempotent-body-omitted"], "true");
    assert_eq!(again.headers["x-big"], "yes");
    assert!(again.body.is_empty());
    assert_eq!(fx.runs(&key), 1);
}

/// A request body over the layer's cap is refused with 413 before anything is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_over_the_cap_is_413() {
    let fx = Effects::new(Duration::ZERO);
    let app = app(Arc::new(MemoryStore::new()), fx.clone(), |l| {
        l.max_request_body(1024)
    });
    let (who, key) = (unique("client"), unique("key"));
    let res = oneshot(
        &app,
        post_req("/orders", &who, Some(&key), &"x".repeat(2048)),
    )
    .await;
    res.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "request_body_too_large");
    let res = oneshot(&app, post_req("/orders", &who, Some(&key), "small")).await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert_eq!(fx.runs(&key), 1);
}

// ---------------------------------------------------------------- a killed server

const CHILD_KIND: &str = "IDEMPOTENT_HTTP_CHILD_STORE";
const CHILD_URL: &str = "IDEMPOTENT_HTTP_CHILD_URL";
const KILL_LEASE: Duration = Duration::from_millis(1500);

/// The server the killed-server cases start as a child process (this test binary, run
/// with `CHILD_KIND` set): it prints `PORT n`, then `STARTED key` when `/slow` starts,
/// whose work takes a minute. Without `CHILD_KIND` it returns at once.
#[test]
fn child_server() {
    let Ok(kind) = std::env::var(CHILD_KIND) else {
        return;
    };
    let url = std::env::var(CHILD_URL).expect("the child server needs its store URL");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = open_store(&kind, &url).await;
        let fx = Arc::new(Effects {
            runs: Mutex::default(),
            finished: Mutex::default(),
            slow_for: Duration::from_secs(60),
            announce: true,
            second: Arc::default(),
        });
        let app = app(store, fx, |l| l.lease(KILL_LEASE));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("PORT {}", listener.local_addr().unwrap().port());
        axum::serve(listener, app).await.unwrap();
    });
}

/// Kills the child when dropped, so a failing case leaves no server behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server process killed with SIGKILL while it runs a request: the retry gets 409
/// while the dead server's lease lasts, then runs once on another server on the same
/// store; the next retry is a replay.
async fn killed_server_retry_runs_once_after_the_lease(kind: &str, url: String) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["child_server", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_KIND, kind)
        .env(CHILD_URL, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child server");
    let stdout = child.stdout.take().unwrap();
    let mut child = ChildGuard(child);
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut next_line = async |prefix: &str| loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("the child server printed no {prefix} line"))
            .unwrap_or_else(|| panic!("the child server exited before {prefix}"));
        // the test harness may print `test child_server ... ` before it on the line
        if let Some(at) = line.find(prefix) {
            return line[at + prefix.len()..].trim().to_owned();
        }
    };
    let port: u16 = next_line("PORT ").await.parse().unwrap();
    let child_addr = SocketAddr::from(([127, 0, 0, 1], port));

    let client = http_client();
    let (who, key) = (unique("client"), unique("key"));
    let k = format!("\"{key}\"");
    let in_flight = {
        let (client, who, k) = (client.clone(), who.clone(), k.clone());
        tokio::spawn(
            async move { send(&client, child_addr, "/slow", &who, &[k.as_bytes()], "").await },
        )
    };
    assert_eq!(next_line("STARTED ").await, key);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the killed server answered"
    );

    // another server on the same store takes the retries
    let fx = Effects::new(Duration::from_millis(50));
    let addr = serve(app(open_store(kind, &url).await, fx.clone(), |l| {
        l.lease(KILL_LEASE)
    }))
    .await;
    let first = send(&client, addr, "/slow", &who, &[k.as_bytes()], "")
        .await
        .unwrap();
    first.assert_problem(StatusCode::CONFLICT, "idempotency_key_in_use");
    let secs: u64 = first.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs <= KILL_LEASE.as_secs() + 1, "Retry-After {secs}");
    let until = Instant::now() + Duration::from_secs(15);
    let done = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let a = send(&client, addr, "/slow", &who, &[k.as_bytes()], "")
            .await
            .unwrap();
        if a.status != StatusCode::CONFLICT {
            break a;
        }
        assert!(
            Instant::now() < until,
            "the dead server's lease never expired"
        );
    };
    assert_eq!(done.status, StatusCode::CREATED);
    assert!(!done.replayed());
    assert_eq!(fx.runs(&key), 1);
    let again = send(&client, addr, "/slow", &who, &[k.as_bytes()], "")
        .await
        .unwrap();
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed());
    assert_eq!(again.body, done.body);
    assert_eq!(fx.runs(&key), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_on_redis() {
    killed_server_retry_runs_once_after_the_lease("redis", redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_on_postgres() {
    killed_server_retry_runs_once_after_the_lease("postgres", postgres_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_on_sqlite() {
    let file = TempFile(std::env::temp_dir().join(format!("{}.db", unique_name("http_kill"))));
    killed_server_retry_runs_once_after_the_lease("sqlite", sqlite_url(&file.0)).await;
}

/// The layer costs the store what a message costs it: a first request one claim and
/// one completion, a replay one claim, a released request one claim and one release,
/// and no renewal for a request that finishes within a third of its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_steps_per_request() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let fx = Effects::new(Duration::ZERO);
    let app = app(store.clone(), fx.clone(), |l| l);
    let (who, key) = (unique("client"), unique("key"));
    oneshot(&app, post_req("/orders", &who, Some(&key), "x")).await;
    let c = store.calls();
    assert_eq!((c.claim, c.complete, c.release, c.renew), (1, 1, 0, 0));
    oneshot(&app, post_req("/orders", &who, Some(&key), "x")).await;
    let c = store.calls();
    assert_eq!((c.claim, c.complete, c.release, c.renew), (2, 1, 0, 0));
    let flaky = unique("key");
    oneshot(&app, post_req("/flaky", &who, Some(&flaky), "")).await;
    let c = store.calls();
    assert_eq!((c.claim, c.complete, c.release, c.renew), (3, 1, 1, 0));
}

/// The default scope is the method and axum's matched route: two paths of one route
/// share the key space (so the same key on another path is a reused key, 422), and the
/// record is found under `POST /customers/{id}/orders`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_scope_is_method_and_route() {
    let store = Arc::new(MemoryStore::new());
    let fx = Effects::new(Duration::ZERO);
    let app = app(store.clone(), fx.clone(), |l| l);
    let (who, key) = (unique("client"), unique("key"));
    let first = oneshot(
        &app,
        post_req("/customers/c-1/orders", &who, Some(&key), ""),
    )
    .await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    let other = oneshot(
        &app,
        post_req("/customers/c-2/orders", &who, Some(&key), ""),
    )
    .await;
    other.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    let record = idempotent_runtime::RecordKey::new(
        "POST /customers/{id}/orders",
        &(client_digest(&who).as_str(), key.as_str()),
    )
    .unwrap();
    assert!(store.inspect(&record).await.unwrap().is_some());
    assert_eq!(fx.runs(&key), 1);
}

// ---------------------------------------------------------------- clients and their keys

/// Two clients with one key over real sockets: each gets its own execution and its own
/// response, never the other's; the record keeps a digest of the identity, not the
/// identity. A request whose client the identity function cannot name is refused with
/// 401 by default, and runs without deduplication with `Anonymous::Process`.
async fn clients_never_share_records(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let addr = serve(app(store.clone(), fx.clone(), |l| l)).await;
    let client = http_client();
    let (alice, mallory, key) = (unique("alice"), unique("mallory"), unique("key"));
    let k = format!("\"{key}\"");
    let theirs = send(&client, addr, "/orders", &alice, &[k.as_bytes()], "pay 5")
        .await
        .unwrap();
    assert_eq!(theirs.status, StatusCode::CREATED);
    // the same key and body from another client: its own execution, not alice's answer
    let mine = send(&client, addr, "/orders", &mallory, &[k.as_bytes()], "pay 5")
        .await
        .unwrap();
    assert_eq!(mine.status, StatusCode::CREATED);
    assert!(!mine.replayed());
    assert_ne!(mine.headers["x-order-run"], theirs.headers["x-order-run"]);
    assert_eq!(fx.runs(&key), 2);

    // records are under the identity's digest, never the identity itself
    let scope = "POST /orders";
    let digest = client_digest(&alice);
    assert!(!digest.contains(&alice));
    let under_digest =
        idempotent_runtime::RecordKey::new(scope, &(digest.as_str(), key.as_str())).unwrap();
    let under_plain =
        idempotent_runtime::RecordKey::new(scope, &(alice.as_str(), key.as_str())).unwrap();
    assert!(
        store
            .as_admin()
            .unwrap()
            .inspect(&under_digest)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .as_admin()
            .unwrap()
            .inspect(&under_plain)
            .await
            .unwrap()
            .is_none()
    );

    // no identity: 401, nothing runs, nothing is recorded
    let anonymous = Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", k.as_str())
        .body(Full::new(Bytes::from_static(b"pay 5")))
        .unwrap();
    let res = client.request(anonymous).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("idempotency_client_unidentified"));
    assert_eq!(fx.runs(&key), 2);
}

/// The default release set: a 401 and a 403 answered inside the layer are not recorded,
/// so the client that refreshes its credentials retries with the same key and runs.
async fn unauthorized_is_released_and_the_authorised_retry_runs(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let addr = serve(app(store, fx.clone(), |l| l)).await;
    let (who, key) = (unique("client"), unique("key"));
    let client = http_client();
    let charge = |token: &'static str| {
        let (client, who, key) = (client.clone(), who.clone(), key.clone());
        async move {
            let req = Request::post(format!("http://{addr}/charge"))
                .header("x-client", who)
                .header("idempotency-key", sf(&key))
                .header("authorization", token)
                .body(Full::new(Bytes::from_static(b"amount=5")))
                .unwrap();
            let (parts, body) = client.request(req).await.unwrap().into_parts();
            (parts, body.collect().await.unwrap().to_bytes())
        }
    };
    let (expired, _) = charge("Bearer expired").await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    let (forbidden, _) = charge("Bearer read-only").await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert!(forbidden.headers.get("idempotent-replayed").is_none());
    let (ok, body) = charge("Bearer good").await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert!(ok.headers.get("idempotent-replayed").is_none());
    assert_eq!(&body[..], b"charged on run 3");
    let (again, body) = charge("Bearer good").await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(&body[..], b"charged on run 3");
    assert_eq!(fx.runs(&key), 3);
}

/// Server-sent events reach the client as they are produced, through the layer and a
/// real socket: the first event arrives while the handler still holds the second. The
/// whole stream is recorded and its retry replays it. A client that goes away mid-stream
/// does not keep the record from completing.
async fn streamed_responses_reach_the_client_as_produced(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let addr = serve(app(store, fx.clone(), |l| l)).await;
    let client = http_client();
    let (who, key) = (unique("client"), unique("key"));
    let request = |key: &str| {
        Request::post(format!("http://{addr}/events"))
            .header("x-client", who.as_str())
            .header("idempotency-key", sf(key))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let res = tokio::time::timeout(Duration::from_secs(5), client.request(request(&key)))
        .await
        .expect("the response head reaches the client before the handler finishes")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event reaches the client before the handler finishes")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"data: first of run 1\n\n");
    fx.second.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"data: second of run 1\n\n");

    // the stream's end reached the client once it was recorded: the retry replays it
    let again = client.request(request(&key)).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed = again.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &replayed[..],
        b"data: first of run 1\n\ndata: second of run 1\n\n"
    );
    assert_eq!(fx.runs(&key), 1);

    // a client that reads the first event and goes away: the stream still ends and is
    // recorded, so the retry gets it
    let gone = unique("key");
    let res = client.request(request(&gone)).await.unwrap();
    let mut body = res.into_body();
    tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    drop(body);
    fx.second.notify_one();
    let retry = past_in_use(
        |r: &axum::http::Response<_>| r.status(),
        async || client.request(request(&gone)).await.unwrap(),
    )
    .await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let replayed = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &replayed[..],
        b"data: first of run 1\n\ndata: second of run 1\n\n"
    );
    assert_eq!(fx.runs(&gone), 1);
}

/// Trailers (gRPC's `grpc-status`) pass through the layer over a real socket, are
/// recorded, and come back with the replay.
async fn trailers_pass_through_and_are_replayed(store: Arc<dyn Store>) {
    let fx = Effects::new(Duration::ZERO);
    let addr = serve(app(store, fx.clone(), |l| l)).await;
    let client = http_client();
    let (who, key) = (unique("client"), unique("key"));
    let call = || async {
        let req = Request::post(format!("http://{addr}/grpc"))
            .header("x-client", who.as_str())
            .header("idempotency-key", sf(&key))
            // HTTP/1.1 servers send trailers to clients that say they take them
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = client.request(req).await.unwrap();
        let replayed = res.headers().contains_key("idempotent-replayed");
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (replayed, collected.to_bytes(), trailers)
    };
    let (replayed, body, trailers) = call().await;
    assert!(!replayed);
    assert_eq!(&body[..], b"message of run 1");
    let trailers = trailers.expect("the trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-run"], "1");
    let (replayed, body, trailers) = call().await;
    assert!(replayed);
    assert_eq!(&body[..], b"message of run 1");
    let trailers = trailers.expect("the replay carries the trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-run"], "1");
    assert_eq!(fx.runs(&key), 1);
}

mod identity_and_streams {
    macro_rules! on_every_store {
        ($($case:ident),* $(,)?) => {
            on_every_store!(@store memory: $($case),*);
            on_every_store!(@store redis: $($case),*);
            on_every_store!(@store postgres: $($case),*);
            on_every_store!(@store sqlite: $($case),*);
        };
        (@store $store:ident: $($case:ident),*) => {
            mod $store {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let backend = super::super::Backend::$store().await;
                        super::super::$case(backend.store.clone()).await;
                    }
                )*
            }
        };
    }

    on_every_store!(
        clients_never_share_records,
        unauthorized_is_released_and_the_authorised_retry_runs,
        streamed_responses_reach_the_client_as_produced,
        trailers_pass_through_and_are_replayed,
    );
}

/// With `Anonymous::Process`, a request no client is named for runs without
/// deduplication: never answered from a record, never recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_run_without_deduplication_when_asked() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let fx = Effects::new(Duration::ZERO);
    let app = app(store.clone(), fx.clone(), |l| {
        l.on_anonymous(Anonymous::Process)
    });
    let key = unique("key");
    for _ in 0..2 {
        let req = Request::post("/orders")
            .header("idempotency-key", sf(&key))
            .body(Body::from("x"))
            .unwrap();
        let res = oneshot(&app, req).await;
        assert_eq!(res.status, StatusCode::CREATED);
        assert!(!res.replayed());
    }
    assert_eq!(fx.runs(&key), 2);
    assert_eq!(
        store.calls().claim,
        0,
        "nothing was claimed for anonymous requests"
    );
}

/// A shared key space, chosen explicitly: one record per key whoever sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_key_space_is_one_record_per_key() {
    let fx = Effects::new(Duration::ZERO);
    let layer = IdempotencyLayer::new(MemoryStore::new()).shared_key_space();
    let app = routes().route_layer(layer).with_state(fx.clone());
    let key = unique("key");
    let a = oneshot(&app, post_req("/orders", "a", Some(&key), "x")).await;
    let b = oneshot(&app, post_req("/orders", "b", Some(&key), "x")).await;
    assert!(!a.replayed() && b.replayed());
    assert_eq!(fx.runs(&key), 1);
}

// ---------------------------------------------------------------- routes and settings

/// Requests no route matched get the router's own answer and are never recorded, nor
/// claimed under a scope of their own: with `route_layer` and with `layer` on the
/// router (404, key or not), and on a method router's routes (405 for a method the
/// route does not take, key or not). A layer outside the router records under one
/// scope per method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_requests_get_the_routers_answer_and_are_not_recorded() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let fx = Effects::new(Duration::ZERO);
    let layer = || {
        IdempotencyLayer::with_shared_store(store.clone())
            .required()
            .client_identity(client_identity)
    };
    let who = unique("client");
    let on_routes = routes().route_layer(layer()).with_state(fx.clone());
    let on_router = routes().layer(layer()).with_state(fx.clone());
    for app in [&on_routes, &on_router] {
        for key in [Some(unique("key")), None] {
            let path = format!("/nope-{}", unique("path"));
            for _ in 0..2 {
                let res = oneshot(app, post_req(&path, &who, key.as_deref(), "x")).await;
                assert_eq!(res.status, StatusCode::NOT_FOUND);
                assert!(!res.replayed());
            }
        }
    }
    // a method the route does not take: with the layer on the method router's routes
    // (`post(…).route_layer(…)`), the router's 405, key or not
    let per_method = Router::new()
        .route("/flaky", post(flaky).route_layer(layer()))
        .with_state(fx.clone());
    for key in [Some(unique("key")), None] {
        let req = Request::patch("/flaky")
            .header("x-client", who.as_str())
            .body(Body::empty())
            .unwrap();
        let req = match &key {
            Some(k) => {
                let (mut parts, body) = req.into_parts();
                parts.headers.insert("idempotency-key", sf(k));
                Request::from_parts(parts, body)
            }
            None => req,
        };
        let res = oneshot(&per_method, req).await;
        assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED);
    }
    assert_eq!(store.calls().claim, 0, "no unmatched request was claimed");
    assert_eq!(fx.total_runs(), 0);

    // outside the router, nothing tells routes apart: one scope per method
    let outside = tower::ServiceBuilder::new()
        .layer(layer())
        .service(routes().with_state(fx.clone()));
    let key = unique("key");
    for expect_replay in [false, true] {
        let res = outside
            .clone()
            .oneshot(post_req("/orders", &who, Some(&key), "x"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(
            res.headers().contains_key("idempotent-replayed"),
            expect_replay
        );
    }
    let record =
        idempotent_runtime::RecordKey::new("POST *", &(client_digest(&who).as_str(), key.as_str()))
            .unwrap();
    assert!(
        store
            .as_admin()
            .unwrap()
            .inspect(&record)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(fx.runs(&key), 1);
}

/// `Retry-After` on 409 is the configured hint, bounded by the lease left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_a_short_hint_bounded_by_the_lease() {
    let fx = Effects::new(Duration::from_millis(800));
    for (hint, lease, expected) in [
        (Duration::from_secs(3), Duration::from_secs(60), "3"),
        (Duration::from_secs(30), Duration::from_secs(2), "2"),
    ] {
        let app = app(Arc::new(MemoryStore::new()), fx.clone(), |l| {
            l.retry_after(hint).lease(lease)
        });
        let (who, key) = (unique("client"), unique("key"));
        let first = tokio::spawn({
            let app = app.clone();
            let req = post_req("/slow", &who, Some(&key), "");
            async move { oneshot(&app, req).await }
        });
        eventually("the first request to start", Duration::from_secs(5), || {
            fx.runs(&key) == 1
        })
        .await;
        let busy = oneshot(&app, post_req("/slow", &who, Some(&key), "")).await;
        busy.assert_problem(StatusCode::CONFLICT, "idempotency_key_in_use");
        assert_eq!(busy.headers["retry-after"], expected);
        assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    }
}

/// Settings the attribute and `Idempotency` refuse are refused by the layer while the
/// service is built, with the same message.
#[test]
fn bad_settings_fail_when_the_layer_is_built() {
    let refused = |f: fn(IdempotencyLayer<_>) -> IdempotencyLayer<_>| {
        let err = std::panic::catch_unwind(|| f(IdempotencyLayer::new(MemoryStore::new())))
            .expect_err("the setting is refused");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let lease = refused(|l| l.lease(Duration::from_millis(1)));
    assert!(
        lease.contains("shorter than the minimum of 100ms"),
        "{lease}"
    );
    let ttl = refused(|l| l.ttl(Duration::ZERO));
    assert!(ttl.contains("a ttl of zero"), "{ttl}");
    let long = refused(|l| l.ttl(Duration::from_secs(3651 * 24 * 3600)));
    assert!(long.contains("over the maximum of 3650 days"), "{long}");
    let attempts = refused(|l| l.max_attempts(0));
    assert!(attempts.contains("max_attempts = 0"), "{attempts}");
    // the message is the manual API's
    let manual = idempotent_runtime::Idempotency::new("settings")
        .store(MemoryStore::new())
        .lease(Duration::from_millis(1));
    let err = futures_util::FutureExt::now_or_never(
        manual.run("k", async { Ok::<_, idempotent_runtime::Error>(()) }),
    )
    .unwrap()
    .unwrap_err();
    assert!(lease.ends_with(&err.to_string()), "{lease} / {err}");
}
