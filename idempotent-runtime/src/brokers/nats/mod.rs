//! NATS JetStream (through `async-nats` 0.51): the outbox's publisher,
//! [`JetStreamPublisher`].
//!
//! The consumer side of NATS needs no module of its own: a JetStream message's
//! `Nats-Msg-Id` header (or a business header) is the `#[idempotent]` key, and the
//! handler's outcome maps onto `ack` / `nak` / `term` directly.

mod publisher;

pub use publisher::{JetStreamPublisher, MESSAGE_ID_HEADER, ORDERING_KEY_HEADER};

/// The `async-nats` crate this module is written against.
pub use async_nats;
