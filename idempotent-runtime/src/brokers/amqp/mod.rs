//! RabbitMQ (AMQP 0-9-1, through `lapin` 4): the dedup key of a delivery and the mapping
//! from a handler's outcome to `basic.ack`, `basic.nack` and `basic.reject`.
//!
//! # The key
//!
//! RabbitMQ delivers a message again when its consumer's channel or connection closes
//! before the message was acknowledged (a crash, a restart, a network cut, a lost ack), and
//! when a consumer nacks it with requeue; and a publisher that retries a publish whose
//! confirm it lost stores the message twice. Which id survives which:
//!
//! | id | same on redelivery | same on a publisher's resend |
//! | --- | --- | --- |
//! | a business header (`Order-Id`), set by the publisher | yes | yes |
//! | the `message_id` property, set by the publisher | yes | yes, if the publisher sets it again (a retry of the same publish does) |
//! | the delivery tag | **no**: it numbers deliveries on one channel | no |
//!
//! The `redelivered` flag only says "this message may have been processed before": it is
//! set on every redelivery, whether or not the work was done, and never on a publisher's
//! resend. That is why the store is asked. [`dedup_key`] takes the business header if the
//! message has it, else `message_id`; never the delivery tag.
//!
//! # The acknowledgement
//!
//! [`settle`] maps a handler's [`Disposition`] onto the channel:
//!
//! | handler returned | disposition | AMQP |
//! | --- | --- | --- |
//! | `Ok(_)`: first run, or a duplicate that replayed the cached output | `Ack` | `basic.ack` |
//! | `Error::InProgress` (another consumer works on it), a retryable error, a business error | `Retry { after }` | `basic.nack` with `requeue`, after waiting `after` (the message stays unacknowledged on this channel meanwhile) |
//! | `Error::AttemptsExhausted`, `MissingKey`, `FingerprintMismatch`, … | `DeadLetter` | `basic.reject` without `requeue`: the queue's dead-letter exchange (declare it with [`dead_letter_arguments`]) receives it; without one, RabbitMQ drops it |
//!
//! A requeued message goes back to the head of its queue. For long delays without holding
//! the message, publish it to a retry queue whose `x-message-ttl` dead-letters it back
//! into the work queue, and ack the original.
//!
//! Quorum queues count deliveries (`x-delivery-count`, see [`delivery_count`]) and, with
//! a delivery limit (`x-delivery-limit`; 20 by default since RabbitMQ 4.0), dead-letter or
//! drop a message that is requeued more often than that. Every `InProgress` nack counts
//! too: set the limit well above `max_attempts` plus the requeues you expect while another
//! consumer finishes.
//!
//! ```no_run
//! use idempotent_runtime::amqp::{self, lapin};
//! use idempotent_runtime::{Disposition, Error, idempotent};
//! use lapin::message::Delivery;
//!
//! #[idempotent(key = "amqp::dedup_key(delivery, \"Order-Id\")", store = "redis")]
//! async fn on_order_paid(delivery: &Delivery) -> Result<usize, Error> {
//!     Ok(delivery.data.len())
//! }
//!
//! # async fn run(delivery: Delivery) -> lapin::Result<()> {
//! let result = on_order_paid(&delivery).await;
//! amqp::settle(&delivery, Disposition::of(&result, amqp::delivery_count(&delivery))).await?;
//! # Ok(()) }
//! ```

use crate::disposition::Disposition;
use crate::key::{KeyBuilder, KeyPart};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// The `lapin` crate this module is written against.
pub use lapin;

mod publisher;
pub use publisher::{AmqpPublisher, ORDERING_KEY_HEADER};

/// The dedup key of a delivery; see [`dedup_key`].
///
/// A business header is one key part, its value; a `message_id` is two parts,
/// `("message_id", id)`, so the two can never collide. A message with neither is
/// [`Error::MissingKey`](crate::Error::MissingKey).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DedupKey<'a> {
    /// The value of the business header.
    Header(&'a [u8]),
    /// The `message_id` property.
    MessageId(&'a str),
    /// Neither is set.
    Missing,
}

impl KeyPart for DedupKey<'_> {
    fn write_key(&self, key: &mut KeyBuilder) {
        match self {
            DedupKey::Header(v) => key.push(v),
            DedupKey::MessageId(id) => {
                key.push(b"message_id");
                key.push(id.as_bytes());
            }
            DedupKey::Missing => key.missing(),
        }
    }
}

/// The value of a header as bytes, when it is a string or a byte array and not empty.
pub fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a [u8]> {
    let value = delivery.properties.headers().as_ref()?.inner().get(name)?;
    let bytes = match value {
        AMQPValue::LongString(s) => s.as_bytes(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        AMQPValue::ByteArray(b) => b.as_slice(),
        _ => return None,
    };
    (!bytes.is_empty()).then_some(bytes)
}

/// The `message_id` property, if set and not empty.
pub fn message_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(ShortString::as_str)
        .filter(|id| !id.is_empty())
}

