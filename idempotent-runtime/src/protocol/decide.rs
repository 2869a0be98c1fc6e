//! What a store's answer to a claim means: the one mapping from a [`ClaimOutcome`] to
//! the message's [`Outcome`] and to what the handler returns, used by every driver
//! (single message, batch, transactional mode, HTTP).

use super::handle::Scope;
use super::settings::{OnInProgress, Settings};
use super::telemetry::{Outcome, record};
use crate::error::Error;
use crate::output::Output;
use crate::store::{ClaimOutcome, Token};
use std::time::Duration;

/// A claim's meaning for the driver that asked.
pub(crate) enum Decision<T> {
    /// The claim is held: run the body under it.
    Run {
        /// The claim's fencing token.
        token: Token,
        /// 1 on the first attempt, 2 on the first retry, …
        attempt: u32,
    },
    /// Another execution holds a live claim for `retry_after` more. A driver that
    /// waits (`on_in_progress = "wait"`) claims again later; one that does not ends
    /// with [`Finished::in_progress`].
    InProgress {
        /// Time left on the holder's lease, by the store's clock.
        retry_after: Duration,
    },
    /// The handler returns without running its body.
    Done(Finished<T>),
}

/// How a message ends without its body running: the outcome to record and what the
/// handler returns.
pub(crate) struct Finished<T> {
    pub(crate) outcome: Outcome,
    pub(crate) result: Result<T, Error>,
}

impl<T> Finished<T> {
    /// Another execution holds the claim and this caller does not (or no longer) wait.
    pub(crate) fn in_progress(retry_after: Duration) -> Self {
        Finished {
            outcome: Outcome::InProgress,
            result: Err(Error::InProgress { retry_after }),
        }
    }

    /// Records the outcome on the span and in the metrics, and returns the result.
    pub(crate) fn finish<'a, E: From<Error>>(self, scope: impl Into<Scope<'a>>) -> Result<T, E> {
        record(self.outcome, scope);
        self.result.map_err(E::from)
    }
}

/// What `outcome` means. A completed key's cached output is decoded here, so a replay
/// and an output that cannot be replayed are told apart once for every driver.
pub(crate) fn decide<T: Output>(outcome: ClaimOutcome) -> Decision<T> {
    let (outcome, result) = match outcome {
        ClaimOutcome::Acquired { token, attempt } => return Decision::Run { token, attempt },
        ClaimOutcome::InProgress { retry_after } => return Decision::InProgress { retry_after },
        ClaimOutcome::Completed { output } => match T::decode(output) {
            Ok(value) => (Outcome::Replayed, Ok(value)),
            Err(e) => (Outcome::NotReplayable, Err(e)),
        },
        ClaimOutcome::Exhausted { attempts } => (
            Outcome::Exhausted,
            Err(Error::AttemptsExhausted { attempts }),
        ),
        ClaimOutcome::FingerprintMismatch => (
            Outcome::FingerprintMismatch,
            Err(Error::FingerprintMismatch),
        ),
    };
    Decision::Done(Finished { outcome, result })
}

/// Whether a driver that has waited `waited` for another execution waits on.
pub(crate) fn may_wait(settings: &Settings, waited: Duration) -> bool {
    settings.on_in_progress == OnInProgress::Wait && waited < settings.lease
}
