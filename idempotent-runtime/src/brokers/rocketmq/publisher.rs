//! [`RocketMqPublisher`]: outgoing messages sent with the id as the message's `keys`
//! and the ordering key as the sharding key that selects the queue, confirmed by the
//! broker's send result.

use crate::outbox::{OutgoingMessage, PublishError, PublishErrorKind, Publisher};
use async_trait::async_trait;
use rocketmq_client_rust::{ClientError, ClientResult, DefaultMQProducer, SendResult, SendStatus};
use rocketmq_model::common::message::message_single::Message;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Sends outgoing messages to RocketMQ: the message's destination is the topic, its id
/// the message's `keys` (the `KEYS` property, which `rocketmq::dedup_key` reads and the
/// broker indexes for queries by key), its headers user properties, its payload the
/// body, unchanged.
///
/// A message with an ordering key gets it as its sharding key (`__SHARDINGKEY`) and is
/// sent to the queue the key selects: the key's Java `String.hashCode()` modulo the
/// number of queues, as the Java client's `SelectMessageQueueByHash` does, so the
/// messages of one key stay in one queue, in order, whichever client sends them.
/// Messages without one go to the producer's usual queue selection.
///
/// # The confirmation
///
/// [`publish`](Publisher::publish) sends synchronously and returns once the broker
/// answered `SEND_OK`. The other answers (`FLUSH_DISK_TIMEOUT`, `FLUSH_SLAVE_TIMEOUT`,
/// `SLAVE_NOT_AVAILABLE`: stored but not flushed or replicated as the broker is
/// configured to) are `Unavailable`, so the relay publishes again; the producer's send
/// timeout and retries bound the wait. Each send runs on a thread of tokio's blocking
/// pool, which drives the client's send on the caller's runtime.
///
/// # The dedup
///
/// RocketMQ does not drop a message whose `keys` it has seen: a message the relay
/// publishes again is a second message (a new `UNIQ_KEY`) with the same `keys`, which a
/// consumer keyed with `rocketmq::dedup_key` answers from its store.
///
/// # Errors
///
/// | what happened | [`PublishErrorKind`] |
/// | --- | --- |
/// | the message invalid (an empty body, an invalid topic, a body over 4 MiB, checked before sending; the broker's own size limit), a header named like a reserved property (`KEYS`, `TAGS`, `__SHARDINGKEY`, …), the topic missing, not permitted (the client's validation, authentication or authorisation errors; the broker's codes 13, 16, 17) | `Rejected` |
/// | a timeout, no route or broker (no queue for the ordering key to select), the broker busy or failing, a send status other than `SEND_OK`, the producer not started or shut down, any other error | `Unavailable` |
///
/// A header name that repeats keeps its last value (properties are a map).
///
/// ```no_run
/// use idempotent_runtime::rocketmq::RocketMqPublisher;
/// use idempotent_runtime::rocketmq::client::DefaultMQProducer;
/// use idempotent_runtime::outbox::{OutgoingMessage, Publisher, Uuid};
///
/// # async fn run(producer: DefaultMQProducer) -> Result<(), Box<dyn std::error::Error>> {
/// // a started producer
/// let publisher = RocketMqPublisher::new(producer);
/// let message = OutgoingMessage::new(Uuid::from_u128(7), "Payments", b"o-17".to_vec())
///     .with_header("content-type", "text/plain")
///     .with_ordering_key("customer-4");
/// publisher.publish(&message).await?;
/// # Ok(())
/// # }
/// ```
pub struct RocketMqPublisher {
    send: Arc<SendFn>,
}

/// Sends one message, with the Java hash of its ordering key, on a thread that may
/// block (see [`RocketMqPublisher::new`]).
/// The second value says the selector found no queue (the topic's route is empty).
type SendFn =
    dyn Fn(Message, Option<i32>) -> (ClientResult<Option<SendResult>>, bool) + Send + Sync;

impl fmt::Debug for RocketMqPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocketMqPublisher").finish_non_exhaustive()
    }
}

impl RocketMqPublisher {
    /// A publisher on this producer (started: [`DefaultMQProducer::start`]; keep a
    /// clone to shut it down).
    pub fn new(producer: DefaultMQProducer) -> Self {
        // The client's send future is nested too deeply for the compiler to prove it
        // `Send` within the default recursion limit, so it is never awaited in an async
        // fn: each send runs on a blocking-pool thread, which drives it on the runtime
        // with `Handle::block_on` (which needs no `Send` future).
        let send = move |msg: Message, ordering: Option<i32>| {
            let no_queue = Arc::new(AtomicBool::new(false));
            let sent = tokio::runtime::Handle::current().block_on(async {
                match ordering {
                    Some(hash) => {
                        let no_queue = Arc::clone(&no_queue);
                        producer
                            .send_with_selector(
                                msg,
                                move |queues, _, hash: &i32| {
                                    let n = i32::try_from(queues.len()).ok().filter(|n| *n > 0);
                                    let Some(n) = n else {
                                        no_queue.store(true, Ordering::Relaxed);
                                        return None;
                                    };
                                    let i = (hash % n).unsigned_abs() as usize;
                                    queues.get(i).cloned()
                                },
                                hash,
                            )
                            .await
                    }
                    None => producer.send(msg).await,
                }
            });
            (sent, no_queue.load(Ordering::Relaxed))
        };
        RocketMqPublisher {
            send: Arc::new(send),
        }
    }

