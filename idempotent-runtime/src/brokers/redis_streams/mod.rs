//! Redis Streams consumer groups: the dedup key of an entry, and the mapping from a
//! handler's outcome to `XACK`, a pending entry retried later, or a dead-letter stream.
//!
//! # The key
//!
//! A consumer group delivers an entry again when a consumer took it and never
//! acknowledged it (it crashed, or its `XACK` was lost) and another consumer claims it
//! with `XAUTOCLAIM` once it has been idle long enough; and a producer that retries an
//! `XADD` whose reply it lost stores the same message twice. Which id survives which:
//!
//! | id | same when the entry is claimed again | same on a producer's resend |
//! | --- | --- | --- |
//! | a business field of the entry (`order_id`), set by the producer | yes | yes |
//! | the entry id (`1733100000000-0`) | yes | **no**: every `XADD` gets a new id |
//!
//! So [`dedup_key`] reads a business field; the entry id only names the entry for
//! `XACK`.
//!
//! # The acknowledgement
//!
//! [`StreamGroup::settle`] maps a handler's [`Disposition`] onto the group:
//!
//! | handler returned | disposition | what happens to the entry |
//! | --- | --- | --- |
//! | `Ok(_)`: first run, or a duplicate that replayed the cached output | `Ack` | `XACK`: removed from the pending entries list |
//! | `Error::InProgress` (another consumer works on it), a retryable error, a business error | `Retry { after }` | left pending, its idle time set so that it can be claimed again `after` from now (`XCLAIM … IDLE`); the next [`StreamGroup::read`] of any consumer claims it with `XAUTOCLAIM` |
//! | `Error::AttemptsExhausted`, `MissingKey`, `FingerprintMismatch`, … | `DeadLetter` | copied to the dead-letter stream and `XACK`ed, in one `MULTI` |
//!
//! An entry that is delivered more than [`StreamGroup::max_deliveries`] times (a
//! handler that crashes its consumer every time never gets to return an outcome) is moved
//! to the dead-letter stream by [`StreamGroup::read`] without reaching the handler.
//!
//! Set the group's claim threshold ([`StreamGroup::claim_idle`]) well above the
//! time a handler normally takes: an entry claimed by a second consumer while the first
//! still works on it is answered `InProgress` (the first holds the claim in the store), so
//! this is safe, but it is wasted work.
//!
//! ```no_run
//! use idempotent_runtime::redis_streams::{StreamGroup, dedup_key};
//! use idempotent_runtime::{Disposition, Error, idempotent};
//! use idempotent_runtime::redis::aio::ConnectionManager;
//!
//! #[idempotent(key = "order_id", store = "redis")]
//! async fn on_order_paid(order_id: &[u8], amount: u64) -> Result<(), Error> {
//!     Ok(())
//! }
//!
//! # async fn run(mut conn: ConnectionManager) -> Result<(), idempotent_runtime::redis::RedisError> {
//! let group = StreamGroup::new("orders", "billing", "billing-1");
//! group.create(&mut conn).await?;
//! loop {
//!     for entry in group.read(&mut conn).await? {
//!         let amount = entry.field("amount").and_then(|a| std::str::from_utf8(a).ok()?.parse().ok());
//!         let result = on_order_paid(dedup_key(&entry, "order_id").unwrap_or_default(), amount.unwrap_or(0)).await;
//!         group.settle(&mut conn, &entry, Disposition::of(&result, entry.deliveries())).await?;
//!     }
//! }
//! # }
//! ```

use crate::disposition::Disposition;
use redis::aio::ConnectionLike;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamClaimOptions, StreamPendingCountReply,
    StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisResult, Value};
use std::sync::Mutex;
use std::time::Duration;

mod publisher;
pub use publisher::{
    DEFAULT_PRODUCER_ID, Idmp, MESSAGE_ID_FIELD, ORDERING_KEY_FIELD, PAYLOAD_FIELD, StreamPublisher,
};

/// One entry of the stream as a consumer of the group received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    deliveries: u32,
}

impl Entry {
    /// The entry id (`<ms>-<seq>`): names the entry for `XACK`; a producer's resend
    /// gets a new one, so it is no dedup key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The entry's fields and values.
    pub fn fields(&self) -> &[(String, Vec<u8>)] {
        &self.fields
    }

    /// The value of a field, if the entry has it.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// How many times the group delivered this entry, this delivery included (1 for an
    /// entry read for the first time).
    pub fn deliveries(&self) -> u32 {
        self.deliveries
    }
}

