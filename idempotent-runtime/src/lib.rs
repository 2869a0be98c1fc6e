#![doc = include_str!("../README.md")]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

mod brokers;
mod clock;
mod disposition;
mod error;
mod fingerprint;
mod inline;
mod key;
mod manual;
pub mod outbox;
mod output;
mod protocol;
mod registry;
mod scope;
pub mod store;
mod stores;

cfg_testing! {
    pub mod testing;
}

cfg_tower! {
    pub mod http;
}

#[doc(hidden)]
pub mod __private;

pub use stores::memory;

cfg_rocketmq! {
    pub use brokers::rocketmq;
}

cfg_kafka! {
    pub use brokers::kafka;
}

cfg_amqp! {
    pub use brokers::amqp;
}

cfg_redis_streams! {
    pub use brokers::redis_streams;
}

cfg_redis! {
    /// The `redis` driver this crate's [`RedisStore`] uses.
    pub use redis;
    pub use stores::redis::{RedisStore, ReplicaAck};
}

cfg_sql! {
    /// The `sqlx` driver this crate's SQL stores use.
    pub use sqlx;
    pub use stores::sql::DEFAULT_TABLE;
}

cfg_mysql! {
    pub use stores::sql::{MySqlOutbox, MySqlStore};
}

cfg_postgres! {
    pub use stores::sql::{PostgresOutbox, PostgresStore};
}

cfg_sqlite! {
    pub use stores::sql::{SqliteOutbox, SqliteStore};
}

pub use disposition::{AsIdempotencyError, Disposition, RetryPolicy};
pub use error::{Error, NotReplayable, StoreError, StoreErrorKind};
pub use fingerprint::fingerprint;
pub use idempotent_macros::idempotent;
pub use key::{KeyBuilder, KeyPart, MAX_KEY_BYTES, MAX_SCOPE_BYTES, RecordKey};
pub use manual::Idempotency;
#[doc(no_inline)]
pub use memory::MemoryStore;
pub use protocol::{
    Claim, DEFAULT_MAX_OUTPUT_BYTES, MAX_TTL, MIN_LEASE, OnInProgress, OnStoreError, Outcome,
    Settings, current_claim, observe, set_max_output_bytes,
};
pub use registry::{register_store, registered_store};
pub use store::{Store, Token};
