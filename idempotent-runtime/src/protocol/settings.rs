//! What a handler is configured with: [`Settings`] and its policies.

use crate::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Default cap on a cached output's serialized size: 64 KiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = idempotent_shared::DEFAULT_MAX_OUTPUT_BYTES;

static MAX_OUTPUT_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_OUTPUT_BYTES);

/// Sets the process-wide cap on a cached output's serialized (JSON) size, for handlers
/// declared with the attribute. An output over the cap is still returned to the caller,
/// but the record is Completed without it, and later duplicates get
/// [`Error::OutputNotReplayable`] instead of a value.
pub fn set_max_output_bytes(bytes: usize) {
    MAX_OUTPUT_BYTES.store(bytes, Ordering::Relaxed);
}

/// What to do when the store cannot be reached (`on_store_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Fail closed: return [`Error::Store`], do not run the handler (guarantee G4).
    #[default]
    Fail,
    /// Fail open: run the handler without deduplication, logging a warning.
    Process,
}

/// What to do when another execution holds the claim (`on_in_progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OnInProgress {
    /// Return [`Error::InProgress`] at once.
    #[default]
    Reject,
    /// Wait, with backoff, for at most one lease; return the winner's output if it
    /// completes, run the handler if the winner fails or its lease expires.
    Wait,
}

/// The shortest lease the protocol accepts: 100 ms.
///
/// A running handler's lease is renewed every third of it, and a store round trip
/// under load can take tens of milliseconds; a shorter lease would lapse under running
/// handlers and let duplicates run them again. The attribute rejects a shorter `lease`
/// at compile time; [`Idempotency::lease`](crate::Idempotency::lease) at run time
/// ([`Error::InvalidSettings`]).
pub const MIN_LEASE: Duration = idempotent_shared::MIN_LEASE;

impl Settings {
    /// Checks what the compiler cannot check for the manual API and the HTTP layer, by
    /// the attribute's rules: the ttl is not zero, the lease is at least [`MIN_LEASE`],
    /// neither is over [`MAX_TTL`], and `max_attempts` is not zero.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.ttl.is_zero() {
            return Err(Error::InvalidSettings {
                reason: "a ttl of zero would forget each completion at once, and every \
                         duplicate would run again; give a positive ttl, like 7 days"
                    .into(),
            });
        }
        if self.max_attempts == Some(0) {
            return Err(Error::InvalidSettings {
                reason: "max_attempts = 0 would never run the handler; use 1 or more, or \
                         leave it out for unlimited attempts"
                    .into(),
            });
        }
        if self.ttl > MAX_TTL || self.lease > MAX_TTL {
            return Err(Error::InvalidSettings {
                reason: format!(
                    "a ttl of {:?} or a lease of {:?} is over the maximum of 3650 days",
                    self.ttl, self.lease
                ),
            });
        }
        if self.lease < MIN_LEASE {
            return Err(Error::InvalidSettings {
                reason: format!(
                    "a lease of {:?} is shorter than the minimum of 100ms: renewals (every third of \
                     the lease) could not keep up with the store, and duplicates would run the \
                     handler again; use a lease of at least 100ms",
                    self.lease
                ),
            });
        }
        Ok(())
    }
}

/// The longest `ttl` and `lease` the protocol accepts: 3650 days (ten years), as the
/// attribute checks at compile time.
pub const MAX_TTL: Duration = idempotent_shared::MAX_TTL;

/// Protocol settings of one handler. The attribute builds it from its arguments;
/// the manual API from [`Idempotency`](crate::Idempotency)'s builder methods. Other
/// code starts from [`Settings::DEFAULT`] and changes what it needs with the `with_*`
/// methods (the struct may gain fields):
///
/// ```
/// use idempotent_runtime::Settings;
/// use std::time::Duration;
///
/// const ORDERS: Settings = Settings::DEFAULT
///     .with_ttl(Duration::from_secs(24 * 3600))
///     .with_max_attempts(Some(5));
/// assert_eq!(ORDERS.lease, Settings::DEFAULT.lease);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// How long a completed key is remembered.
    pub ttl: Duration,
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// Poison the key after this many failed attempts.
    pub max_attempts: Option<u32>,
    /// Store unreachable: fail closed or run unprotected.
    pub on_store_error: OnStoreError,
    /// Claim held elsewhere: reject or wait.
    pub on_in_progress: OnInProgress,
    /// Cap on the cached output's size; `None` uses the process-wide cap
    /// ([`set_max_output_bytes`]).
    pub max_output_bytes: Option<usize>,
}

impl Settings {
    /// The defaults of the attribute: `ttl = "7d"`, `lease = "60s"`, unlimited attempts,
    /// fail closed, reject while in progress.
    pub const DEFAULT: Settings = Settings {
        ttl: idempotent_shared::DEFAULT_TTL,
        lease: idempotent_shared::DEFAULT_LEASE,
        max_attempts: None,
        on_store_error: OnStoreError::Fail,
        on_in_progress: OnInProgress::Reject,
        max_output_bytes: None,
    };
}

impl Settings {
    /// With `ttl`: how long a completed key is remembered.
    pub const fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// With `lease`: how long a claim holds without renewal (at least [`MIN_LEASE`]).
    pub const fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// With `max_attempts`: poison the key after this many failed attempts.
    pub const fn with_max_attempts(mut self, max_attempts: Option<u32>) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// With the policy for an unreachable store.
    pub const fn with_on_store_error(mut self, policy: OnStoreError) -> Self {
        self.on_store_error = policy;
        self
    }

    /// With the policy for a claim held elsewhere.
    pub const fn with_on_in_progress(mut self, policy: OnInProgress) -> Self {
        self.on_in_progress = policy;
        self
    }

    /// With a cap on the cached output's size (`None`: the process-wide cap).
    pub const fn with_max_output_bytes(mut self, bytes: Option<usize>) -> Self {
        self.max_output_bytes = bytes;
        self
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

pub(crate) fn output_cap(settings: &Settings) -> usize {
    settings
        .max_output_bytes
        .unwrap_or_else(|| MAX_OUTPUT_BYTES.load(Ordering::Relaxed))
}