/// The dedup key of an entry: the value of its business field `field`; `None` (which
/// the attribute reports as `Error::MissingKey`) when the entry lacks it.
pub fn dedup_key<'a>(entry: &'a Entry, field: &str) -> Option<&'a [u8]> {
    entry.field(field).filter(|v| !v.is_empty())
}

/// What [`StreamGroup::settle`] did with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Settled {
    /// `XACK`ed.
    Acked,
    /// Left pending, claimable again after the retry delay.
    Pending,
    /// Copied to the dead-letter stream and `XACK`ed.
    DeadLettered,
}

/// One consumer of a consumer group on one stream: reads new and abandoned entries, and
/// settles each after its handler ran. See the [module docs](self).
///
/// A blocking [`read`](Self::read) holds up every other command sent on the same
/// connection until it returns (Redis serves one connection's commands in order): read on
/// a connection of its own, not the one the store, the handler or
/// [`settle`](Self::settle) use.
#[derive(Debug)]
pub struct StreamGroup {
    stream: String,
    group: String,
    consumer: String,
    dead_letter: String,
    claim_idle: Duration,
    max_deliveries: u32,
    count: usize,
    block: Duration,
    /// Where the next `XAUTOCLAIM` scan of the pending entries list starts.
    cursor: Mutex<String>,
}

impl StreamGroup {
    /// The consumer `consumer` of the group `group` on `stream`, with the dead-letter
    /// stream `<stream>:dead`, a claim threshold of 30 s, at most 16 deliveries, batches
    /// of 32 entries and reads that block up to 250 ms.
    pub fn new(
        stream: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
    ) -> Self {
        let stream = stream.into();
        StreamGroup {
            dead_letter: format!("{stream}:dead"),
            stream,
            group: group.into(),
            consumer: consumer.into(),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 16,
            count: 32,
            block: Duration::from_millis(250),
            cursor: Mutex::new("0-0".to_owned()),
        }
    }

