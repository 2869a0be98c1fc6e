//! Helpers for the SQL store tests: server URLs from the environment, unique names,
//! a TCP proxy that can be cut and restored (and counts round trips), and the
//! store-agnostic scenarios every SQL store runs: two stores racing on the same keys,
//! shared poisoning, and keys full of SQL metacharacters.
//!
//! Compiled with any of the `mysql`, `postgres` and `sqlite` features.
#![cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]

use futures_util::future::join_all;
use idempotent_runtime::{ClaimOutcome, ClaimRequest, Completion, Error, Fence, Idempotency};
use idempotent_runtime::{OnInProgress, RecordKey, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// `$var`, or `default` when it is unset.
pub fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// A random lowercase suffix, for table and schema names no other run uses.
pub fn unique_name(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random bytes");
    let n = b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x));
    format!("{prefix}_{n:012x}")
}

/// The protocol a [`Proxy`] carries, so it can tell statements from pool pings.
///
/// `sqlx` 0.9 pings a connection each time it goes back to the pool (after the caller
/// has its answer); those pings are counted apart from the round trips of statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// PostgreSQL: the server is done when it sends `ReadyForQuery`; a ping is a lone
    /// `Sync` message.
    Postgres,
    /// MySQL: one request is one client write; a ping is `COM_PING`.
    MySql,
}

/// A TCP proxy on a loopback port in front of `target`. [`cut`](Self::cut) drops every
/// connection and stops listening (the port "goes away"); [`restore`](Self::restore)
/// listens on the same port again. It counts round trips: a client write that follows
/// a complete server answer (or is the first) starts a new one.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    target: String,
    wire: Wire,
    task: Option<JoinHandle<()>>,
    round_trips: Arc<AtomicU64>,
    pings: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts a proxy to `target` (`host:port`) on a free port.
    pub async fn start(target: &str, wire: Wire) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let port = listener.local_addr().expect("local addr").port();
        let mut p = Proxy {
            port,
            target: target.to_owned(),
            wire,
            task: None,
            round_trips: Arc::new(AtomicU64::new(0)),
            pings: Arc::new(AtomicU64::new(0)),
        };
        p.serve(listener);
        p
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Round trips of statements seen so far.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::SeqCst)
    }

    /// Pool pings seen so far.
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::SeqCst)
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        let rt = self.round_trips.clone();
        let pings = self.pings.clone();
        let wire = self.wire;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let counters = (rt.clone(), pings.clone());
                conns.spawn(pipe(client, server, counters, wire));
            }
        }));
    }

    /// Drops every proxied connection and stops listening.
    pub async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot listen on port {} again: {e}", self.port),
            }
        };
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    (round_trips, pings): (Arc<AtomicU64>, Arc<AtomicU64>),
    wire: Wire,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // true once the server has answered since the client last wrote
    let answered = Arc::new(AtomicBool::new(true));
    let up = {
        let answered = answered.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if answered.swap(false, Ordering::SeqCst) {
                    let ping = match wire {
                        Wire::Postgres => buf[..n] == *b"S\0\0\0\x04",
                        Wire::MySql => n == 5 && buf[..3] == [1, 0, 0] && buf[4] == 0x0e,
                    };
                    if ping { &pings } else { &round_trips }.fetch_add(1, Ordering::SeqCst);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        // the last bytes the server sent, to find a ReadyForQuery split across reads
        let mut tail: Vec<u8> = Vec::with_capacity(64);
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let done = match wire {
                Wire::MySql => true,
                Wire::Postgres => {
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 6 {
                        tail.drain(..tail.len() - 6);
                    }
                    // 'Z', length 5, transaction status
                    tail.len() == 6 && tail[..5] == *b"Z\0\0\0\x05"
                }
            };
            if done {
                answered.store(true, Ordering::SeqCst);
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Many tasks deliver the same `keys` through two stores (separate pools, so
/// separate connections) at once, waiting on each other's claims: every key's body
/// runs exactly once and every delivery gets that key's output.
pub async fn race_two_stores(a: Arc<dyn Store>, b: Arc<dyn Store>, keys: usize, tasks: usize) {
    let scope = crate::conformance::unique_scope("sql-race");
    let make = |s: &Arc<dyn Store>| {
        Idempotency::new(scope.clone())
            .shared_store(s.clone())
            .lease(Duration::from_secs(10))
            .ttl(Duration::from_secs(120))
            .on_in_progress(OnInProgress::Wait)
    };
    let handlers = [make(&a), make(&b)];
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..keys).map(|_| AtomicU32::new(0)).collect());
    let mut jobs = Vec::new();
    for t in 0..tasks {
        for k in 0..keys {
            let h = handlers[(t + k) % 2].clone();
            let runs = runs.clone();
            jobs.push(tokio::spawn(async move {
                let id = format!("order-{k}");
                let r: Result<u64, Error> = h
                    .run(id.as_str(), async {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(k as u64 * 7 + 1)
                    })
                    .await;
                (k, r)
            }));
        }
    }
    for j in join_all(jobs).await {
        let (k, r) = j.expect("task");
        match r {
            Ok(v) => assert_eq!(v, k as u64 * 7 + 1, "key {k} got another key's output"),
            Err(e) => panic!("delivery of key {k} failed: {e} ({e:?})"),
        }
    }
    for (k, n) in runs.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "the body of key {k} ran {n:?} times"
        );
    }
}

