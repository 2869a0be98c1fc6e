//! The claim → run → complete/release protocol shared by the attribute, the manual
//! API, batches, transactional mode and the HTTP layer.
//!
//! ```text
//! claim ──Acquired──▶ run body (lease renewed every lease/3) ──Ok──▶ complete(output) ──▶ Ok(t)
//!   │                                      │ Err / panic / cancel
//!   │                                      └──────────────────────▶ release ──▶ Err(e) / unwind
//!   ├─Completed──▶ Ok(cached t)            (no body run)
//!   ├─InProgress──▶ Err(InProgress) or wait with backoff, then claim again
//!   ├─Exhausted──▶ Err(AttemptsExhausted)
//!   └─FingerprintMismatch──▶ Err(FingerprintMismatch)
//! ```
//!
//! One file per concern: [`settings`] (what a handler is configured with), [`claim`]
//! (the claim a running body sees), [`handle`] (where the store and scope come from),
//! [`decide`] (what a store's answer to a claim means: the one place that maps a
//! [`ClaimOutcome`](crate::store::ClaimOutcome) to an outcome and an error),
//! [`cancel`] (cleanup of a dropped handler future), [`renewal`] (the lease renewal of
//! a running body), [`telemetry`] (spans and metrics), and the drivers: [`single`]
//! (one message), [`batch`] (many messages in three round trips) and [`tx`] (the
//! claim and completion written in the caller's SQL transaction).

pub(crate) mod batch;
pub(crate) mod cancel;
pub(crate) mod claim;
pub(crate) mod decide;
pub(crate) mod handle;
pub(crate) mod renewal;
pub(crate) mod settings;
pub(crate) mod single;
pub(crate) mod telemetry;
pub(crate) mod tx;

pub use claim::{Claim, current_claim};
pub(crate) use handle::{StoreHandle, StoreSource, lookup_store};
pub use settings::{
    DEFAULT_MAX_OUTPUT_BYTES, MAX_TTL, MIN_LEASE, OnInProgress, OnStoreError, Settings,
    set_max_output_bytes,
};
pub(crate) use single::run;
pub(crate) use telemetry::disabled;
pub use telemetry::{Outcome, observe};
