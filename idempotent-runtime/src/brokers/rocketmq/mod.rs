//! Apache RocketMQ (the Rust client, `rocketmq-client-rust` 1.0): the dedup key of a
//! message and the mapping from a handler's outcome to a concurrent listener's status.
//!
//! # The key
//!
//! RocketMQ delivers a message again after a send retry, after a listener returned
//! `ReconsumeLater` (or failed, or its ack was lost), after a consumer crashed before its
//! offsets were committed, and during rebalances. Which id survives which case:
//!
//! | id | stays the same on redelivery | stays the same on a producer's resend |
//! | --- | --- | --- |
//! | the message `KEYS` (the producer's business key) | yes | yes, if the producer sets it again |
//! | the `UNIQ_KEY` property (the producer's `SendResult::msg_id`) | yes | no: a resend built as a new message gets a new one |
//! | `MessageExt::msg_id()` in this client (the offset id) | **no**: a retry is a new message in the retry topic, with a new offset id | no |
//!
//! So [`dedup_key`] takes the business key (the first of `KEYS`), else `UNIQ_KEY`, and
//! never the offset id. Producers should set a business key
//! (`Message::builder().keys(..)`): only it catches a resend.
//!
//! # The status
//!
//! [`consume_status`] maps what an `#[idempotent]` handler returned, through its
//! [`Disposition`], to `ConsumeConcurrentlyStatus`:
//!
//! | handler returned | status | why |
//! | --- | --- | --- |
//! | `Ok(_)`: first run, or a duplicate that replayed the cached output | `ConsumeSuccess` | the work is done: a duplicate must be acknowledged, or the broker redelivers it forever |
//! | `Error::InProgress` | `ReconsumeLater` | another consumer (often after a rebalance) is still working on it; the retry comes back after the delay level and then replays |
//! | a retryable `Error` (store unreachable; nothing ran) | `ReconsumeLater` | a later delivery may succeed |
//! | a business error (anything that is not an [`Error`](crate::Error)) | `ReconsumeLater` | retried; `max_attempts` bounds the retries |
//! | `Error::OutputNotReplayable` | `ConsumeSuccess` | the work was done; only its output is not cached |
//! | `Error::AttemptsExhausted`, `MissingKey`, `FingerprintMismatch`, … | the [`OnExhausted`] choice | no retry will help |
//!
//! # Bridging the listener to the async handler
//!
//! The push consumer calls `MessageListenerConcurrently::consume_message`, a synchronous
//! function, on a blocking worker thread of the client (with the consumer's
//! `consume_timeout`). Capture a `tokio::runtime::Handle` when the consumer starts and run
//! the handler with `handle.block_on(..)` inside the listener: the handler's future then
//! runs on the application's runtime (its timers, its Redis or SQL connections) while the
//! worker thread waits. Do not build a runtime per message (slow, and it strands the
//! store's connections), and do not call `Handle::current()` inside the listener (the
//! worker thread is not in a runtime context). See [`block_on_listener`].
//!
//! Size the listener pool explicitly: on small machines a burst can exhaust it, and
//! `consume_thread_min(1).consume_thread_max(4)` is a good start (`min` must not exceed
//! `max`, or the consumer fails to start).

use crate::disposition::Disposition;
use crate::key::{KeyBuilder, KeyPart};
use rocketmq_client_rust::ConsumeConcurrentlyStatus;

/// The `rocketmq-client-rust` crate this module is written against.
pub use rocketmq_client_rust as client;
/// The `rocketmq-model` crate (messages) this module is written against.
pub use rocketmq_model as model;

mod publisher;
pub use publisher::RocketMqPublisher;
use rocketmq_model::common::message::MessageConst;
use rocketmq_model::common::message::message_ext::MessageExt;
use std::future::Future;

