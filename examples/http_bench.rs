//! The `Idempotency-Key` layer's cost per request, against the bare service, on the
//! memory store and on Redis:
//!
//! ```sh
//! cargo run --release -p idempotent-examples --example http_bench --features http [-- REQUESTS ROUNDS]
//! ```
//!
//! Each round times REQUESTS requests (default 20 000 on memory, a tenth of that on
//! Redis) through the bare service and through the layered one, interleaved, in process
//! (`tower::Service::call` on a current-thread runtime, no sockets: what is measured is
//! the layer, not the network stack), for three kinds of request: a first request
//! (fresh key: read the body, fingerprint, claim, run, record the response), a replay
//! (a completed key: claim answers with the recorded response) and a request without
//! a key (passes through). It prints the median over ROUNDS rounds (default 7) with
//! the min–max, the layer's overhead (layered − bare) and the ratio. On Redis the
//! overhead is set beside the store's own steps, called directly (a first request
//! makes two round trips, claim and complete; a replay one, claim).
//! Redis is `$IDEMPOTENT_REDIS_URL` (default `redis://127.0.0.1:6379`); the records
//! use their own scope and expire after a minute.

mod support;

use axum::body::Bytes;
use axum::http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use idempotent_runtime::http::IdempotencyLayer;
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion};
use idempotent_runtime::{MemoryStore, RecordKey, RedisStore, Store};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;

/// The application: answers 201 with a small JSON body.
#[derive(Clone, Copy)]
struct Bare;

impl Service<Req> for Bare {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Req) -> Self::Future {
        let mut res = Response::new(Full::new(Bytes::from_static(
            b"{\"order\":17,\"status\":\"paid\"}",
        )));
        *res.status_mut() = StatusCode::CREATED;
        res.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        std::future::ready(Ok(res))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    First,
    Replay,
    NoKey,
}

/// A request as a client sends it; `key` is `None` for requests without the header.
fn request(key: Option<&str>) -> Req {
    let mut b = Request::post("/orders")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-api-key", "bench-client");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"item=17&amount=500")))
        .expect("request")
}

/// This thread's CPU time: what the requests cost, without the time the scheduler
/// gave other processes (the benchmark often shares its cores). Wall-clock time on Redis,
/// whose cost is waiting.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is valid on Linux
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// How a case is timed.
#[derive(Clone, Copy)]
enum Clock {
    ThreadCpu,
    Wall,
}

/// Nanoseconds per request of `n` requests through `svc`.
async fn time<S, B>(svc: &mut S, n: usize, kind: Kind, round: usize, tag: &str, clock: Clock) -> f64
where
    S: Service<Req, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: axum::body::HttpBody,
    B::Error: std::fmt::Debug,
{
    let keys: Vec<String> = (0..n)
        .map(|i| match kind {
            Kind::First => format!("\"{tag}-{round}-{i}\""),
            _ => format!("\"{tag}-replayed\""),
        })
        .collect();
    let (start, cpu) = (Instant::now(), thread_cpu_ns());
    for key in &keys {
        let req = request((kind != Kind::NoKey).then_some(key.as_str()));
        let res = svc
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("response");
        assert!(res.status().is_success(), "{}", res.status());
        let body = res.into_body().collect().await.expect("body");
        std::hint::black_box(body);
    }
    let spent = match clock {
        Clock::ThreadCpu => thread_cpu_ns() - cpu,
        Clock::Wall => start.elapsed().as_nanos(),
    };
    spent as f64 / n as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    bare: Vec<f64>,
    layered: Vec<f64>,
}

impl Row {
    fn print(&mut self, label: &str) -> f64 {
        // per round, before sorting: the rounds interleave bare and layered runs
        let overheads: Vec<f64> = self
            .bare
            .iter()
            .zip(&self.layered)
            .map(|(b, l)| l - b)
            .collect();
        let (b, l) = (median(&mut self.bare), median(&mut self.layered));
        let (omin, omax) = overheads
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), o| (lo.min(*o), hi.max(*o)));
        println!(
            "| {label} | {:.2} µs | {:.2} µs ({:.2}–{:.2}) | {:.2} µs ({:.2}–{:.2}) | {:.2}× |",
            b / 1000.0,
            l / 1000.0,
            self.layered[0] / 1000.0,
            self.layered[self.layered.len() - 1] / 1000.0,
            (l - b) / 1000.0,
            omin / 1000.0,
            omax / 1000.0,
            l / b
        );
        l - b
    }
}

