//! [`KafkaPublisher`]: outgoing messages produced with the id in the `message-id`
//! header and the ordering key as the record key, confirmed by the delivery report.

use crate::outbox::{OutgoingMessage, PublishError, PublishErrorKind, Publisher};
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::fmt;
use std::time::Duration;

/// The header that carries [`OutgoingMessage::id`]; a consumer reads it with
/// `kafka::dedup_key(msg, MESSAGE_ID_HEADER)`.
pub const MESSAGE_ID_HEADER: &str = "message-id";

/// Produces outgoing messages to Kafka: the message's destination is the topic, its id
/// the `message-id` header (first, then the message's own headers, in order, a name may
/// repeat), its ordering key the record key (so all the messages of one key go to one
/// partition, in order), its payload the record value, unchanged. A message without an
/// ordering key has no record key (the producer's partitioner spreads them).
///
/// # The confirmation
///
/// [`publish`](Publisher::publish) returns once the delivery report says the record is
/// written, with the acknowledgements the producer's `acks` asks for (`all` when the
/// idempotent producer is on). The producer's `message.timeout.ms` bounds the wait for
/// the report (librdkafka retries within it); [`queue_timeout`](Self::queue_timeout)
/// bounds the wait for room in the producer's queue.
///
/// # The dedup
///
/// Kafka has no dedup by a field of the message. The idempotent producer
/// (`enable.idempotence=true`, set by [`from_config`](Self::from_config)) removes the
/// duplicates of librdkafka's own retries within one producer session; a message the
/// relay publishes again (after a crash, or because a delivery report was lost) is a new
/// record with the same `message-id` header, which a consumer keyed with
/// `kafka::dedup_key(msg, MESSAGE_ID_HEADER)` answers from its store.
///
/// # Errors
///
/// | what happened | [`PublishErrorKind`] |
/// | --- | --- |
/// | the record is too large (`message.max.bytes`, the topic's `max.message.bytes`), the topic is unknown or invalid, not authorised, the record invalid, a header named `message-id` | `Rejected` |
/// | no delivery report in time, the brokers down or unreachable, the queue full, any other error (retrying is safe: the id stays the same) | `Unavailable` |
///
/// ```no_run
/// use idempotent_runtime::kafka::KafkaPublisher;
/// use idempotent_runtime::kafka::rdkafka::config::ClientConfig;
/// use idempotent_runtime::outbox::{OutgoingMessage, Publisher, Uuid};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = ClientConfig::new();
/// config.set("bootstrap.servers", "127.0.0.1:9092");
/// // the idempotent producer is switched on here
/// let publisher = KafkaPublisher::from_config(&config)?;
/// let message = OutgoingMessage::new(Uuid::from_u128(7), "payments", b"o-17".to_vec())
///     .with_header("content-type", "text/plain")
///     .with_ordering_key("customer-4");
/// publisher.publish(&message).await?;
/// # Ok(())
/// # }
/// ```
pub struct KafkaPublisher {
    producer: FutureProducer,
    queue_timeout: Duration,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("queue_timeout", &self.queue_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher on this producer, as it is configured: switch the idempotent producer
    /// on yourself (`enable.idempotence=true`), or use [`from_config`](Self::from_config).
    pub fn new(producer: FutureProducer) -> Self {
        KafkaPublisher {
            producer,
            queue_timeout: Duration::from_secs(5),
        }
    }

    /// A publisher on a new producer made from `config` with `enable.idempotence=true`
    /// (which also sets `acks=all` and keeps the order within a partition across
    /// retries). An `enable.idempotence` already set to `false` in `config` is an error
    /// ([`KafkaError::ClientConfig`]), as are the errors of creating the producer.
    pub fn from_config(config: &ClientConfig) -> KafkaResult<Self> {
        if config
            .get("enable.idempotence")
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
        {
            return Err(KafkaError::ClientConfig(
                rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                "the outbox's producer needs the idempotent producer; \
                 enable.idempotence=false was set"
                    .to_owned(),
                "enable.idempotence".to_owned(),
                "false".to_owned(),
            ));
        }
        let mut config = config.clone();
        config.set("enable.idempotence", "true");
        Ok(Self::new(config.create()?))
    }

    /// How long [`publish`](Publisher::publish) waits for room in the producer's queue
    /// when it is full (5 s by default); past it the message is `Unavailable`.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// The producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        if message.destination().is_empty() {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                "the message has an empty destination (a Kafka topic)",
            ));
        }
        let id = message.id().to_string();
        let mut headers =
            OwnedHeaders::new_with_capacity(message.headers().len() + 1).insert(Header {
                key: MESSAGE_ID_HEADER,
                value: Some(id.as_str()),
            });
        for (name, value) in message.headers() {
            if name.eq_ignore_ascii_case(MESSAGE_ID_HEADER) {
                return Err(PublishError::new(
                    PublishErrorKind::Rejected,
                    format!("the header {name:?} is reserved: the publisher sets it"),
                ));
            }
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_str()),
            });
        }
        let mut record = FutureRecord::<str, [u8]>::to(message.destination())
            .payload(message.payload())
            .headers(headers);
        if let Some(key) = message.ordering_key() {
            record = record.key(key);
        }
        match self.producer.send(record, self.queue_timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(classify(message, e)),
        }
    }
}

fn classify(message: &OutgoingMessage, e: KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    let kind = match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidMessage
            | C::BadMessage
            | C::InvalidRecord
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::PolicyViolation
            | C::InvalidArgument,
        ) => PublishErrorKind::Rejected,
        _ => PublishErrorKind::Unavailable,
    };
    PublishError::new(
        kind,
        format!(
            "producing {} to {:?}: {e}",
            message.id(),
            message.destination()
        ),
    )
    .with_source(e)
}