/// The dedup key of a delivery: the business header `header_name` (a string or byte array
/// header), else the `message_id` property; never the delivery tag.
pub fn dedup_key<'a>(delivery: &'a Delivery, header_name: &str) -> DedupKey<'a> {
    if let Some(v) = header(delivery, header_name) {
        DedupKey::Header(v)
    } else if let Some(id) = message_id(delivery) {
        DedupKey::MessageId(id)
    } else {
        DedupKey::Missing
    }
}

/// Which delivery of the message this is, 1 for the first: from the quorum queue's
/// `x-delivery-count` header (the count of earlier deliveries) when present, else 2 when
/// the `redelivered` flag is set (a classic queue does not count) and 1 otherwise.
pub fn delivery_count(delivery: &Delivery) -> u32 {
    let earlier = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
            _ => None,
        });
    match earlier {
        Some(n) => n.saturating_add(1),
        None if delivery.redelivered => 2,
        None => 1,
    }
}

/// Queue arguments that send the queue's rejected messages to `exchange` (with
/// `routing_key`, or their own routing key when `None`): pass them to `queue_declare`.
pub fn dead_letter_arguments(exchange: &str, routing_key: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(exchange.into()),
    );
    if let Some(rk) = routing_key {
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(rk.into()),
        );
    }
    args
}

/// What [`settle`] told the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Settled {
    /// `basic.ack`.
    Acked,
    /// `basic.nack` with `requeue`.
    Requeued,
    /// `basic.reject` without `requeue`: to the dead-letter exchange.
    Rejected,
    /// Nothing could be sent: the channel is closed (the broker requeues the message and
    /// delivers it again) or the delivery was settled already.
    ChannelClosed,
}

/// Acknowledges, requeues (after the retry delay) or rejects a delivery according to
/// its [`Disposition`]; see the [module docs](self).
pub async fn settle(delivery: &Delivery, disposition: Disposition) -> lapin::Result<Settled> {
    let (sent, settled) = match disposition {
        Disposition::Ack => (
            delivery.ack(BasicAckOptions::default()).await?,
            Settled::Acked,
        ),
        Disposition::Retry { after } => {
            tokio::time::sleep(after).await;
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            (delivery.nack(requeue).await?, Settled::Requeued)
        }
        Disposition::DeadLetter => (
            delivery
                .reject(BasicRejectOptions { requeue: false })
                .await?,
            Settled::Rejected,
        ),
    };
    Ok(if sent {
        settled
    } else {
        Settled::ChannelClosed
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::key::RecordKey;
    use lapin::BasicProperties;

    fn delivery(headers: &[(&str, AMQPValue)], id: Option<&str>, redelivered: bool) -> Delivery {
        let mut d = Delivery::mock(7, "".into(), "q".into(), redelivered, b"x".to_vec());
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), v.clone());
        }
        let mut props = BasicProperties::default().with_headers(table);
        if let Some(id) = id {
            props = props.with_message_id(id.into());
        }
        d.properties = props;
        d
    }

    fn enc(k: DedupKey<'_>) -> Result<Vec<u8>, Error> {
        RecordKey::new("s", &k).map(|r| r.key().to_vec())
    }

    #[test]
    fn business_header_first_then_message_id_never_the_delivery_tag() {
        let both = delivery(
            &[("Order-Id", AMQPValue::LongString("o-1".into()))],
            Some("m-1"),
            false,
        );
        assert_eq!(dedup_key(&both, "Order-Id"), DedupKey::Header(b"o-1"));
        assert_eq!(enc(dedup_key(&both, "Order-Id")).unwrap(), b"o-1");

        let id_only = delivery(&[], Some("m-1"), false);
        assert_eq!(dedup_key(&id_only, "Order-Id"), DedupKey::MessageId("m-1"));
        assert_ne!(
            enc(dedup_key(&id_only, "Order-Id")).unwrap(),
            enc(DedupKey::Header(b"m-1")).unwrap()
        );

        let numeric = delivery(&[("Order-Id", AMQPValue::LongInt(5))], None, false);
        assert_eq!(dedup_key(&numeric, "Order-Id"), DedupKey::Missing);
        assert!(matches!(
            enc(dedup_key(&numeric, "Order-Id")),
            Err(Error::MissingKey)
        ));
    }

    #[test]
    fn delivery_count_from_the_quorum_header_or_the_redelivered_flag() {
        assert_eq!(delivery_count(&delivery(&[], None, false)), 1);
        assert_eq!(delivery_count(&delivery(&[], None, true)), 2);
        let quorum = delivery(
            &[("x-delivery-count", AMQPValue::LongLongInt(4))],
            None,
            true,
        );
        assert_eq!(delivery_count(&quorum), 5);
    }
}
