//! Apache Kafka (through `rdkafka` 0.39): the dedup key of a record, and the mapping from
//! a batch of handler outcomes to offset commits, seeks back for retries, and a
//! dead-letter topic.
//!
//! # The key
//!
//! A consumer group delivers records again whenever their offsets were not committed
//! before their partition moved: a consumer crashed or was stopped after the work and
//! before the commit, an offset commit failed, or a rebalance (a consumer joining or
//! leaving, a session timeout) revoked the partition mid-batch. A producer that retries a
//! send whose acknowledgement it lost (without the idempotent producer, or from an
//! application-level retry or outbox relay) writes the same message as a new record.
//! Which id survives which:
//!
//! | id | same on redelivery | same on a producer's resend |
//! | --- | --- | --- |
//! | a business header (`order-id`), set by the producer | yes | yes |
//! | the record key, set by the producer | yes | yes, if it is the business id (it is often only a partitioning key) |
//! | partition and offset | yes | **no**: a resend is a new record at a new offset |
//!
//! [`dedup_key`] takes the business header, else the record key; never the offset.
//!
//! # The acknowledgement
//!
//! Kafka acknowledges by committing, per partition, the offset of the next record to
//! read: a commit covers every record before it. [`settle`] takes a polled batch and the
//! [`Disposition`] of each record (usually from
//! [`Idempotency::run_batch`](crate::Idempotency::run_batch), which claims the whole batch
//! in one round trip to the store) and, per partition, in offset order:
//!
//! | handler returned | disposition | Kafka |
//! | --- | --- | --- |
//! | `Ok(_)`: first run, or a duplicate that replayed the cached output | `Ack` | the offset after it is committed |
//! | `Error::InProgress`, a retryable error, a business error | `Retry { after }` | nothing from this record on is committed; the consumer seeks back to it, and the next poll (after [`Settled::retry_after`]) delivers it again, with the records after it, which replay |
//! | `Error::AttemptsExhausted`, `MissingKey`, `FingerprintMismatch`, … | `DeadLetter` | the record is produced to the dead-letter topic (with its key, headers and a `dead-reason` header), then committed past |
//!
//! Commit with `enable.auto.commit = false`: an automatic commit after a poll would commit
//! records whose handler has not finished, and a crash would lose them. A failed commit is
//! harmless: the records are delivered again after the next rebalance and replay from the
//! store, and the next successful commit of the partition covers them.
//!
//! ```no_run
//! use idempotent_runtime::kafka::{self, SettleError, rdkafka};
//! use idempotent_runtime::{Disposition, Error, Idempotency};
//! use rdkafka::Message;
//! use rdkafka::consumer::StreamConsumer;
//! use std::time::Duration;
//!
//! # async fn run(consumer: StreamConsumer) -> Result<(), Box<dyn std::error::Error>> {
//! let billing = Idempotency::new("billing").store_named("redis");
//! loop {
//!     let batch = kafka::recv_batch(&consumer, 64, Duration::from_millis(50)).await?;
//!     let results: Vec<Result<usize, Error>> = billing
//!         .run_batch(
//!             &batch,
//!             |m| kafka::dedup_key(m, "order-id"),
//!             |m| async move { Ok(m.payload().map_or(0, <[u8]>::len)) },
//!         )
//!         .await;
//!     let dispositions: Vec<Disposition> = results.iter().map(|r| Disposition::of(r, 1)).collect();
//!     match kafka::settle(&consumer, &batch, &dispositions, None).await {
//!         Ok(settled) => {
//!             if let Some(wait) = settled.retry_after {
//!                 tokio::time::sleep(wait).await;
//!             }
//!         }
//!         // read the partitions again from their last commit
//!         Err(SettleError::Seek(_)) => kafka::rejoin(&consumer)?,
//!         // nothing is lost: the records not committed come again and replay
//!         Err(e) => eprintln!("settling a batch failed: {e}"),
//!     }
//! }
//! # }
//! ```

use crate::disposition::Disposition;
use crate::key::{KeyBuilder, KeyPart};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The `rdkafka` crate this module is written against.
pub use rdkafka;

