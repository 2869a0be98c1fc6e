//! Helpers for the Redis replication and failover tests: a master with a replica
//! (optionally behind a proxy the test cuts), a Sentinel process, and polling of the
//! servers' `INFO`.
//!
//! Compiled with the `redis` feature only.
#![cfg(feature = "redis")]

use crate::proxy::{Proxy, Wire};
use crate::redis_support::{RedisServer, free_port};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `redis-cli -p port args…`, its standard output; panics when `redis-cli` is missing.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("the failover tests need `redis-cli` on PATH: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `ok` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of `field` in `INFO replication` of the server on `port`.
pub fn replication_field(port: u16, field: &str) -> Option<String> {
    cli(port, &["INFO", "replication"]).lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

/// `DBSIZE` of the server on `port` (0 when it does not answer).
pub fn dbsize(port: u16) -> u64 {
    cli(port, &["DBSIZE"]).trim().parse().unwrap_or(0)
}

/// A replica of the server on `master_port`, without persistence; returns once its link
/// to the master is up.
pub fn start_replica(master_port: u16) -> RedisServer {
    let port = master_port.to_string();
    let replica = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--replicaof",
        "127.0.0.1",
        &port,
    ]);
    wait_until(
        "the replica's link to its master is up",
        Duration::from_secs(10),
        || replication_field(replica.port(), "master_link_status").as_deref() == Some("up"),
    );
    replica
}

/// A replica of the server on `master_port` started with `extra` arguments besides
/// `--replicaof` (persistence, a replication user…); returns once its link to the
/// master is up.
pub fn start_replica_with(master_port: u16, extra: &[&str]) -> RedisServer {
    let port = master_port.to_string();
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--replicaof", "127.0.0.1", &port]);
    let replica = RedisServer::start_with(&args);
    wait_until(
        "the replica's link to its master is up",
        Duration::from_secs(10),
        || replication_field(replica.port(), "master_link_status").as_deref() == Some("up"),
    );
    replica
}

/// A master and its replica, the replica connected through a [`Proxy`] that the test
/// can cut (the master then sees no replica, the replica no master).
#[derive(Debug)]
pub struct ProxiedPair {
    /// The master.
    pub master: RedisServer,
    /// The replica.
    pub replica: RedisServer,
    /// The proxy the replication link goes through.
    pub proxy: Proxy,
}

impl ProxiedPair {
    /// Starts a master (with `master_args` besides no persistence), a proxy to it and a
    /// replica of the proxy; returns once the master counts the replica as connected.
    pub async fn start(master_args: &[&str]) -> Self {
        let mut args = vec!["--save", "", "--appendonly", "no"];
        args.extend_from_slice(master_args);
        let master = RedisServer::start_with(&args);
        let proxy = Proxy::start(&format!("127.0.0.1:{}", master.port()), Wire::Raw).await;
        let proxy_port = proxy.port();
        let replica = tokio::task::spawn_blocking(move || start_replica(proxy_port))
            .await
            .expect("start the replica");
        let pair = ProxiedPair {
            master,
            replica,
            proxy,
        };
        pair.wait_connected_replicas("1").await;
        pair
    }

    /// Waits until the master counts `n` connected replicas.
    pub async fn wait_connected_replicas(&self, n: &str) {
        let port = self.master.port();
        let n = n.to_owned();
        tokio::task::spawn_blocking(move || {
            wait_until(
                &format!("the master counts {n} connected replicas"),
                Duration::from_secs(10),
                || replication_field(port, "connected_slaves").as_deref() == Some(n.as_str()),
            )
        })
        .await
        .expect("poll the master");
    }

    /// Waits until the replica holds `n` keys.
    pub async fn wait_replica_keys(&self, n: u64) {
        let port = self.replica.port();
        tokio::task::spawn_blocking(move || {
            wait_until(
                &format!("the replica holds {n} keys"),
                Duration::from_secs(10),
                || dbsize(port) == n,
            )
        })
        .await
        .expect("poll the replica");
    }

    /// Cuts the replication link and waits until the master sees no replica.
    pub async fn cut(&mut self) {
        self.proxy.cut().await;
        self.wait_connected_replicas("0").await;
    }

    /// Kills the master (SIGKILL) and promotes the replica (`REPLICAOF NO ONE`).
    pub fn fail_over(&mut self) {
        self.master.kill();
        let answer = cli(self.replica.port(), &["REPLICAOF", "NO", "ONE"]);
        assert!(
            answer.contains("OK"),
            "REPLICAOF NO ONE answered {answer:?}"
        );
        assert_eq!(
            replication_field(self.replica.port(), "role").as_deref(),
            Some("master"),
            "the replica was promoted"
        );
    }
}

/// A Redis Sentinel process monitoring one master as `name` with a quorum of 1, on its
/// own port and directory; killed (and its directory removed) when dropped.
#[derive(Debug)]
pub struct Sentinel {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Sentinel {
    /// Starts a Sentinel monitoring `127.0.0.1:master_port` as `name`: the master is
    /// down after `down_after` without answers, a failover times out after 3 s.
    pub fn start(name: &str, master_port: u16, down_after: Duration) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("idempotent-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} {down}\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.display(),
                down = down_after.as_millis()
            ),
        )
        .expect("write sentinel.conf");
        let log = std::fs::File::create(dir.join("sentinel.log")).expect("log file");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("the Sentinel test needs `redis-server` on PATH to start Sentinel: {e}")
            });
        let s = Sentinel { port, dir, child };
        wait_until("Sentinel answers PING", Duration::from_secs(10), || {
            cli(port, &["PING"]).contains("PONG")
        });
        s
    }

    /// The Sentinel's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The master's port Sentinel reports for `name`.
    pub fn master_port(&self, name: &str) -> Option<u16> {
        cli(self.port, &["SENTINEL", "get-master-addr-by-name", name])
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
    }

    /// The replicas Sentinel knows of `name`, each as its fields (`port`, `flags`,
    /// `master-link-status`, …).
    pub fn replicas(&self, name: &str) -> Vec<std::collections::HashMap<String, String>> {
        let out = cli(self.port, &["SENTINEL", "REPLICAS", name]);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        let mut replicas: Vec<std::collections::HashMap<String, String>> = Vec::new();
        for pair in lines.chunks(2) {
            let [field, value] = pair else { break };
            if *field == "name" {
                replicas.push(Default::default());
            }
            if let Some(r) = replicas.last_mut() {
                r.insert((*field).to_owned(), (*value).to_owned());
            }
        }
        replicas
    }

    /// Whether Sentinel knows the replica on `port` of `name` as a healthy replica
    /// (flags `slave` alone, its link to the master up), so it can promote it.
    pub fn has_healthy_replica(&self, name: &str, port: u16) -> bool {
        let port = port.to_string();
        self.replicas(name).iter().any(|r| {
            r.get("port") == Some(&port)
                && r.get("flags").map(String::as_str) == Some("slave")
                && r.get("master-link-status").map(String::as_str) == Some("ok")
        })
    }

    /// Asks Sentinel to fail `name` over now (`SENTINEL FAILOVER`), retrying while it
    /// answers that no replica is suitable yet or a failover is under way; panics with
    /// Sentinel's log after `timeout`.
    pub fn force_failover(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = cli(self.port, &["SENTINEL", "FAILOVER", name]);
            if answer.trim() == "OK" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SENTINEL FAILOVER {name} answered {answer:?} for {timeout:?}; Sentinel log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sentinel's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
