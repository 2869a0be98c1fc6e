//! The batch steps: one `FCALL` of a batch function per group of keys (on a single node
//! up to [`BATCH_CALL_KEYS`] keys, on a cluster the keys of one hash slot), all sent at
//! once.

use super::library::Op;
use super::reply::{claim_outcome, fence};
use super::{Conn, RedisStore, micros, millis};
use crate::error::{StoreError, StoreErrorKind};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Release};
use futures_util::future::join_all;
use redis::cluster_routing::Slot;
use redis::{Cmd, Value};
use std::collections::HashMap;

/// Keys per batch call, so that one call holds the server for a bounded time (about
/// a millisecond).
const BATCH_CALL_KEYS: usize = 128;

impl RedisStore {
    /// The batch calls of `op` over `keys`: on a single node one call per
    /// [`BATCH_CALL_KEYS`] keys, on a cluster one per hash slot (and as many keys);
    /// `push_args` appends the arguments of the key at an index. Returns the indices
    /// each call covers, and the calls.
    fn many_cmds(
        &self,
        op: Op,
        keys: &[Vec<u8>],
        push_args: impl Fn(usize, &mut Cmd),
    ) -> (Vec<Vec<usize>>, Vec<Cmd>) {
        let all: Vec<usize> = (0..keys.len()).collect();
        let groups: Vec<Vec<usize>> = match self.conn {
            Conn::Single(_) => all.chunks(BATCH_CALL_KEYS).map(<[usize]>::to_vec).collect(),
            Conn::Cluster(_) => {
                let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
                for i in all {
                    by_slot.entry(Slot::for_key(&keys[i])).or_default().push(i);
                }
                by_slot
                    .into_values()
                    .flat_map(|g| {
                        g.chunks(BATCH_CALL_KEYS)
                            .map(<[usize]>::to_vec)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            }
        };
        let cmds = groups
            .iter()
            .map(|g| {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg(op.function()).arg(g.len());
                for &i in g {
                    cmd.arg(&keys[i]);
                }
                for &i in g {
                    push_args(i, &mut cmd);
                }
                cmd
            })
            .collect();
        (groups, cmds)
    }

    /// Sends the batch calls all at once (they share the connection, so a single
    /// node gets them in one write) and splits their replies back into one per key.
    async fn call_many(
        &self,
        op: Op,
        n: usize,
        (groups, cmds): (Vec<Vec<usize>>, Vec<Cmd>),
    ) -> Result<Vec<Value>, StoreError> {
        let replies = join_all(cmds.iter().map(|c| self.run(op, c))).await;
        let mut out = vec![Value::Nil; n];
        for (group, reply) in groups.iter().zip(replies) {
            match reply? {
                Value::Array(items) if items.len() == group.len() => {
                    for (&i, v) in group.iter().zip(items) {
                        out[i] = v;
                    }
                }
                _ => {
                    return Err(StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!(
                            "unexpected reply from the Redis {} function for {} keys",
                            op.what(),
                            group.len()
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn claim_many(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let keys: Vec<Vec<u8>> = reqs.iter().map(|r| self.redis_key(r.key)).collect();
        let calls = self.many_cmds(Op::ClaimMany, &keys, |i, cmd| {
            let r = &reqs[i];
            cmd.arg(micros(r.lease))
                .arg(millis(r.ttl.max(r.lease)))
                .arg(r.max_attempts.unwrap_or(0))
                .arg(u8::from(r.fingerprint.is_some()))
                .arg(r.fingerprint.unwrap_or_default());
        });
        let values = self.call_many(Op::ClaimMany, reqs.len(), calls).await?;
        let acked = self.wait_replicas().await?;
        reqs.iter()
            .zip(values)
            .map(|(r, v)| {
                let outcome = claim_outcome(r.key, v)?;
                self.check_claim_ack(r.key, &outcome, acked)?;
                Ok(outcome)
            })
            .collect()
    }

    pub(super) async fn complete_many(
        &self,
        items: &[Completion<'_>],
    ) -> Result<Vec<Fence>, StoreError> {
        let keys: Vec<Vec<u8>> = items.iter().map(|c| self.redis_key(c.key)).collect();
        let calls = self.many_cmds(Op::CompleteMany, &keys, |i, cmd| {
            let c = &items[i];
            cmd.arg(c.token.0)
                .arg(millis(c.ttl))
                .arg(u8::from(c.output.is_some()))
                .arg(c.output.unwrap_or_default());
        });
        let values = self.call_many(Op::CompleteMany, items.len(), calls).await?;
        let acked = self.wait_replicas().await?;
        items
            .iter()
            .zip(values)
            .map(|(c, v)| self.check_complete_ack(c.key, fence(c.key, "complete", v)?, acked))
            .collect()
    }

    pub(super) async fn release_many(
        &self,
        items: &[Release<'_>],
    ) -> Result<Vec<Fence>, StoreError> {
        let keys: Vec<Vec<u8>> = items.iter().map(|r| self.redis_key(r.key)).collect();
        let calls = self.many_cmds(Op::ReleaseMany, &keys, |i, cmd| {
            cmd.arg(items[i].token.0);
        });
        let values = self.call_many(Op::ReleaseMany, items.len(), calls).await?;
        items
            .iter()
            .zip(values)
            .map(|(r, v)| fence(r.key, "release", v))
            .collect()
    }
}