mod publisher;
pub use publisher::{KafkaPublisher, MESSAGE_ID_HEADER};

/// How long [`settle`] waits for a seek to be accepted and a dead letter to be written.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The dedup key of a record; see [`dedup_key`].
///
/// A business header is one key part, its value; a record key is two parts,
/// `("key", bytes)`, so the two can never collide. A record with neither is
/// [`Error::MissingKey`](crate::Error::MissingKey).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DedupKey<'a> {
    /// The value of the business header.
    Header(&'a [u8]),
    /// The record key.
    RecordKey(&'a [u8]),
    /// Neither is set.
    Missing,
}

impl KeyPart for DedupKey<'_> {
    fn write_key(&self, key: &mut KeyBuilder) {
        match self {
            DedupKey::Header(v) => key.push(v),
            DedupKey::RecordKey(k) => {
                key.push(b"key");
                key.push(k);
            }
            DedupKey::Missing => key.missing(),
        }
    }
}

/// The value of the last header named `name`, when it is set and not empty.
pub fn header<'a, M: Message>(msg: &'a M, name: &str) -> Option<&'a [u8]> {
    msg.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()?
        .value
        .filter(|v| !v.is_empty())
}

/// The dedup key of a record: its business header `header_name`, else its record key;
/// never its partition and offset.
pub fn dedup_key<'a, M: Message>(msg: &'a M, header_name: &str) -> DedupKey<'a> {
    if let Some(v) = header(msg, header_name) {
        DedupKey::Header(v)
    } else if let Some(k) = msg.key().filter(|k| !k.is_empty()) {
        DedupKey::RecordKey(k)
    } else {
        DedupKey::Missing
    }
}

/// Receives a batch: waits for one record, then takes more for up to `linger`, at most
/// `max` in all (at least 1).
///
/// An error is returned when nothing was received; after the first record, an error
/// ends the batch (it is logged), and the next call sees the consumer's state again.
///
/// # Cancel safety
///
/// Not cancel safe: records received before the returned future is dropped (by a
/// `timeout` or the losing branch of a `select!`) are gone from the consumer's position,
/// and the next commit of their partition skips them. Await it to completion; to stop a
/// consumer, stop calling it (or abort its task and drop the consumer without
/// committing).
pub async fn recv_batch<'c, C: ConsumerContext + 'static>(
    consumer: &'c StreamConsumer<C>,
    max: usize,
    linger: Duration,
) -> Result<Vec<BorrowedMessage<'c>>, KafkaError> {
    let first = consumer.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max.max(1) {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka consumer error ends the batch");
                break;
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// Where the records should go: the dead-letter topic and the producer that writes to it.
#[derive(Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The producer (any producer of the application's cluster).
    pub producer: &'a FutureProducer,
    /// The dead-letter topic.
    pub topic: &'a str,
}

impl fmt::Debug for DeadLetter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// What [`settle`] did with a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// Records committed past after their handler succeeded or replayed.
    pub acked: usize,
    /// Records written to the dead-letter topic and committed past.
    pub dead_lettered: usize,
    /// Records left uncommitted to be delivered again: a retried record and those after
    /// it in its partition.
    pub redelivered: usize,
    /// Partitions sought back to a retried record.
    pub rewound: usize,
    /// The shortest retry delay of the batch: wait this long before the next poll.
    pub retry_after: Option<Duration>,
}

/// Why [`settle`] failed. Nothing is lost either way: the records it could not commit
/// are delivered again and replay from the store.
#[derive(Debug)]
#[non_exhaustive]
pub enum SettleError {
    /// The batch and its dispositions differ in length.
    Mismatch {
        /// Records in the batch.
        messages: usize,
        /// Dispositions given.
        dispositions: usize,
    },
    /// Seeking back to a retried record failed, and nothing of the batch was committed.
    /// This happens when the partition was revoked meanwhile (its new owner reads from
    /// the last commit). It may also happen while the partition is still assigned: the
    /// consumer would then read on past the retried record, and a later batch's commit
    /// would cover it unseen. Call [`rejoin`], so that the partition is read again from
    /// its last commit.
    Seek(KafkaError),
    /// The offset commit failed (for example during a rebalance).
    Commit(KafkaError),
}

