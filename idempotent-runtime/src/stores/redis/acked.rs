//! Writes acknowledged by replicas: `WAIT` after the claims and completions the store
//! writes, and what a missing acknowledgement means for each.

use super::library::{Op, function_missing};
use super::{Conn, RedisStore, redis_error};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::{ClaimOutcome, Fence};
use redis::{Cmd, RedisError, RedisResult, Value};

impl RedisStore {
    /// Runs one write of `op`; with replica acknowledgement on, followed by `WAIT` in
    /// the same pipeline (so both go over the same connection, and `WAIT` covers the
    /// write). Returns the reply and the number of replicas that acknowledged it (`None`
    /// without the option).
    pub(super) async fn run_write(
        &self,
        op: Op,
        cmd: &Cmd,
    ) -> Result<(Value, Option<u32>), StoreError> {
        let Some(ack) = self.replica_ack else {
            return Ok((self.run(op, cmd).await?, None));
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .add_command(cmd.clone())
            .add_command(ack.wait_cmd());
        let what = match op {
            Op::Claim | Op::ClaimMany => "claim failed",
            _ => "complete failed",
        };
        let query = || async {
            let r: RedisResult<Vec<RedisResult<Value>>> = match &self.conn {
                Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
                Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
            };
            r
        };
        let mut replies = query().await.map_err(|e| redis_error(e, what))?;
        if replies
            .first()
            .is_some_and(|r| r.as_ref().is_err_and(missing))
        {
            self.load().await.map_err(|e| redis_error(e, what))?;
            replies = query().await.map_err(|e| redis_error(e, what))?;
        }
        let mut replies = replies.into_iter();
        let (Some(reply), Some(acked)) = (replies.next(), replies.next()) else {
            return Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!("{what}: unexpected reply from Redis to the write and its WAIT"),
            ));
        };
        let reply = reply.map_err(|e| redis_error(e, what))?;
        let acked = match acked.map_err(|e| redis_error(e, "WAIT failed"))? {
            Value::Int(n) => u32::try_from(n).unwrap_or(0),
            _ => {
                return Err(StoreError::new(
                    StoreErrorKind::Corrupt,
                    "unexpected reply from Redis to WAIT",
                ));
            }
        };
        Ok((reply, Some(acked)))
    }

    /// `WAIT` alone, after a batch of writes sent on the same connections; `None`
    /// without replica acknowledgement.
    pub(super) async fn wait_replicas(&self) -> Result<Option<u32>, StoreError> {
        let Some(ack) = self.replica_ack else {
            return Ok(None);
        };
        let cmd = ack.wait_cmd();
        let n: i64 = match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
        .map_err(|e| redis_error(e, "WAIT failed"))?;
        Ok(Some(u32::try_from(n).unwrap_or(0)))
    }

    /// A claim that acquired the key but was not acknowledged by enough replicas:
    /// the handler must not run (its claim could vanish in a failover, and a redelivery
    /// to the promoted replica would run it again). The claim stays on the master until
    /// its lease expires.
    pub(super) fn check_claim_ack(
        &self,
        key: &RecordKey,
        outcome: &ClaimOutcome,
        acked: Option<u32>,
    ) -> Result<(), StoreError> {
        match (self.replica_ack, acked) {
            (Some(ack), Some(n))
                if n < ack.replicas && matches!(outcome, ClaimOutcome::Acquired { .. }) =>
            {
                Err(StoreError::new(
                    StoreErrorKind::NotReplicated,
                    format!(
                        "claim of a key of scope `{}` acknowledged by {n} of {} replicas \
                         within {} ms: not running the handler (a failover could lose \
                         the claim); the key frees when its lease expires",
                        key.scope(),
                        ack.replicas,
                        ack.timeout.as_millis()
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// A completion recorded on the master but not acknowledged by enough replicas: a
    /// failover now could lose it, and a redelivery would then run the handler again.
    pub(super) fn check_complete_ack(
        &self,
        key: &RecordKey,
        fence: Fence,
        acked: Option<u32>,
    ) -> Result<Fence, StoreError> {
        match (self.replica_ack, acked) {
            (Some(ack), Some(n)) if n < ack.replicas && fence == Fence::Held => {
                tracing::warn!(
                    scope = key.scope(),
                    acknowledged = n,
                    required = ack.replicas,
                    "completion recorded on the Redis master but not acknowledged by enough \
                     replicas in time: a failover now could lose it and a redelivery would \
                     run the handler again"
                );
                Err(StoreError::new(
                    StoreErrorKind::NotReplicated,
                    format!(
                        "completion of a key of scope `{}` recorded on the Redis master but \
                         acknowledged by {n} of {} replicas within {} ms: a failover now \
                         could lose it",
                        key.scope(),
                        ack.replicas,
                        ack.timeout.as_millis()
                    ),
                ))
            }
            _ => Ok(fence),
        }
    }
}

fn missing(e: &RedisError) -> bool {
    function_missing(e.code().unwrap_or(""), e.detail())
}