async fn bench_store(
    name: &str,
    store: Arc<dyn Store>,
    n: usize,
    rounds: usize,
    clock: Clock,
) -> [f64; 3] {
    let tag = format!("{name}-{}-{}", std::process::id(), unix_micros());
    // the store's own steps, timed in the same rounds (on Redis: its round trips)
    let mut steps = matches!(clock, Clock::Wall).then(|| (store.clone(), Vec::new(), Vec::new()));
    let layer = IdempotencyLayer::with_shared_store(store)
        .scope(format!("http_bench::{tag}"))
        .ttl(Duration::from_secs(60))
        .client_identity(|req| {
            req.headers
                .get("x-api-key")?
                .to_str()
                .ok()
                .map(str::to_owned)
        });
    let mut layered = layer.layer(Bare);
    let mut bare = Bare;
    // warm up, and record the key the replay rows use
    time(&mut layered, n / 10, Kind::First, usize::MAX, &tag, clock).await;
    time(&mut layered, 1, Kind::Replay, 0, &tag, clock).await;
    let mut rows: Vec<(Kind, Row)> = [Kind::First, Kind::Replay, Kind::NoKey]
        .into_iter()
        .map(|k| {
            (
                k,
                Row {
                    bare: Vec::new(),
                    layered: Vec::new(),
                },
            )
        })
        .collect();
    for round in 0..rounds {
        for (kind, row) in &mut rows {
            row.bare
                .push(time(&mut bare, n, *kind, round, &tag, clock).await);
            row.layered
                .push(time(&mut layered, n, *kind, round, &tag, clock).await);
        }
        if let Some((store, first, replay)) = &mut steps {
            let (f, r) = store_steps(&**store, n, round, &tag).await;
            first.push(f);
            replay.push(r);
        }
    }
    let timed = match clock {
        Clock::ThreadCpu => "CPU time",
        Clock::Wall => "wall-clock time",
    };
    println!(
        "\n{name} store, {n} requests per round, {timed} per request, median of {rounds} rounds (min–max):\n"
    );
    println!("| request | bare service | with the layer | overhead | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    let mut out = [0.0; 3];
    for (i, (kind, row)) in rows.iter_mut().enumerate() {
        let label = match kind {
            Kind::First => "first (claim, run, record)",
            Kind::Replay => "replay of a completed key",
            Kind::NoKey => "no key (passes through)",
        };
        out[i] = row.print(label);
    }
    if let Some((_, mut first, mut replay)) = steps {
        let (f, r) = (median(&mut first), median(&mut replay));
        println!(
            "\nthe store's own steps, called directly in the same rounds: {:.2} µs for a first \
             request (claim and complete: 2 round trips), {:.2} µs for a replay (claim: 1 round \
             trip); the layer's overhead is {:.2}× and {:.2}× those",
            f / 1000.0,
            r / 1000.0,
            out[0] / f,
            out[1] / r
        );
    }
    out
}

fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Wall-clock time per request of the store's own steps, called directly: a fresh
/// key's claim and complete (what a first request costs the store) and a completed
/// key's claim (a replay), with an output of a recorded response's size.
async fn store_steps(store: &dyn Store, n: usize, round: usize, tag: &str) -> (f64, f64) {
    let scope = format!("http_bench::steps-{tag}");
    let output = [7u8; 90];
    fn req(key: &RecordKey) -> ClaimRequest<'_> {
        ClaimRequest {
            key,
            lease: Duration::from_secs(60),
            ttl: Duration::from_secs(60),
            fingerprint: Some(&[1u8; 32]),
            max_attempts: None,
        }
    }
    let keys: Vec<RecordKey> = (0..n)
        .map(|i| RecordKey::new(&scope, &format!("{round}-{i}")).expect("key"))
        .collect();
    let start = Instant::now();
    for key in &keys {
        let ClaimOutcome::Acquired { token, .. } = store.claim(&req(key)).await.expect("claim")
        else {
            panic!("a fresh key is claimed");
        };
        let c = Completion {
            key,
            token,
            output: Some(&output),
            ttl: Duration::from_secs(60),
        };
        store.complete(&c).await.expect("complete");
    }
    let first = start.elapsed().as_nanos() as f64 / n as f64;
    let start = Instant::now();
    for _ in 0..n {
        store.claim(&req(&keys[0])).await.expect("claim");
    }
    (first, start.elapsed().as_nanos() as f64 / n as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = match args.first().map(|a| a.parse()) {
        None => 20_000,
        Some(Ok(n)) if n >= 10 => n,
        Some(_) => {
            eprintln!("usage: http_bench [REQUESTS (at least 10)] [ROUNDS (at least 5)]");
            std::process::exit(2);
        }
    };
    let rounds: usize = match args.get(1).map(|a| a.parse()) {
        None => 7,
        Some(Ok(r)) if r >= 5 => r,
        Some(_) => {
            eprintln!("usage: http_bench [REQUESTS (at least 10)] [ROUNDS (at least 5)]");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let url = std::env::var("IDEMPOTENT_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let store = support::Server::redis(&url).reach(RedisStore::connect(&url)).await;
        let store = store.unwrap_or_else(|e| support::fail(e));

        println!("# Idempotency-Key layer overhead per request (in process, current-thread runtime)");
        let mem = bench_store("memory", Arc::new(MemoryStore::new()), n, rounds, Clock::ThreadCpu).await;
        println!(
            "\nmemory: the layer costs {:.2} µs on a first request and {:.2} µs on a replay (target: under 2 µs)",
            mem[0] / 1000.0,
            mem[1] / 1000.0
        );

        let redis = bench_store("redis", Arc::new(store), (n / 10).max(10), rounds, Clock::Wall).await;
        println!(
            "\nredis: the layer costs {:.2} µs on a first request and {:.2} µs on a replay",
            redis[0] / 1000.0,
            redis[1] / 1000.0
        );
    });
}
