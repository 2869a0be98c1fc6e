//! [`AmqpPublisher`]: outgoing messages published to RabbitMQ with the id in the
//! `message_id` property, mandatory, and confirmed by publisher confirms.

use crate::outbox::{OutgoingMessage, PublishError, PublishErrorKind, Publisher};
use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// The header that carries [`OutgoingMessage::ordering_key`].
pub const ORDERING_KEY_HEADER: &str = "ordering-key";

/// Publishes outgoing messages to RabbitMQ: the message's id is the `message_id`
/// property, its ordering key the `ordering-key` header, its headers the message's
/// headers table (as long strings; a name that repeats holds an array of its values, in
/// order), its payload the body, unchanged; messages are persistent (delivery mode 2).
///
/// Where a message goes: by default, to the queue its destination names (through the
/// default exchange, the destination as the routing key); with
/// [`exchange`](Self::exchange), to that exchange with the destination as the routing
/// key.
///
/// # The confirmation
///
/// The publisher publishes on a channel of its own, in confirm mode, with the
/// `mandatory` flag: [`publish`](Publisher::publish) returns once the broker confirmed
/// the message (`basic.ack`), which for a persistent message on a durable queue means it
/// is written to disk, and fails when the broker could not route it to any queue
/// (returned, `Rejected`: without `mandatory` RabbitMQ confirms an unroutable message
/// and drops it) or refused it (`basic.nack`, `Unavailable`: a full queue with
/// `x-overflow=reject-publish`, an internal error). [`confirm_timeout`](Self::confirm_timeout)
/// bounds the wait. A channel the broker closes (a missing exchange closes it) is
/// replaced by a new one on the next publish.
///
/// # The dedup
///
/// RabbitMQ does not deduplicate by `message_id`: a message the relay publishes again
/// is enqueued again, with the same `message_id`, and a consumer keyed by it
/// (`amqp::dedup_key`, `amqp::message_id`) answers it from its store.
///
/// # Errors
///
/// | what happened | [`PublishErrorKind`] |
/// | --- | --- |
/// | no such exchange, no queue the message routes to, access refused, the message too large (`max_message_size`), a precondition failed, a destination or header name over 255 bytes, a header named `ordering-key` | `Rejected` |
/// | no confirm in time, a `basic.nack`, the connection lost or closed, the channel could not be opened, any other error | `Unavailable` |
///
/// ```no_run
/// use idempotent_runtime::amqp::AmqpPublisher;
/// use idempotent_runtime::amqp::lapin::{Connection, ConnectionProperties};
/// use idempotent_runtime::outbox::{OutgoingMessage, Publisher, Uuid};
/// use std::sync::Arc;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let connection = Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
/// let publisher = AmqpPublisher::new(Arc::new(connection));
/// // to the queue "payments"
/// let message = OutgoingMessage::new(Uuid::from_u128(7), "payments", b"o-17".to_vec())
///     .with_header("content-type", "text/plain")
///     .with_ordering_key("customer-4");
/// publisher.publish(&message).await?;
/// # Ok(())
/// # }
/// ```
pub struct AmqpPublisher {
    connection: Arc<Connection>,
    exchange: ShortString,
    confirm_timeout: Duration,
    channel: Mutex<Option<Channel>>,
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("exchange", &self.exchange.as_str())
            .field("confirm_timeout", &self.confirm_timeout)
            .finish_non_exhaustive()
    }
}

impl AmqpPublisher {
    /// A publisher on this connection, to the queues the destinations name (the default
    /// exchange), waiting up to 30 s for each confirm. Its channel is opened on the first
    /// publish.
    pub fn new(connection: Arc<Connection>) -> Self {
        AmqpPublisher {
            connection,
            exchange: ShortString::default(),
            confirm_timeout: Duration::from_secs(30),
            channel: Mutex::new(None),
        }
    }

    /// Publishes to `exchange`, with each message's destination as the routing key.
    ///
    /// # Errors
    /// A name over 255 bytes (AMQP's limit), `Rejected`.
    pub fn exchange(mut self, exchange: &str) -> Result<Self, PublishError> {
        self.exchange = short(exchange, "exchange name")?;
        Ok(self)
    }