/// A failing message delivered alternately through two stores: the attempt count is
/// shared, so after `max_attempts` failures both stores refuse it with
/// `AttemptsExhausted`, and the body ran exactly `max_attempts` times. Concurrent
/// deliveries of several such keys run at once.
pub async fn poison_is_shared(a: Arc<dyn Store>, b: Arc<dyn Store>, max_attempts: u32) {
    let scope = crate::conformance::unique_scope("sql-poison");
    let make = |s: &Arc<dyn Store>| {
        Idempotency::new(scope.clone())
            .shared_store(s.clone())
            .lease(Duration::from_secs(10))
            .ttl(Duration::from_secs(120))
            .max_attempts(max_attempts)
    };
    let handlers = [make(&a), make(&b)];
    let keys = 8;
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..keys).map(|_| AtomicU32::new(0)).collect());
    let mut jobs = Vec::new();
    for k in 0..keys {
        let handlers = handlers.clone();
        let runs = runs.clone();
        jobs.push(tokio::spawn(async move {
            let id = format!("poison-{k}");
            let mut exhausted = 0;
            // more deliveries than attempts, alternating stores, some concurrently refused
            for d in 0..(max_attempts as usize * 3) {
                let r: Result<(), Error> = handlers[d % 2]
                    .run(id.as_str(), async {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        Err(Error::MissingKey)
                    })
                    .await;
                match r {
                    Err(Error::MissingKey) => {}
                    Err(Error::AttemptsExhausted { attempts }) => {
                        assert_eq!(attempts, max_attempts);
                        exhausted += 1;
                    }
                    other => panic!("key {k}: unexpected {other:?}"),
                }
            }
            exhausted
        }));
    }
    for (k, j) in join_all(jobs).await.into_iter().enumerate() {
        let exhausted = j.expect("task");
        assert_eq!(exhausted, max_attempts as usize * 2, "key {k}");
        assert_eq!(runs[k].load(Ordering::SeqCst), max_attempts, "key {k}");
    }
}

/// Keys full of SQL metacharacters, non-UTF-8 bytes and 100 KB lengths are data: each
/// is its own record (no two collide, no wildcard matches another), and each replays
/// its own output.
pub async fn sql_keys_are_data(store: Arc<dyn Store>) {
    let scope = crate::conformance::unique_scope("sql-keys");
    let long_a = vec![b'\''; 100 * 1024];
    let mut long_b = long_a.clone();
    long_b[50_000] = b'%';
    let keys: Vec<Vec<u8>> = vec![
        b"'".to_vec(),
        b"''".to_vec(),
        b"' OR '1'='1".to_vec(),
        b"x'; DROP TABLE message_idempotent; --".to_vec(),
        b"--".to_vec(),
        b"/*".to_vec(),
        b"%".to_vec(),
        b"a%".to_vec(),
        b"ab".to_vec(),
        b"_".to_vec(),
        b"a_".to_vec(),
        b"\\".to_vec(),
        b"\\'".to_vec(),
        b"\\0".to_vec(),
        b"\"".to_vec(),
        b"`".to_vec(),
        b"?".to_vec(),
        b"$1".to_vec(),
        b";".to_vec(),
        b"a\nb".to_vec(),
        b"a ".to_vec(),
        b"a".to_vec(),
        b"A".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x80],
        vec![0xc3, 0x28],
        vec![0x00],
        vec![0x00, 0x00],
        "é".as_bytes().to_vec(),
        "e\u{301}".as_bytes().to_vec(),
        long_a,
        long_b,
    ];
    let rks: Vec<RecordKey> = keys
        .iter()
        .map(|k| RecordKey::new(&scope, k.as_slice()).expect("key"))
        .collect();
    for (i, k) in rks.iter().enumerate() {
        let req = claim_req(k);
        let token = match store.claim(&req).await.expect("claim") {
            ClaimOutcome::Acquired { token, attempt: 1 } => token,
            other => panic!(
                "key #{i} {:?}: expected a fresh claim, got {other:?}",
                keys[i]
            ),
        };
        let out = format!("out-{i}");
        let fence = store
            .complete(&Completion {
                key: k,
                token,
                output: Some(out.as_bytes()),
                ttl: Duration::from_secs(60),
            })
            .await
            .expect("complete");
        assert_eq!(fence, Fence::Held);
    }
    for (i, k) in rks.iter().enumerate() {
        match store.claim(&claim_req(k)).await.expect("claim") {
            ClaimOutcome::Completed { output } => {
                assert_eq!(output.as_deref(), Some(format!("out-{i}").as_bytes()))
            }
            other => panic!("key #{i}: expected Completed, got {other:?}"),
        }
        let rec = store.inspect(k).await.expect("inspect").expect("record");
        assert_eq!(rec.output.as_deref(), Some(format!("out-{i}").as_bytes()));
    }
    // forgetting one metacharacter key leaves its look-alikes alone
    assert!(store.forget(&rks[6]).await.expect("forget"));
    assert!(store.inspect(&rks[6]).await.expect("inspect").is_none());
    for (i, k) in rks.iter().enumerate().filter(|(i, _)| *i != 6) {
        assert!(
            store.inspect(k).await.expect("inspect").is_some(),
            "key #{i} was removed with key #6"
        );
    }
}

fn claim_req(key: &RecordKey) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(60),
        fingerprint: None,
        max_attempts: None,
    }
}
