#![doc = include_str!("../README.md")]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
mod disposition;
mod error;
mod fingerprint;
mod inline;
mod key;
mod manual;
pub mod memory;
mod output;
mod protocol;
mod registry;
mod scan;
mod scope;
pub mod store;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "rocketmq")]
pub mod rocketmq;

#[cfg(feature = "kafka")]
pub mod kafka;

#[cfg(feature = "amqp")]
pub mod amqp;

#[cfg(feature = "tower")]
pub mod http;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;

#[cfg(feature = "redis")]
mod redis_store;
/// The `redis` driver this crate's [`RedisStore`] uses.
#[cfg(feature = "redis")]
pub use redis;
#[cfg(feature = "redis")]
pub use redis_store::*;

#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
pub use sql::*;
/// The `sqlx` driver this crate's SQL stores use.
#[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
pub use sqlx;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use disposition::{AsIdempotencyError, Disposition, RetryPolicy};
pub use error::{Error, NotReplayable, StoreError, StoreErrorKind};
pub use fingerprint::fingerprint;
pub use idempotent_macros::idempotent;
pub use key::{KeyBuilder, KeyPart, MAX_KEY_BYTES, MAX_SCOPE_BYTES, RecordKey};
pub use manual::Idempotency;
pub use memory::MemoryStore;
pub use protocol::{
    Claim, DEFAULT_MAX_OUTPUT_BYTES, MAX_TTL, MIN_LEASE, OnInProgress, OnStoreError, Outcome,
    Settings, current_claim, observe, set_max_output_bytes,
};
pub use registry::{register_store, registered_store};
pub use store::{Store, Token};

// Paths the stores use inside the crate; public under `store`.
#[allow(unused_imports)]
pub(crate) use scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage, ScopeStats};