impl fmt::Display for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettleError::Mismatch {
                messages,
                dispositions,
            } => write!(
                f,
                "a batch of {messages} records was settled with {dispositions} dispositions"
            ),
            SettleError::Seek(_) => f.write_str("could not seek back to a retried record"),
            SettleError::Commit(_) => f.write_str("the offset commit failed"),
        }
    }
}

impl std::error::Error for SettleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SettleError::Mismatch { .. } => None,
            SettleError::Seek(e) | SettleError::Commit(e) => Some(e),
        }
    }
}

/// One partition's part of a batch: the offset to commit and where to seek back.
#[derive(Debug, Default, PartialEq, Eq)]
struct PartitionPlan {
    /// The offset of the next record to read, after the records settled.
    commit: Option<i64>,
    /// The first retried record and its delay.
    seek: Option<(i64, Duration)>,
}

/// Commits, seeks back and dead-letters a polled batch according to each record's
/// [`Disposition`] (in the order of `messages`); see the [module docs](self).
///
/// A record to dead-letter whose write to the dead-letter topic fails (or with no
/// dead-letter topic given) is retried instead, so it is never committed past unseen.
pub async fn settle<Ctx, C>(
    consumer: &C,
    messages: &[BorrowedMessage<'_>],
    dispositions: &[Disposition],
    dead_letter: Option<DeadLetter<'_>>,
) -> Result<Settled, SettleError>
where
    Ctx: ConsumerContext,
    C: Consumer<Ctx>,
{
    if messages.len() != dispositions.len() {
        return Err(SettleError::Mismatch {
            messages: messages.len(),
            dispositions: dispositions.len(),
        });
    }
    // records of each partition in offset order
    let mut partitions: BTreeMap<(&str, i32), Vec<(i64, usize)>> = BTreeMap::new();
    for (i, m) in messages.iter().enumerate() {
        partitions
            .entry((m.topic(), m.partition()))
            .or_default()
            .push((m.offset(), i));
    }
    let mut settled = Settled::default();
    let mut commits = TopicPartitionList::new();
    let mut seeks: Vec<(&str, i32, i64)> = Vec::new();
    for ((topic, partition), mut records) in partitions {
        records.sort_unstable();
        records.dedup_by_key(|r| r.0);
        let mut plan = PartitionPlan::default();
        for &(offset, i) in &records {
            if plan.seek.is_some() {
                settled.redelivered += 1;
                continue;
            }
            match dispositions[i] {
                Disposition::Ack => {
                    settled.acked += 1;
                    plan.commit = Some(offset + 1);
                }
                Disposition::DeadLetter => {
                    match write_dead_letter(&messages[i], dead_letter).await {
                        Ok(()) => {
                            settled.dead_lettered += 1;
                            plan.commit = Some(offset + 1);
                        }
                        Err(e) => {
                            tracing::warn!(topic, partition, offset, error = %e, "dead letter not written; the record is retried");
                            settled.redelivered += 1;
                            plan.seek =
                                Some((offset, crate::disposition::RetryPolicy::default().initial));
                        }
                    }
                }
                Disposition::Retry { after } => {
                    settled.redelivered += 1;
                    plan.seek = Some((offset, after));
                }
            }
        }
        if let Some(next) = plan.commit {
            // a commit only fails to be added for an out-of-range partition
            let _ = commits.add_partition_offset(topic, partition, Offset::Offset(next));
        }
        if let Some((offset, after)) = plan.seek {
            seeks.push((topic, partition, offset));
            settled.retry_after = Some(settled.retry_after.map_or(after, |r| r.min(after)));
        }
    }
    // rewind first: even when the commit fails, the retried records come back
    for (topic, partition, offset) in seeks {
        blocking(|| consumer.seek(topic, partition, Offset::Offset(offset), BROKER_TIMEOUT))
            .map_err(SettleError::Seek)?;
        settled.rewound += 1;
    }
    if commits.count() > 0 {
        blocking(|| consumer.commit(&commits, CommitMode::Sync)).map_err(SettleError::Commit)?;
    }
    Ok(settled)
}

/// Leaves the consumer group and joins it again with the same topics, so that every
/// partition this consumer is given is read from its last committed offset: what to do
/// after [`SettleError::Seek`]. The records since the last commit come again and
/// replay from the store.
///
/// Fails if the consumer has no subscription. For partitions assigned by hand, assign
/// them again from their committed offsets instead.
pub fn rejoin<Ctx, C>(consumer: &C) -> Result<(), KafkaError>
where
    Ctx: ConsumerContext,
    C: Consumer<Ctx>,
{
    let topics: Vec<String> = consumer
        .subscription()?
        .elements()
        .iter()
        .map(|e| e.topic().to_owned())
        .collect();
    if topics.is_empty() {
        return Err(KafkaError::Subscription(
            "the consumer subscribes to no topic: nothing to join again".into(),
        ));
    }
    consumer.unsubscribe();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)
}