/// The dedup key of a RocketMQ message; see [`dedup_key`].
///
/// A business key is one key part, the key itself (`order-17` is stored as
/// `order-17`); a `UNIQ_KEY` is two parts, `("UNIQ_KEY", id)`, so the two can never
/// collide. A message with neither is [`Error::MissingKey`](crate::Error::MissingKey).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DedupKey<'a> {
    /// The first of the message's `KEYS`.
    Business(&'a str),
    /// The `UNIQ_KEY` property set by the producer (its `SendResult::msg_id`).
    Unique(&'a str),
    /// Neither is set.
    Missing,
}

impl KeyPart for DedupKey<'_> {
    fn write_key(&self, key: &mut KeyBuilder) {
        match self {
            DedupKey::Business(k) => key.push(k.as_bytes()),
            DedupKey::Unique(u) => {
                key.push(MessageConst::PROPERTY_UNIQ_CLIENT_MESSAGE_ID_KEYIDX.as_bytes());
                key.push(u.as_bytes());
            }
            DedupKey::Missing => key.missing(),
        }
    }
}

/// The first key of the message's `KEYS` property (keys are separated by spaces), if any.
pub fn business_key(msg: &MessageExt) -> Option<&str> {
    msg.message_inner()
        .property(MessageConst::PROPERTY_KEYS)
        .and_then(|keys| {
            keys.split(MessageConst::KEY_SEPARATOR)
                .find(|k| !k.is_empty())
        })
}

/// The `UNIQ_KEY` property: the id the producer's client gave the message (its
/// `SendResult::msg_id`); the same on every redelivery of this message, new on a resend.
pub fn unique_key(msg: &MessageExt) -> Option<&str> {
    msg.message_inner()
        .property(MessageConst::PROPERTY_UNIQ_CLIENT_MESSAGE_ID_KEYIDX)
        .filter(|k| !k.is_empty())
}

/// The dedup key of a message: its business key (the first of `KEYS`), else its
/// `UNIQ_KEY`; never `MessageExt::msg_id()`, which changes when the message is retried.
///
/// ```
/// use idempotent_runtime::rocketmq::model::common::message::message_ext::MessageExt;
/// use idempotent_runtime::{Error, idempotent};
///
/// #[idempotent(key = "idempotent_runtime::rocketmq::dedup_key(msg)")]
/// async fn on_order_paid(msg: &MessageExt) -> Result<u64, Error> {
///     Ok(msg.body().map_or(0, |b| b.len() as u64))
/// }
/// ```
pub fn dedup_key(msg: &MessageExt) -> DedupKey<'_> {
    if let Some(k) = business_key(msg) {
        DedupKey::Business(k)
    } else if let Some(u) = unique_key(msg) {
        DedupKey::Unique(u)
    } else {
        DedupKey::Missing
    }
}

/// What to do with a message that no retry can help (attempts exhausted, no key,
/// fingerprint mismatch, unknown store).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnExhausted {
    /// `ReconsumeLater`: let the broker retry until the group's `maxReconsumeTimes`
    /// and then move the message to the group's `%DLQ%` topic. Each of those retries is
    /// answered at once from the store without running the handler.
    #[default]
    BrokerDeadLetter,
    /// `ConsumeSuccess`: drop the message (after the application recorded it elsewhere,
    /// e.g. in its own dead-letter table).
    Acknowledge,
}

/// The core trait that tells dedup outcomes from business failures, under the name this
/// module has always used for it.
pub use crate::disposition::AsIdempotencyError;

/// The listener status for a handler's result; see the [module docs](self).
///
/// The result's [`Disposition`] decides: [`Ack`](Disposition::Ack) is
/// `ConsumeSuccess`, [`Retry`](Disposition::Retry) is `ReconsumeLater` (the broker's
/// delay levels, not the disposition's delay, pace the retry), and
/// [`DeadLetter`](Disposition::DeadLetter) is the `on_exhausted` choice.
pub fn consume_status<T, E: AsIdempotencyError>(
    result: &Result<T, E>,
    on_exhausted: OnExhausted,
) -> ConsumeConcurrentlyStatus {
    match Disposition::of(result, 1) {
        Disposition::Ack => ConsumeConcurrentlyStatus::ConsumeSuccess,
        Disposition::Retry { .. } => ConsumeConcurrentlyStatus::ReconsumeLater,
        Disposition::DeadLetter => match on_exhausted {
            OnExhausted::BrokerDeadLetter => ConsumeConcurrentlyStatus::ReconsumeLater,
            OnExhausted::Acknowledge => ConsumeConcurrentlyStatus::ConsumeSuccess,
        },
    }
}

