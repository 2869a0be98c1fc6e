//! The transactional outbox: messages a transactional handler emits are written in its
//! transaction, then published with ids that stay the same when the handler runs again.
//!
//! A consumer that also publishes (an `OrderPaid` handler that emits `ChargeCard`)
//! loses the message if it publishes after its commit and crashes in between, sends a
//! message for work that never happened if it publishes before and rolls back, and
//! sends a message with a new id if it runs again. With an outbox, the handler emits
//! into an [`Outbox`]; the messages are written in the same transaction as its business
//! writes and its dedup row, published after the commit, and each carries an id derived
//! from the incoming message's key ([`message_id`]), in the broker's own dedup field
//! ([`Publisher`]). A consumer downstream whose key is that id processes each effect
//! once.
//!
//! The pieces:
//!
//! - [`Outbox`], [`OutgoingMessage`]: what a handler emits, with stable ids;
//! - [`message_id`], [`Emission`], [`NAMESPACE`]: the id derivation (UUIDv5), for
//!   other services that compute the ids;
//! - [`Publisher`], [`PublishError`], [`MemoryPublisher`]: where messages go;
//! - [`OutboxTransaction`]: the transactions the messages are written in;
//! - [`OutboxStore`] and its rows: the outbox table as the relay and the operator use
//!   it (`PostgresOutbox`, `MySqlOutbox`, `SqliteOutbox` with the SQL features, made
//!   with `PostgresStore::outbox` and the like);
//! - [`Relay`]: publishes the table's rows, and [`Relay::dispatch`], the fast path
//!   right after a commit.

pub(crate) mod id;
pub(crate) mod message;
pub(crate) mod publisher;
pub(crate) mod relay;
pub(crate) mod store;
pub(crate) mod tx;

pub use id::{Emission, NAMESPACE, message_id};
pub use message::{Emitted, Outbox, OutgoingMessage};
pub use publisher::{MemoryPublisher, PublishError, PublishErrorKind, Publisher};
pub use relay::{Relay, RelayHandle, RelayPass};
pub use store::{
    ClaimedRow, DestinationStats, OutboxPage, OutboxRow, OutboxStats, OutboxStore, Retry, RowLease,
    RowStatus,
};
pub use tx::{DEFAULT_OUTBOX_TABLE, OutboxTransaction};
/// The id type of outgoing messages (the `uuid` crate's).
pub use uuid::Uuid;