/// Writes a record to the dead-letter topic with its key, payload and headers, plus
/// `dead-topic`, `dead-partition` and `dead-offset` headers.
async fn write_dead_letter(
    m: &BorrowedMessage<'_>,
    dead_letter: Option<DeadLetter<'_>>,
) -> Result<(), DeadLetterError> {
    let dl = dead_letter.ok_or(DeadLetterError::NoTopic)?;
    let mut headers = OwnedHeaders::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            headers = headers.insert(h);
        }
    }
    let (partition, offset) = (m.partition().to_string(), m.offset().to_string());
    for (key, value) in [
        ("dead-topic", m.topic()),
        ("dead-partition", partition.as_str()),
        ("dead-offset", offset.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dl.topic).headers(headers);
    if let Some(k) = m.key() {
        record = record.key(k);
    }
    if let Some(p) = m.payload() {
        record = record.payload(p);
    }
    dl.producer
        .send(record, BROKER_TIMEOUT)
        .await
        .map(drop)
        .map_err(|(e, _)| DeadLetterError::Kafka(e))
}

#[derive(Debug)]
enum DeadLetterError {
    NoTopic,
    Kafka(KafkaError),
}

impl fmt::Display for DeadLetterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterError::NoTopic => f.write_str("no dead-letter topic configured"),
            DeadLetterError::Kafka(e) => write!(f, "{e}"),
        }
    }
}

/// Runs a call into librdkafka that blocks for a broker round trip: off the async worker
/// on a multi-threaded runtime, directly elsewhere.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::key::RecordKey;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn record(key: Option<&[u8]>, header: Option<&str>) -> OwnedMessage {
        let headers = header.map(|v| {
            OwnedHeaders::new().insert(Header {
                key: "order-id",
                value: Some(v),
            })
        });
        OwnedMessage::new(
            Some(b"x".to_vec()),
            key.map(<[u8]>::to_vec),
            "orders".into(),
            Timestamp::NotAvailable,
            0,
            42,
            headers,
        )
    }

    fn enc(k: DedupKey<'_>) -> Result<Vec<u8>, Error> {
        RecordKey::new("s", &k).map(|r| r.key().to_vec())
    }

    #[test]
    fn business_header_first_then_record_key_never_the_offset() {
        let both = record(Some(b"o-9"), Some("o-1"));
        assert_eq!(dedup_key(&both, "order-id"), DedupKey::Header(b"o-1"));
        assert_eq!(enc(dedup_key(&both, "order-id")).unwrap(), b"o-1");

        let key_only = record(Some(b"o-9"), None);
        assert_eq!(
            dedup_key(&key_only, "order-id"),
            DedupKey::RecordKey(b"o-9")
        );
        assert_ne!(
            enc(dedup_key(&key_only, "order-id")).unwrap(),
            enc(DedupKey::Header(b"o-9")).unwrap()
        );

        let neither = record(None, Some(""));
        assert_eq!(dedup_key(&neither, "order-id"), DedupKey::Missing);
        assert!(matches!(
            enc(dedup_key(&neither, "order-id")),
            Err(Error::MissingKey)
        ));
    }
}
