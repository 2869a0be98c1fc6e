//! The error type the protocol returns and the error type stores return.

use std::fmt;
use std::time::Duration;

/// Why an idempotent handler did not run (or did not return its own result).
///
/// The handler's error type must implement `From<Error>`; every outcome in the
/// table below reaches the caller through that conversion.
///
/// | variant | what happened | what a consumer should do |
/// | --- | --- | --- |
/// | [`InProgress`](Error::InProgress) | another consumer holds the claim | retry later (nack with delay) |
/// | [`AttemptsExhausted`](Error::AttemptsExhausted) | `max_attempts` failed attempts | dead-letter |
/// | [`MissingKey`](Error::MissingKey) | the key expression gave `None` or an empty value | dead-letter, fix the producer |
/// | [`FingerprintMismatch`](Error::FingerprintMismatch) | same key, different payload | alert |
/// | [`Store`](Error::Store) | the store failed or is unreachable | nack |
/// | [`UnknownStore`](Error::UnknownStore) | `store = "name"` was never registered | fix start-up |
/// | [`OutputNotReplayable`](Error::OutputNotReplayable) | duplicate of a completed key whose output cannot be replayed | ack or alert |
/// | [`InvalidSettings`](Error::InvalidSettings) | the manual API was configured with settings the protocol refuses, or two handlers of the process have one default scope | fix the code |
/// | [`InvalidEmission`](Error::InvalidEmission) | a transactional handler's outbox messages cannot be written | roll back, fix the code |
///
/// [`is_retryable`](Error::is_retryable) tells the first and the transient store
/// failures apart from the rest.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Another execution holds the claim on this key; its lease ends in `retry_after`
    /// at the latest (by the store's clock).
    InProgress {
        /// Time left on the holder's lease when the store answered.
        retry_after: Duration,
    },
    /// The key failed `attempts` times, reaching the handler's `max_attempts`;
    /// it is poisoned until its record expires. Route the message to a dead-letter queue.
    AttemptsExhausted {
        /// Attempts recorded for the key.
        attempts: u32,
    },
    /// The key expression produced `None` or an empty value.
    MissingKey,
    /// The key was seen before with a different fingerprint: this is not a duplicate
    /// but a different message reusing an id.
    FingerprintMismatch,
    /// The store failed. With `on_store_error = "fail"` (the default) the handler did not run.
    Store(StoreError),
    /// `store = "name"` names a store that was never registered with
    /// [`register_store`](crate::register_store).
    UnknownStore {
        /// The name that was looked up.
        name: String,
    },
    /// The fingerprint expression could not be serialized (for example a map with
    /// non-string keys); nothing ran.
    Fingerprint(serde_json::Error),
    /// A duplicate of a completed key whose output cannot be replayed: it was larger
    /// than the output size cap when it was recorded, or it no longer deserializes
    /// into the handler's output type.
    OutputNotReplayable {
        /// Why the output could not be replayed.
        reason: NotReplayable,
    },
    /// The settings of an [`Idempotency`](crate::Idempotency) are invalid (a lease
    /// shorter than [`MIN_LEASE`](crate::MIN_LEASE), a ttl or lease over
    /// [`MAX_TTL`](crate::MAX_TTL)), or an `#[idempotent]` handler has the default
    /// scope of another handler of the process (give each an explicit `scope`);
    /// nothing ran. The attribute rejects the same settings at compile time.
    InvalidSettings {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The messages a handler emitted through its [`Outbox`](crate::outbox::Outbox)
    /// cannot be written (an outbox no handler bound, an empty destination, one
    /// emission name used twice): nothing was written, and the caller rolls the
    /// transaction back.
    InvalidEmission {
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// Why a completed key's output could not be replayed to a duplicate.
#[derive(Debug)]
#[non_exhaustive]
pub enum NotReplayable {
    /// The output was larger than the cache cap when it was recorded; the record
    /// is Completed without a stored output.
    TooLarge,
    /// The stored output does not deserialize into the handler's output type
    /// (for example after the type changed between deployments).
    Decode(serde_json::Error),
    /// The handler's output could not be serialized when it was recorded (its
    /// `Serialize` implementation failed); the record is Completed with this reason
    /// instead of a value.
    NotSerializable {
        /// The serializer's error message.
        message: String,
    },
}

impl Error {
    /// Whether delivering the same message again later may succeed: true for
    /// [`InProgress`](Error::InProgress) and for store failures that are not
    /// caused by bad data; false for everything a retry cannot fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InProgress { .. } => true,
            Error::Store(e) => e.is_retryable(),
            Error::AttemptsExhausted { .. }
            | Error::MissingKey
            | Error::FingerprintMismatch
            | Error::Fingerprint(_)
            | Error::UnknownStore { .. }
            | Error::OutputNotReplayable { .. }
            | Error::InvalidSettings { .. }
            | Error::InvalidEmission { .. } => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InProgress { retry_after } => write!(
                f,
                "another execution holds this key; retry after {} ms",
                retry_after.as_millis()
            ),
            Error::AttemptsExhausted { attempts } => {
                write!(f, "key poisoned after {attempts} failed attempts")
            }
            Error::MissingKey => f.write_str("the idempotency key is missing or empty"),
            Error::FingerprintMismatch => f.write_str(
                "the idempotency key was already used by a message with a different fingerprint",
            ),
            Error::Fingerprint(_) => {
                f.write_str("the fingerprint expression could not be serialized")
            }
            Error::Store(_) => f.write_str("idempotency store failed"),
            Error::UnknownStore { name } => write!(
                f,
                "no idempotency store registered under the name `{name}`; \
                 call `idempotent_runtime::register_store({name:?}, store)` at start-up"
            ),
            Error::InvalidSettings { reason } => {
                write!(f, "invalid idempotency settings: {reason}")
            }
            Error::InvalidEmission { reason } => {
                write!(f, "the outbox messages cannot be written: {reason}")
            }
            Error::OutputNotReplayable { reason } => match reason {
                NotReplayable::TooLarge => {
                    f.write_str("duplicate of a completed key whose output was too large to cache")
                }
                NotReplayable::Decode(_) => f.write_str(
                    "duplicate of a completed key whose cached output no longer deserializes",
                ),
                NotReplayable::NotSerializable { message } => write!(
                    f,
                    "duplicate of a completed key whose output could not be serialized: {message}"
                ),
            },
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Store(e) => Some(e),
            Error::Fingerprint(e) => Some(e),
            Error::OutputNotReplayable {
                reason: NotReplayable::Decode(e),
            } => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached or did not answer in time (retryable).
    Unavailable,
    /// The store answered with data this crate does not understand, such as a
    /// foreign value under one of its keys (not retryable).
    Corrupt,
    /// The store rejected a request, for example a missing table or a bad
    /// configuration (not retryable).
    Rejected,
    /// An injected fault from `testing::FaultyStore` (feature `testing`) or
    /// another failure that a retry may fix.
    Other,
    /// The database aborted a statement, or the whole transaction, because it
    /// conflicted with a concurrent transaction: a deadlock, a serialization failure
    /// under `SERIALIZABLE` / `REPEATABLE READ`, a lock wait timeout (retryable). Raised
    /// by the SQL stores (deliver the message again) and by transactional mode
    /// (`tx = "…"`: roll the transaction back and deliver the message again).
    Conflict,
    /// The write happened on the primary but too few replicas acknowledged it in time,
    /// so a failover now could lose it (Redis with
    /// `RedisStore::with_replica_ack`; retryable). After a claim the handler did not run;
    /// after a completion the completion is recorded on the primary only.
    NotReplicated,
}

/// A failure reported by a [`Store`](crate::Store), with the driver's error as its source.
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// A store error of `kind` with a message and no source.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A store error of `kind` wrapping the driver's error.
    pub fn with_source(
        kind: StoreErrorKind,
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        StoreError {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether a later retry may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Unavailable
                | StoreErrorKind::Other
                | StoreErrorKind::Conflict
                | StoreErrorKind::NotReplicated
        )
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("StoreError");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_bounds<T: Send + Sync + 'static + std::error::Error>() {}

    #[test]
    fn error_is_send_sync_static() {
        assert_bounds::<Error>();
        assert_bounds::<StoreError>();
    }

    #[test]
    fn retryable_split() {
        assert!(
            Error::InProgress {
                retry_after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(Error::Store(StoreError::new(StoreErrorKind::Unavailable, "down")).is_retryable());
        assert!(!Error::Store(StoreError::new(StoreErrorKind::Corrupt, "bad")).is_retryable());
        assert!(!Error::MissingKey.is_retryable());
        assert!(!Error::AttemptsExhausted { attempts: 3 }.is_retryable());
        assert!(!Error::FingerprintMismatch.is_retryable());
    }

    #[test]
    fn store_error_keeps_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::from(StoreError::with_source(
            StoreErrorKind::Unavailable,
            "redis unreachable",
            io,
        ));
        let src = std::error::Error::source(&e).unwrap();
        assert_eq!(src.to_string(), "redis unreachable");
        assert_eq!(
            std::error::Error::source(src).unwrap().to_string(),
            "refused"
        );
    }
}
