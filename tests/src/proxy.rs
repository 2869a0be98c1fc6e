//! A TCP proxy for tests that cut connections: it stands on a loopback port in front
//! of a server, can be cut and restored, and counts round trips.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

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
    /// Any other protocol (Redis, its replication stream): no pings; a client write
    /// after server bytes starts a round trip.
    Raw,
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
                        Wire::Raw => false,
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
                Wire::MySql | Wire::Raw => true,
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
