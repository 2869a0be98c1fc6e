//! The [`Store`] and [`StoreAdmin`] implementations: one `FCALL` per single-key step.

use super::library::Op;
use super::reply::{claim_outcome, fence, record};
use super::{Conn, RedisStore, micros, millis, redis_error};
use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::admin::StoreAdmin;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Record, Release, Store, Token};
use async_trait::async_trait;
use redis::Cmd;
use std::time::Duration;

impl RedisStore {
    fn claim_cmd(req: &ClaimRequest<'_>, key: &[u8]) -> Cmd {
        let mut cmd = Self::fcall(Op::Claim, key, req.fingerprint.map_or(0, <[u8]>::len));
        cmd.arg(micros(req.lease))
            .arg(millis(req.ttl.max(req.lease)))
            .arg(req.max_attempts.unwrap_or(0));
        if let Some(fp) = req.fingerprint {
            cmd.arg(fp);
        }
        cmd
    }

    fn complete_cmd(c: &Completion<'_>, key: &[u8]) -> Cmd {
        let mut cmd = Self::fcall(Op::Complete, key, c.output.map_or(0, <[u8]>::len));
        cmd.arg(c.token.0).arg(millis(c.ttl));
        if let Some(out) = c.output {
            cmd.arg(out);
        }
        cmd
    }

    fn release_cmd(r: &Release<'_>, key: &[u8]) -> Cmd {
        let mut cmd = Self::fcall(Op::Release, key, 0);
        cmd.arg(r.token.0);
        cmd
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let cmd = Self::claim_cmd(req, &self.redis_key(req.key));
        let (reply, acked) = self.run_write(Op::Claim, &cmd).await?;
        let outcome = claim_outcome(req.key, reply)?;
        self.check_claim_ack(req.key, &outcome, acked)?;
        Ok(outcome)
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        let cmd = Self::complete_cmd(c, &self.redis_key(c.key));
        let (reply, acked) = self.run_write(Op::Complete, &cmd).await?;
        self.check_complete_ack(c.key, fence(c.key, "complete", reply)?, acked)
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        let cmd = Self::release_cmd(r, &self.redis_key(r.key));
        fence(r.key, "release", self.run(Op::Release, &cmd).await?)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let mut cmd = Self::fcall(Op::Renew, &self.redis_key(key), 0);
        cmd.arg(token.0).arg(micros(lease)).arg(millis(lease));
        fence(key, "renew", self.run(Op::Renew, &cmd).await?)
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        self.claim_many(reqs).await
    }

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.complete_many(items).await
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.release_many(items).await
    }

    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        Some(self)
    }
}

#[async_trait]
impl StoreAdmin for RedisStore {
    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let cmd = Self::fcall(Op::Inspect, &self.redis_key(key), 0);
        record(key, self.run(Op::Inspect, &cmd).await?)
    }

    /// Deletes the key with one `DEL`, whatever it holds (a record or foreign data).
    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.redis_key(key));
        let n: i64 = match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
        .map_err(|e| redis_error(e, "forget failed"))?;
        Ok(n > 0)
    }

    /// Redis expires records by itself (each key carries the record's expiry): returns 0.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// `SCAN` with the store's prefix (and the scope's part of the key when the filter
    /// names a scope), on a cluster master after master; each batch of keys is read
    /// with one pipelined `GET` and `PTTL` per key. Keys under the prefix that do not
    /// hold a record are skipped.
    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        self.scan_page(filter, cursor, limit).await
    }

    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        self.admin(key, "release").await
    }

    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        self.admin(key, "reset").await
    }
}
