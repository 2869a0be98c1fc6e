//! Helpers for the Redis tests: the shared server's URL, private `redis-server`
//! processes on free ports (killed when dropped, also on panic), a three-master
//! Redis Cluster, raw commands, and the two-store race.
//!
//! Compiled with the `redis` feature only.
#![cfg(feature = "redis")]

pub use crate::stores::free_port;
use idempotent_runtime::redis::{self, aio::ConnectionManager};
use idempotent_runtime::{RedisStore, Store};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The environment variable naming the shared Redis server.
pub const URL_VAR: &str = "IDEMPOTENT_REDIS_URL";

/// The shared server's URL: `$IDEMPOTENT_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A store on the shared server; panics, naming the variable, when it is unreachable.
pub async fn connect() -> RedisStore {
    let url = redis_url();
    // `&String`, as every store's `connect` takes it
    match RedisStore::connect(&url).await {
        Ok(s) => s,
        Err(e) => panic!(
            "the Redis tests need a server at {url} (set {URL_VAR} to use another): {e} ({:?})",
            std::error::Error::source(&e)
        ),
    }
}

/// A raw connection to `url`, for commands the store does not issue (GET, SET, INFO…).
pub async fn raw(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("bad URL {url}: {e}"));
    ConnectionManager::new(client)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url} (set {URL_VAR}): {e}"))
}

/// The server's `TIME` in microseconds.
pub async fn server_time_us(conn: &mut ConnectionManager) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    s * 1_000_000 + us
}

fn unique_dir(tag: &str) -> PathBuf {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random bytes");
    let dir = std::env::temp_dir().join(format!(
        "idempotent-{tag}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(b)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Sends `PING` over a plain TCP connection; true on `+PONG`.
fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A `redis-server` process owned by a test, on its own port and directory; killed
/// (and its directory removed) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without persistence on a free port.
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts a server with extra `redis-server` arguments on a free port.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let mut s = RedisServer {
            port,
            dir: unique_dir(&format!("redis-{port}")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.log")).expect("log file");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("the Redis tests need `redis-server` on PATH to start private servers: {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pings(self.port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "redis-server on port {} exited with {status}; log: {}",
                    self.port,
                    std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL: no shutdown, no final save).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters without replicas, on free loopback ports; the
/// servers are killed when it is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `--cluster-enabled yes` servers, joins them with
    /// `redis-cli --cluster create`, and waits for `cluster_state:ok` on every node.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let cluster = RedisCluster { nodes };
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port()));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("the cluster test needs `redis-cli` on PATH: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &cluster.nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port().to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not reach cluster_state:ok within 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

/// [`conformance::race_two_stores`](crate::stores::race_two_stores) with the
/// Redis tests' lease of 5 s.
pub async fn race_two_stores(a: Arc<dyn Store>, b: Arc<dyn Store>, keys: usize, tasks: usize) {
    crate::stores::race_two_stores("redis-race", Duration::from_secs(5), a, b, keys, tasks).await;
}
