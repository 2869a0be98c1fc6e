//! NATS JetStream (through `async-nats` 0.51): the outbox's publisher,
//! [`JetStreamPublisher`], which carries each outgoing message's id in the
//! `Nats-Msg-Id` header ([`MESSAGE_ID_HEADER`]); a consumer downstream keys its
//! `#[idempotent]` handler by that header.

mod publisher;

pub use publisher::{JetStreamPublisher, MESSAGE_ID_HEADER, ORDERING_KEY_HEADER};

/// The `async-nats` crate this module is written against.
pub use async_nats;