    /// The stream that receives entries no retry can help.
    pub fn dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.dead_letter = stream.into();
        self
    }

    /// How long an entry stays pending, unacknowledged, before any consumer of the group
    /// claims it (its consumer is presumed dead).
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Deliveries after which an entry goes to the dead-letter stream without reaching
    /// the handler again (at least 1).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Most entries per [`read`](Self::read) (at least 1).
    pub fn batch(mut self, count: usize) -> Self {
        self.count = count.max(1);
        self
    }

    /// How long a [`read`](Self::read) waits for new entries when there are none.
    ///
    /// Keep it below the connection's response timeout (500 ms by default for the
    /// driver's `ConnectionManager` and multiplexed connections), or the read fails with a
    /// timeout.
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The dead-letter stream's name.
    pub fn dead_letter(&self) -> &str {
        &self.dead_letter
    }

    /// Creates the group (and the stream, if missing), reading from the stream's first
    /// entry; a group that already exists is left as it is.
    pub async fn create<C: ConnectionLike + Send + Sync>(&self, conn: &mut C) -> RedisResult<()> {
        let r: RedisResult<()> = conn
            .xgroup_create_mkstream(&self.stream, &self.group, "0")
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            r => r,
        }
    }

    /// The next entries for this consumer: first those other consumers abandoned (pending
    /// for longer than the claim threshold, taken over with `XAUTOCLAIM`), then new ones
    /// (`XREADGROUP … >`, blocking up to the block time). Entries past
    /// [`max_deliveries`](Self::max_deliveries) are moved to the dead-letter stream here
    /// and not returned.
    pub async fn read<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
    ) -> RedisResult<Vec<Entry>> {
        let mut entries = self.claim_abandoned(conn).await?;
        if entries.is_empty() {
            let opts = StreamReadOptions::default()
                .group(&self.group, &self.consumer)
                .count(self.count)
                .block(millis(self.block));
            let reply: Option<StreamReadReply> =
                conn.xread_options(&[&self.stream], &[">"], &opts).await?;
            for key in reply.into_iter().flat_map(|r| r.keys) {
                for id in key.ids {
                    entries.push(Entry {
                        fields: fields(id.map),
                        id: id.id,
                        deliveries: 1,
                    });
                }
            }
        }
        Ok(entries)
    }

    async fn claim_abandoned<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
    ) -> RedisResult<Vec<Entry>> {
        let start = self
            .cursor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let reply: StreamAutoClaimReply = conn
            .xautoclaim_options(
                &self.stream,
                &self.group,
                &self.consumer,
                millis(self.claim_idle),
                &start,
                StreamAutoClaimOptions::default().count(self.count),
            )
            .await?;
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = reply.next_stream_id;
        // entries deleted from the stream while pending: nothing left to deliver
        if !reply.deleted_ids.is_empty() {
            let _: () = conn
                .xack(&self.stream, &self.group, &reply.deleted_ids)
                .await?;
        }
        if reply.claimed.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &reply.claimed {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&id.id)
                .arg(&id.id)
                .arg(1);
        }
        let counts: Vec<StreamPendingCountReply> = pipe.query_async(conn).await?;
        let mut entries = Vec::with_capacity(reply.claimed.len());
        for (id, pending) in reply.claimed.into_iter().zip(counts) {
            let deliveries = pending.ids.first().map_or(1, |p| p.times_delivered);
            let entry = Entry {
                fields: fields(id.map),
                id: id.id,
                deliveries: u32::try_from(deliveries).unwrap_or(u32::MAX),
            };
            if entry.deliveries > self.max_deliveries {
                let reason = format!("delivered {} times", entry.deliveries);
                self.dead_letter_entry(conn, &entry, &reason).await?;
            } else {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// Acts on an entry's [`Disposition`]; see the [module docs](self).
    pub async fn settle<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
        entry: &Entry,
        disposition: Disposition,
    ) -> RedisResult<Settled> {
        match disposition {
            Disposition::Ack => {
                let _: () = conn.xack(&self.stream, &self.group, &[&entry.id]).await?;
                Ok(Settled::Acked)
            }
            Disposition::Retry { after } => {
                // claimable again once idle for claim_idle: start its idle time there
                let idle = self.claim_idle.saturating_sub(after);
                let _: Value = conn
                    .xclaim_options(
                        &self.stream,
                        &self.group,
                        &self.consumer,
                        0,
                        &[&entry.id],
                        StreamClaimOptions::default()
                            .idle(millis(idle))
                            .with_justid(),
                    )
                    .await?;
                Ok(Settled::Pending)
            }
            Disposition::DeadLetter => {
                self.dead_letter_entry(conn, entry, "no retry can succeed")
                    .await?;
                Ok(Settled::DeadLettered)
            }
        }
    }

    /// Copies the entry, with `dead.entry`, `dead.group` and `dead.reason` fields, to the
    /// dead-letter stream and acknowledges it, in one transaction.
    async fn dead_letter_entry<C: ConnectionLike + Send + Sync>(
        &self,
        conn: &mut C,
        entry: &Entry,
        reason: &str,
    ) -> RedisResult<()> {
        let mut items: Vec<(&str, &[u8])> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        items.push(("dead.entry", entry.id.as_bytes()));
        items.push(("dead.group", self.group.as_bytes()));
        items.push(("dead.reason", reason.as_bytes()));
        let _: () = redis::pipe()
            .atomic()
            .xadd(&self.dead_letter, "*", &items)
            .ignore()
            .xack(&self.stream, &self.group, &[&entry.id])
            .ignore()
            .query_async(conn)
            .await?;
        Ok(())
    }
}

fn millis(d: Duration) -> usize {
    usize::try_from(d.as_millis()).unwrap_or(usize::MAX)
}

fn fields(map: std::collections::HashMap<String, Value>) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = map
        .into_iter()
        .map(|(k, v)| {
            let bytes = redis::from_redis_value::<Vec<u8>>(v).unwrap_or_default();
            (k, bytes)
        })
        .collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::key::RecordKey;

    #[test]
    fn the_business_field_is_the_key_never_the_entry_id() {
        let e = Entry {
            id: "1-0".into(),
            fields: vec![
                ("amount".into(), b"5".to_vec()),
                ("order_id".into(), b"o-1".to_vec()),
            ],
            deliveries: 1,
        };
        assert_eq!(dedup_key(&e, "order_id"), Some(&b"o-1"[..]));
        assert_eq!(
            RecordKey::new("s", &dedup_key(&e, "order_id"))
                .unwrap()
                .key(),
            b"o-1"
        );
        assert!(matches!(
            RecordKey::new("s", &dedup_key(&e, "missing")),
            Err(Error::MissingKey)
        ));
        let empty = Entry {
            fields: vec![("order_id".into(), Vec::new())],
            ..e
        };
        assert_eq!(dedup_key(&empty, "order_id"), None);
    }
}
