//! Where emitted messages go: the [`Publisher`] trait, its error, and
//! [`MemoryPublisher`] for tests.

use super::message::OutgoingMessage;
use async_trait::async_trait;
use std::collections::HashSet;
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use uuid::Uuid;

/// Publishes outgoing messages to a broker.
///
/// [`publish`](Self::publish) returns once the broker has confirmed the message (a
/// publisher confirm, a JetStream ack, a Kafka delivery report, an `XADD` reply):
/// only then does the relay mark the row sent. Each implementation puts
/// [`OutgoingMessage::id`] in the broker's own dedup field, so that a message
/// published twice (the relay crashed after the broker confirmed it, before the row
/// was marked sent) is recognised downstream:
///
/// | broker | publisher | id | ordering key | the broker drops a repeat |
/// | --- | --- | --- | --- | --- |
/// | NATS JetStream | `nats::JetStreamPublisher` | `Nats-Msg-Id` header | header `Idempotent-Ordering-Key` | yes, within the stream's duplicate window (2 min by default) |
/// | Kafka | `kafka::KafkaPublisher` | header `message-id` (idempotent producer on: `enable.idempotence=true`) | the record key | only the producer's own retries (idempotent producer) |
/// | RabbitMQ | `amqp::AmqpPublisher` | the `message_id` property, publisher confirms and `mandatory` on | header `ordering-key` | no |
/// | Redis Streams | `redis_streams::StreamPublisher` | field `message-id` of the entry, plus `XADD … IDMP` where the server has it (Redis 8.6+) | field `ordering-key` | with `IDMP`, within the stream's `IDMP-DURATION` / `IDMP-MAXSIZE` |
/// | RocketMQ | `rocketmq::RocketMqPublisher` | the message's `keys` | the sharding key, which selects the queue | no |
///
/// Where the broker does not drop a repeat, it arrives with the same id: the next
/// consumer's `#[idempotent]` key is that id, so the repeat is answered from its store.
#[async_trait]
pub trait Publisher: Send + Sync + fmt::Debug {
    /// Publishes `message` and waits for the broker's confirmation.
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError>;
}

/// Why a message was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The broker could not be reached, timed out or refused for now: the relay retries
    /// the message with backoff.
    Unavailable,
    /// The broker refused this message (no such destination, too large, not
    /// authorised): retrying the same message will not help; after the relay's attempt
    /// limit it is marked dead.
    Rejected,
}

/// A message that was not published, and why.
#[derive(Debug)]
pub struct PublishError {
    kind: PublishErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl PublishError {
    /// An error of `kind` with a message for the logs and the outbox row.
    pub fn new(kind: PublishErrorKind, message: impl Into<String>) -> Self {
        PublishError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// An [`Unavailable`](PublishErrorKind::Unavailable) error caused by `source`.
    pub fn unavailable(source: impl StdError + Send + Sync + 'static) -> Self {
        Self::new(PublishErrorKind::Unavailable, source.to_string()).with_source(source)
    }

    /// A [`Rejected`](PublishErrorKind::Rejected) error caused by `source`.
    pub fn rejected(source: impl StdError + Send + Sync + 'static) -> Self {
        Self::new(PublishErrorKind::Rejected, source.to_string()).with_source(source)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> PublishErrorKind {
        self.kind
    }

    /// Whether the same message may be published later.
    pub fn is_retryable(&self) -> bool {
        self.kind == PublishErrorKind::Unavailable
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            PublishErrorKind::Unavailable => "broker unavailable",
            PublishErrorKind::Rejected => "message rejected by the broker",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl StdError for PublishError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// An in-process [`Publisher`] for tests: it keeps what it was given, drops a repeat
/// of an id as a broker with dedup does, and fails on demand.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use idempotent_runtime::outbox::{MemoryPublisher, OutgoingMessage, Publisher, PublishErrorKind};
/// use idempotent_runtime::outbox::Uuid;
///
/// let broker = MemoryPublisher::new();
/// let m = OutgoingMessage::new(Uuid::from_u128(1), "payments", b"5".to_vec());
/// broker.publish(&m).await.unwrap();
/// broker.publish(&m).await.unwrap(); // a repeat: confirmed, dropped
/// assert_eq!(broker.published().len(), 1);
/// assert_eq!(broker.repeats(), 1);
///
/// broker.fail_next(1, PublishErrorKind::Unavailable);
/// assert!(broker.publish(&m).await.is_err());
/// # });
/// ```
#[derive(Debug, Default)]
pub struct MemoryPublisher {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    published: Vec<OutgoingMessage>,
    seen: HashSet<Uuid>,
    repeats: u64,
    fail: Option<(u64, PublishErrorKind)>,
}

impl MemoryPublisher {
    /// An empty publisher.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The distinct messages published, in the order they were first confirmed.
    pub fn published(&self) -> Vec<OutgoingMessage> {
        self.state().published.clone()
    }

    /// How many publishes repeated an id already published (and were dropped).
    pub fn repeats(&self) -> u64 {
        self.state().repeats
    }

    /// Makes the next `n` publishes fail with `kind`.
    pub fn fail_next(&self, n: u64, kind: PublishErrorKind) {
        self.state().fail = (n > 0).then_some((n, kind));
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        let mut state = self.state();
        if let Some((n, kind)) = state.fail {
            state.fail = (n > 1).then_some((n - 1, kind));
            return Err(PublishError::new(
                kind,
                "failure injected by MemoryPublisher::fail_next",
            ));
        }
        if state.seen.insert(message.id()) {
            state.published.push(message.clone());
        } else {
            state.repeats += 1;
        }
        Ok(())
    }
}