/// Runs an async handler from the push consumer's synchronous listener on the runtime
/// of `handle` (captured with `Handle::current()` when the consumer is set up), blocking
/// the client's worker thread until it finishes.
///
/// # Panics
///
/// When called from inside an async task (the listener runs on a blocking worker
/// thread, where this is allowed).
pub fn block_on_listener<F: Future>(handle: &tokio::runtime::Handle, handler: F) -> F::Output {
    handle.block_on(handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::key::RecordKey;
    use rocketmq_model::common::message::MessageTrait;
    use rocketmq_model::common::message::message_single::Message;
    use std::time::Duration;

    fn ext(keys: Option<&str>, uniq: Option<&str>) -> MessageExt {
        let mut b = Message::builder().topic("T").body_slice(b"x");
        if let Some(k) = keys {
            b = b.keys(k.split(' ').map(str::to_owned).collect());
        }
        let mut m = b.build_unchecked();
        if let Some(u) = uniq {
            m.put_property(
                MessageConst::PROPERTY_UNIQ_CLIENT_MESSAGE_ID_KEYIDX.into(),
                u.into(),
            );
        }
        let mut e = MessageExt::default();
        e.set_message_inner(m);
        e.set_msg_id("OFFSET-ID-1".into());
        e
    }

    fn enc(k: DedupKey<'_>) -> Result<Vec<u8>, Error> {
        RecordKey::new("s", &k).map(|r| r.key().to_vec())
    }

    #[test]
    fn business_key_first_then_uniq_key_never_the_offset_id() {
        let both = ext(Some("order-1 user-7"), Some("UNIQ-A"));
        assert_eq!(dedup_key(&both), DedupKey::Business("order-1"));
        assert_eq!(enc(dedup_key(&both)).unwrap(), b"order-1");

        let uniq_only = ext(None, Some("UNIQ-A"));
        assert_eq!(dedup_key(&uniq_only), DedupKey::Unique("UNIQ-A"));
        // two parts: cannot collide with a business key spelled like a uniq key
        assert_ne!(
            enc(dedup_key(&uniq_only)).unwrap(),
            enc(DedupKey::Business("UNIQ-A")).unwrap()
        );

        let neither = ext(None, None);
        assert_eq!(dedup_key(&neither), DedupKey::Missing);
        assert!(matches!(enc(dedup_key(&neither)), Err(Error::MissingKey)));
    }

    #[test]
    fn outcomes_map_to_statuses() {
        use ConsumeConcurrentlyStatus::{ConsumeSuccess, ReconsumeLater};
        let d = OnExhausted::default();
        assert_eq!(consume_status(&Ok::<(), Error>(()), d), ConsumeSuccess);
        let in_progress: Result<(), Error> = Err(Error::InProgress {
            retry_after: Duration::from_secs(1),
        });
        assert_eq!(consume_status(&in_progress, d), ReconsumeLater);
        let exhausted: Result<(), Error> = Err(Error::AttemptsExhausted { attempts: 3 });
        assert_eq!(
            consume_status(&exhausted, OnExhausted::BrokerDeadLetter),
            ReconsumeLater
        );
        assert_eq!(
            consume_status(&exhausted, OnExhausted::Acknowledge),
            ConsumeSuccess
        );

        #[derive(Debug)]
        enum App {
            Dedup(Error),
            Business,
        }
        impl AsIdempotencyError for App {
            fn idempotency_error(&self) -> Option<&Error> {
                match self {
                    App::Dedup(e) => Some(e),
                    App::Business => None,
                }
            }
        }
        assert_eq!(
            consume_status(&Err::<(), _>(App::Business), OnExhausted::Acknowledge),
            ReconsumeLater
        );
        assert_eq!(
            consume_status(
                &Err::<(), _>(App::Dedup(Error::MissingKey)),
                OnExhausted::Acknowledge
            ),
            ConsumeSuccess
        );
    }
}