    /// How long [`publish`](Publisher::publish) waits for the broker's confirm (30 s by
    /// default); past it the message is `Unavailable`.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The channel to publish on: the open one, or a new one in confirm mode.
    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *slot = None;
        let ch = self.connection.create_channel().await.map_err(|e| {
            PublishError::new(
                PublishErrorKind::Unavailable,
                format!("opening a channel: {e}"),
            )
            .with_source(e)
        })?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| {
                PublishError::new(
                    PublishErrorKind::Unavailable,
                    format!("switching the channel to confirm mode: {e}"),
                )
                .with_source(e)
            })?;
        *slot = Some(ch.clone());
        Ok(ch)
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        if message.destination().is_empty() && self.exchange.as_str().is_empty() {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                "the message has an empty destination (a queue, as no exchange is set)",
            ));
        }
        let routing_key = short(message.destination(), "destination (routing key)")?;
        let properties = BasicProperties::default()
            .with_message_id(message.id().to_string().into())
            .with_delivery_mode(2)
            .with_headers(headers(message)?);
        let channel = self.channel().await?;
        let confirm = channel
            .basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                message.payload(),
                properties,
            )
            .await
            .map_err(|e| classify(message, e))?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| {
                PublishError::new(
                    PublishErrorKind::Unavailable,
                    format!(
                        "publishing {} to {:?}: no confirm within {:?}",
                        message.id(),
                        message.destination(),
                        self.confirm_timeout
                    ),
                )
            })?
            .map_err(|e| classify(message, e))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::new(
                PublishErrorKind::Rejected,
                format!(
                    "publishing {} to {:?}: returned unroutable ({} {}): no queue is bound for it",
                    message.id(),
                    message.destination(),
                    returned.reply_code,
                    returned.reply_text
                ),
            )),
            Confirmation::Nack(_) => Err(PublishError::new(
                PublishErrorKind::Unavailable,
                format!(
                    "publishing {} to {:?}: the broker refused it (basic.nack)",
                    message.id(),
                    message.destination()
                ),
            )),
            Confirmation::NotRequested => Err(PublishError::new(
                PublishErrorKind::Unavailable,
                "the channel is not in confirm mode",
            )),
        }
    }
}

fn short(s: &str, what: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(s.to_owned()).map_err(|e| {
        PublishError::new(
            PublishErrorKind::Rejected,
            format!("the {what} {s:?} is too long for AMQP: {e}"),
        )
    })
}

/// The headers table of `message`: its ordering key and its own headers.
fn headers(message: &OutgoingMessage) -> Result<FieldTable, PublishError> {
    let mut values: Vec<(&str, Vec<&str>)> = Vec::new();
    if let Some(key) = message.ordering_key() {
        values.push((ORDERING_KEY_HEADER, vec![key]));
    }
    for (name, value) in message.headers() {
        if name.eq_ignore_ascii_case(ORDERING_KEY_HEADER) {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                format!("the header {name:?} is reserved: the publisher sets it"),
            ));
        }
        match values.iter_mut().find(|(n, _)| n == name) {
            Some((_, vs)) => vs.push(value),
            None => values.push((name, vec![value])),
        }
    }
    let mut table = FieldTable::default();
    for (name, vs) in values {
        let value = match vs.as_slice() {
            [one] => AMQPValue::LongString(LongString::from(*one)),
            many => AMQPValue::FieldArray(FieldArray::from(
                many.iter()
                    .map(|v| AMQPValue::LongString(LongString::from(*v)))
                    .collect::<Vec<_>>(),
            )),
        };
        table.insert(short(name, "header name")?, value);
    }
    Ok(table)
}

fn classify(message: &OutgoingMessage, e: lapin::Error) -> PublishError {
    let kind = match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::NOTFOUND
                | AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::CONTENTTOOLARGE
                | AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::NOROUTE,
            ) => PublishErrorKind::Rejected,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => PublishErrorKind::Rejected,
            _ => PublishErrorKind::Unavailable,
        },
        _ => PublishErrorKind::Unavailable,
    };
    PublishError::new(
        kind,
        format!(
            "publishing {} to {:?}: {e}",
            message.id(),
            message.destination()
        ),
    )
    .with_source(e)
}
