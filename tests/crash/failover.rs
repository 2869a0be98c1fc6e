//! The failover modes' store: a private Redis master, its replica and a Sentinel
//! watching them, and the failover the driver causes during a run.
//!
//! A failover: the replication link is cut (the master disables the replication user
//! and drops the replica's connection; the master goes on acknowledging writes the
//! replica never gets), the master is killed with SIGKILL, the driver reads what the
//! replica holds of every order's record (the checker's record of what survived), and
//! Sentinel is asked to promote the replica (`SENTINEL FAILOVER`; it would do the same
//! by itself after `down-after-milliseconds`, asking lets the driver read the replica
//! first). The workers, connected through a `redis+sentinel://` URL, find the new
//! master on their own. A fresh replica of the new master is then started, so the next
//! failover (and `WAIT`) has a replica again.

use crate::check::Failover;
use crate::history::now_us;
use crate::{MASTER_NAME, SCOPE};
use idempotent_runtime::redis;
use idempotent_runtime::store::RecordState;
use idempotent_runtime::{Idempotency, RedisStore};
use idempotent_tests::redis_ha_support::{
    Sentinel, cli, replication_field, start_replica_with, wait_until,
};
use idempotent_tests::redis_support::{RedisServer, raw};
use std::collections::HashMap;
use std::time::Duration;

/// The ACL user replicas authenticate as; disabling it on the master cuts the link.
const REPL_USER: &str = "replication";
const REPL_PASSWORD: &str = "crash-replication";
/// Sentinel does not fail over by itself within a run: the driver asks it to.
const DOWN_AFTER: Duration = Duration::from_secs(60);
/// Between reading the replica and asking for the promotion, so that every completion
/// the old master acknowledged has its outcome in a history before `promoting_at`.
const SETTLE: Duration = Duration::from_millis(300);

/// Every server of the group: no persistence (the failover, not a restart, is the
/// fault), and the replication user, so that any of them can be a master.
fn server_args() -> Vec<String> {
    let password = format!(">{REPL_PASSWORD}");
    [
        "--save",
        "",
        "--appendonly",
        "no",
        // a new replica's full sync starts at once (the default waits 5 s for others)
        "--repl-diskless-sync-delay",
        "0",
        "--user",
        REPL_USER,
        "on",
        &password,
        "+psync",
        "+replconf",
        "+ping",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn start_replica_of(master_port: u16) -> RedisServer {
    let mut args = server_args();
    args.extend(["--masteruser", REPL_USER, "--masterauth", REPL_PASSWORD].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_replica_with(master_port, &args)
}

/// A master, its replica and a Sentinel; every process is killed when dropped.
pub struct RedisHa {
    sentinel: Sentinel,
    master: RedisServer,
    replica: RedisServer,
    /// The masters killed in failovers (their directories go with them).
    retired: Vec<RedisServer>,
}

impl RedisHa {
    /// Starts the group; returns once Sentinel knows the replica as promotable.
    pub fn start() -> RedisHa {
        let args = server_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let master = RedisServer::start_with(&args);
        let replica = start_replica_of(master.port());
        let sentinel = Sentinel::start(MASTER_NAME, master.port(), DOWN_AFTER);
        let ha = RedisHa {
            sentinel,
            master,
            replica,
            retired: Vec::new(),
        };
        wait_until(
            "Sentinel knows the replica",
            Duration::from_secs(30),
            || ha.ready(),
        );
        ha
    }

    /// The workers' URL: the master Sentinel names.
    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://127.0.0.1:{}/{MASTER_NAME}",
            self.sentinel.port()
        )
    }

    /// Whether Sentinel can promote the replica now.
    pub fn ready(&self) -> bool {
        self.sentinel
            .has_healthy_replica(MASTER_NAME, self.replica.port())
    }

    /// Fails the master over (see the module's documentation), the link cut for
    /// `partition` before the kill; `ids` are the orders whose records are read from
    /// the replica.
    pub async fn fail_over(&mut self, partition: Duration, ids: &[String]) -> Failover {
        let master = self.master.port();
        let partitioned_at = now_us();
        tokio::task::block_in_place(|| {
            let off = cli(master, &["ACL", "SETUSER", REPL_USER, "off"]);
            assert!(off.contains("OK"), "ACL SETUSER off answered {off:?}");
            cli(master, &["CLIENT", "KILL", "USER", REPL_USER]);
            wait_until(
                "the master counts no replica",
                Duration::from_secs(10),
                || replication_field(master, "connected_slaves").as_deref() == Some("0"),
            );
        });
        tokio::time::sleep(partition).await;
        self.master.kill();
        let killed_at = now_us();
        let survived = read_records(&self.replica.url(), ids).await;
        tokio::time::sleep(SETTLE).await;
        let promoting_at = now_us();
        let promoted = self.replica.port();
        let mut promoted_at = 0;
        tokio::task::block_in_place(|| {
            self.sentinel
                .force_failover(MASTER_NAME, Duration::from_secs(30));
            wait_until(
                "Sentinel names the promoted replica",
                Duration::from_secs(30),
                || self.sentinel.master_port(MASTER_NAME) == Some(promoted),
            );
            promoted_at = now_us();
            let replica = start_replica_of(promoted);
            wait_until(
                "the new master counts its replica",
                Duration::from_secs(10),
                || replication_field(promoted, "connected_slaves").as_deref() == Some("1"),
            );
            let new_master = std::mem::replace(&mut self.replica, replica);
            let old = std::mem::replace(&mut self.master, new_master);
            self.retired.push(old);
        });
        Failover {
            partitioned_at,
            killed_at,
            promoting_at,
            promoted_at,
            ready_at: now_us(),
            survived,
        }
    }
}

/// Each order's record on the server at `url` (a replica: plain `GET`s, which a replica
/// answers), decoded from the store's record layout: the state byte, the token at 6.
async fn read_records(url: &str, ids: &[String]) -> HashMap<String, Option<(RecordState, u64)>> {
    let mut conn = raw(url).await;
    let store = RedisStore::from_connection_manager(conn.clone());
    let h = Idempotency::new(SCOPE);
    let mut out = HashMap::new();
    for chunk in ids.chunks(500) {
        let keys: Vec<Vec<u8>> = chunk
            .iter()
            .map(|id| store.redis_key(&h.record_key(id.as_str()).expect("record key")))
            .collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .expect("read the records from the replica");
        for (id, v) in chunk.iter().zip(values) {
            let rec = v.map(|v| {
                assert!(v.len() >= 22, "{id}: not a record: {v:?}");
                let state = match v[0] {
                    0xE1 => RecordState::InProgress,
                    0xE2 => RecordState::Completed,
                    0xE3 => RecordState::Released,
                    t => panic!("{id}: unknown record tag {t:#x}"),
                };
                let token = u64::from_be_bytes(v[6..14].try_into().expect("8 bytes"));
                (state, token)
            });
            out.insert(id.clone(), rec);
        }
    }
    out
}
