//! The replica acknowledgement setting: how many replicas, how long to wait.

use redis::Cmd;
use std::time::Duration;

/// How many replicas must acknowledge a claim or a completion, and how long to wait
/// for them (Redis `WAIT replicas timeout`); see
/// [`RedisStore::with_replica_ack`](crate::RedisStore::with_replica_ack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaAck {
    /// Replicas that must hold the write (at least 1 to have an effect).
    pub replicas: u32,
    /// How long the master waits for them (at least 1 ms: `WAIT` with 0 would block
    /// forever). Keep it below the connection's response timeout (500 ms with
    /// [`RedisStore::connect`](crate::RedisStore::connect)), or the wait itself fails as
    /// [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable).
    pub timeout: Duration,
}

impl ReplicaAck {
    /// `replicas` replicas within `timeout`.
    pub const fn new(replicas: u32, timeout: Duration) -> Self {
        ReplicaAck { replicas, timeout }
    }

    /// `WAIT replicas timeout-ms`.
    pub(super) fn wait_cmd(self) -> Cmd {
        let ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.replicas).arg(ms);
        cmd
    }
}
