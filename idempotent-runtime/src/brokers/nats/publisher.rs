//! [`JetStreamPublisher`]: outgoing messages published to JetStream with the id in
//! `Nats-Msg-Id`, confirmed by the stream's publish ack.

use crate::outbox::{OutgoingMessage, PublishError, PublishErrorKind, Publisher};
use async_nats::jetstream::context::PublishErrorKind as NatsErrorKind;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use std::fmt;
use std::str::FromStr;

/// The header that carries [`OutgoingMessage::id`]: JetStream's own dedup header.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// The header that carries [`OutgoingMessage::ordering_key`].
pub const ORDERING_KEY_HEADER: &str = "Idempotent-Ordering-Key";

/// Publishes outgoing messages to NATS JetStream: the message's destination is the
/// subject (a stream must capture it), its id is the `Nats-Msg-Id` header, its ordering
/// key the `Idempotent-Ordering-Key` header, its headers are NATS headers (in order, a
/// name may repeat) and its payload is the message body, unchanged.
///
/// # The confirmation
///
/// [`publish`](Publisher::publish) returns once the stream has stored the message and
/// sent its publish ack (the JetStream context's timeout bounds the wait: 5 s unless
/// the context was built with another, see `async_nats::jetstream::ContextBuilder`).
///
/// # The dedup
///
/// A stream drops a message whose `Nats-Msg-Id` it has already seen within its
/// duplicate window (`duplicate_window`, 2 minutes by default) and acks it as a
/// duplicate ([`PublishAck::duplicate`]): a relay that publishes a message again after a
/// crash stores it once. A repeat that comes after the window (a relay down for longer)
/// is stored again, with the same `Nats-Msg-Id`; a consumer keyed by that header
/// (`#[idempotent(key = …)]`) answers it from its store. Widen the window on the stream
/// to cover the longest outage the relay should absorb.
///
/// # Errors
///
/// | what happened | [`PublishErrorKind`] |
/// | --- | --- |
/// | no stream captures the subject (no responders), the message is larger than the server's `max_payload` or the stream's `max_msg_size`, an invalid subject or header, a header named `Nats-Msg-Id` or `Idempotent-Ordering-Key`, another refusal the stream answers with a 4xx code | `Rejected` |
/// | no ack in time, the connection lost, too many acks pending, the stream answering with a 5xx code (JetStream temporarily unavailable, its store failed) | `Unavailable` |
///
/// ```no_run
/// use idempotent_runtime::nats::JetStreamPublisher;
/// use idempotent_runtime::nats::async_nats;
/// use idempotent_runtime::outbox::{OutgoingMessage, Publisher, Uuid};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let publisher = JetStreamPublisher::new(async_nats::jetstream::new(client));
/// let message = OutgoingMessage::new(Uuid::from_u128(7), "payments.charge", b"o-17".to_vec())
///     .with_header("content-type", "text/plain")
///     .with_ordering_key("customer-4");
/// publisher.publish(&message).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct JetStreamPublisher {
    context: Context,
}

impl fmt::Debug for JetStreamPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamPublisher").finish_non_exhaustive()
    }
}

impl JetStreamPublisher {
    /// A publisher on this JetStream context (its timeout bounds the wait for each ack).
    pub fn new(context: Context) -> Self {
        JetStreamPublisher { context }
    }

    /// The JetStream context.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Publishes `message` as [`publish`](Publisher::publish) does and returns the
    /// stream's ack: its stream, its sequence, and whether the stream recognised the
    /// message as a duplicate and dropped it.
    pub async fn publish_acked(
        &self,
        message: &OutgoingMessage,
    ) -> Result<PublishAck, PublishError> {
        if message.destination().is_empty() {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                "the message has an empty destination (a NATS subject)",
            ));
        }
        let headers = headers(message)?;
        let ack = self
            .context
            .publish_with_headers(
                message.destination().to_owned(),
                headers,
                message.payload().to_vec().into(),
            )
            .await
            .map_err(|e| classify(message, e))?;
        ack.await.map_err(|e| classify(message, e))
    }
}

#[async_trait]
impl Publisher for JetStreamPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        self.publish_acked(message).await.map(drop)
    }
}

/// The NATS headers of `message`: its id, its ordering key, then its own headers.
fn headers(message: &OutgoingMessage) -> Result<HeaderMap, PublishError> {
    let mut map = HeaderMap::new();
    map.insert(MESSAGE_ID_HEADER, message.id().to_string().as_str());
    if let Some(key) = message.ordering_key() {
        map.insert(ORDERING_KEY_HEADER, value(ORDERING_KEY_HEADER, key)?);
    }
    for (name, v) in message.headers() {
        if [MESSAGE_ID_HEADER, ORDERING_KEY_HEADER]
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name))
        {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                format!("the header {name:?} is reserved: the publisher sets it"),
            ));
        }
        let header = HeaderName::from_str(name).map_err(|_| {
            PublishError::new(
                PublishErrorKind::Rejected,
                format!(
                    "{name:?} is not a valid NATS header name (printable ASCII, no ':', not empty)"
                ),
            )
        })?;
        map.append(header, value(name, v)?);
    }
    Ok(map)
}

fn value(name: &str, v: &str) -> Result<HeaderValue, PublishError> {
    HeaderValue::from_str(v).map_err(|_| {
        PublishError::new(
            PublishErrorKind::Rejected,
            format!(
                "the value of the header {name:?} is not a valid NATS header value (no CR or LF)"
            ),
        )
    })
}

fn classify(message: &OutgoingMessage, e: jetstream::context::PublishError) -> PublishError {
    let kind = match e.kind() {
        NatsErrorKind::StreamNotFound
        | NatsErrorKind::MaxPayloadExceeded
        | NatsErrorKind::WrongLastMessageId
        | NatsErrorKind::WrongLastSequence => PublishErrorKind::Rejected,
        NatsErrorKind::TimedOut | NatsErrorKind::BrokenPipe | NatsErrorKind::MaxAckPending => {
            PublishErrorKind::Unavailable
        }
        NatsErrorKind::Other => {
            let source = std::error::Error::source(&e);
            if let Some(api) = source.and_then(|s| s.downcast_ref::<jetstream::Error>()) {
                if api.code() >= 500 {
                    PublishErrorKind::Unavailable
                } else {
                    PublishErrorKind::Rejected
                }
            } else if source.is_some_and(|s| s.is::<async_nats::SubjectError>()) {
                PublishErrorKind::Rejected
            } else {
                PublishErrorKind::Unavailable
            }
        }
    };
    let detail = match std::error::Error::source(&e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    };
    PublishError::new(
        kind,
        format!(
            "publishing {} to {:?}: {detail}",
            message.id(),
            message.destination()
        ),
    )
    .with_source(e)
}