    /// Publishes `message` as [`publish`](Publisher::publish) does and returns the
    /// broker's send result (the `UNIQ_KEY` it got, its queue and offset).
    pub async fn publish_sent(
        &self,
        message: &OutgoingMessage,
    ) -> Result<SendResult, PublishError> {
        let msg = build(message)?;
        let ordering = message.ordering_key().map(java_hash);
        let send = Arc::clone(&self.send);
        let (sent, no_queue) = tokio::task::spawn_blocking(move || send(msg, ordering))
            .await
            .map_err(|e| {
                PublishError::new(
                    PublishErrorKind::Unavailable,
                    format!(
                        "sending {} to {:?}: the send task failed: {e}",
                        message.id(),
                        message.destination()
                    ),
                )
            })?;
        match sent {
            Ok(Some(result)) if result.send_status == SendStatus::SendOk => Ok(result),
            Ok(Some(result)) => Err(PublishError::new(
                PublishErrorKind::Unavailable,
                format!(
                    "sending {} to {:?}: the broker answered {:?}, not SEND_OK",
                    message.id(),
                    message.destination(),
                    result.send_status
                ),
            )),
            Ok(None) => Err(PublishError::new(
                PublishErrorKind::Unavailable,
                format!(
                    "sending {} to {:?}: no send result",
                    message.id(),
                    message.destination()
                ),
            )),
            // the selector had no queue to choose from: no route to the topic for now
            Err(e) if no_queue => Err(PublishError::new(
                PublishErrorKind::Unavailable,
                format!(
                    "sending {} to {:?}: the topic has no queue to send to (no route): {e}",
                    message.id(),
                    message.destination()
                ),
            )
            .with_source(e)),
            Err(e) => Err(classify(message, e)),
        }
    }
}

#[async_trait]
impl Publisher for RocketMqPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        self.publish_sent(message).await.map(drop)
    }
}

fn build(message: &OutgoingMessage) -> Result<Message, PublishError> {
    let invalid = |e: &dyn fmt::Display| {
        PublishError::new(
            PublishErrorKind::Rejected,
            format!(
                "the message {} to {:?} is not a valid RocketMQ message: {e}",
                message.id(),
                message.destination()
            ),
        )
    };
    // checked here rather than left to the client, whose error for an invalid
    // message is also the one it gives once the producer is shut down
    let topic = message.destination();
    if topic.is_empty()
        || topic.len() > MAX_TOPIC_LEN
        || !topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'|' | b'_' | b'-'))
    {
        return Err(invalid(&format_args!(
            "a topic is 1 to {MAX_TOPIC_LEN} characters among letters, digits, `%`, `|`, `_` and `-`"
        )));
    }
    if message.payload().is_empty() {
        return Err(invalid(&"an empty body"));
    }
    if message.payload().len() > MAX_BODY_LEN {
        return Err(invalid(&format_args!(
            "a body of {} bytes, over the client's limit of {MAX_BODY_LEN}",
            message.payload().len()
        )));
    }
    let mut builder = Message::builder()
        .topic(message.destination())
        .key(message.id().to_string())
        .body_slice(message.payload());
    if let Some(key) = message.ordering_key() {
        builder = builder.sharding_key(key);
    }
    for (name, value) in message.headers() {
        builder = builder
            .raw_property(name.as_str(), value.as_str())
            .map_err(|e| invalid(&format_args!("the header {name:?}: {e}")))?;
    }
    builder.build().map_err(|e| invalid(&e))
}

/// The longest topic name the client accepts.
const MAX_TOPIC_LEN: usize = 127;

/// The client's default largest body (`maxMessageSize`, 4 MiB).
const MAX_BODY_LEN: usize = 4 * 1024 * 1024;

/// Java's `String.hashCode()`: over UTF-16 code units, `h = 31 * h + c`, wrapping.
fn java_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)))
}

fn classify(message: &OutgoingMessage, e: ClientError) -> PublishError {
    let class = e.descriptor().class().as_str();
    // a producer not started or shut down is classed "validation" too (a lifecycle
    // error, or once shut down an invalid argument): it is the producer's state, not
    // the message (checked before sending), so a later attempt may succeed
    let code = e.descriptor().code().as_str();
    let lifecycle = code.contains(".lifecycle.") || code == "core.argument.invalid";
    let rejected = (!lifecycle
        && matches!(
            class,
            "validation" | "authentication" | "authorization" | "unsupported"
        ))
        || matches!(e.broker_response_code(), Some(13 | 16 | 17));
    let kind = if rejected {
        PublishErrorKind::Rejected
    } else {
        PublishErrorKind::Unavailable
    };
    PublishError::new(
        kind,
        format!(
            "sending {} to {:?}: {e} ({class})",
            message.id(),
            message.destination()
        ),
    )
    .with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_hash_is_javas_string_hash_code() {
        // computed apart from this crate (Python, over UTF-16 code units, as the Java
        // spec defines it); "polygenelubricants" is the known string whose hash is
        // Integer.MIN_VALUE, the one case where `abs` would overflow
        assert_eq!(java_hash(""), 0);
        assert_eq!(java_hash("a"), 97);
        assert_eq!(java_hash("customer-4"), -1_581_185_531);
        assert_eq!(java_hash("polygenelubricants"), i32::MIN);
        assert_eq!(java_hash("é€𝄞"), 16_751_501);
    }
}
