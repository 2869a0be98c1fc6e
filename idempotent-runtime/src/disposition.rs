//! What a consumer does with a message once its handler returned: acknowledge it, have
//! it delivered again later, or move it to a dead-letter destination. Every broker
//! integration maps a [`Disposition`] onto its own acknowledgements.

use crate::error::Error;
use std::time::Duration;

/// What to do with a delivered message, decided from its handler's result by
/// [`Disposition::of`] or [`RetryPolicy::disposition`].
///
/// | handler returned | disposition | why |
/// | --- | --- | --- |
/// | `Ok(_)`: first run, or a duplicate that replayed the cached output | [`Ack`](Disposition::Ack) | the work is done: a duplicate must be acknowledged too, or the broker redelivers it forever |
/// | [`Error::OutputNotReplayable`] | [`Ack`](Disposition::Ack) | the work was done; only its output is not cached |
/// | [`Error::InProgress`] | [`Retry`](Disposition::Retry) after `retry_after`, at most [`RetryPolicy::in_progress_max`] | another consumer holds the claim (often after a rebalance) and is probably about to finish; the retry then replays |
/// | a retryable [`Error`] (store unreachable; nothing ran) | [`Retry`](Disposition::Retry) after [`RetryPolicy::backoff`] | a later delivery may succeed |
/// | a business error (an `E` that carries no [`Error`]) | [`Retry`](Disposition::Retry) after [`RetryPolicy::backoff`] | retried; `max_attempts` bounds the retries and then turns them into `AttemptsExhausted` |
/// | [`Error::AttemptsExhausted`], [`Error::MissingKey`], [`Error::FingerprintMismatch`], [`Error::UnknownStore`], a non-retryable store error | [`DeadLetter`](Disposition::DeadLetter) | no retry will help |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Acknowledge: the message is done (a Kafka offset commit, an AMQP `basic.ack`,
    /// an `XACK`, a JetStream ack).
    Ack,
    /// Have the message delivered again, not before `after` (a nack with a delay, a
    /// seek back, an entry left pending).
    Retry {
        /// How long to wait before the next delivery.
        after: Duration,
    },
    /// No retry will help: move the message to a dead-letter destination and
    /// acknowledge the original.
    DeadLetter,
}

impl Disposition {
    /// The disposition of a handler's result on its `delivery`-th delivery (1 for the
    /// first), with the [default retry policy](RetryPolicy::default).
    ///
    /// ```
    /// use idempotent_runtime::{Disposition, Error};
    /// use std::time::Duration;
    ///
    /// let done: Result<u64, Error> = Ok(7);
    /// assert_eq!(Disposition::of(&done, 1), Disposition::Ack);
    ///
    /// let busy: Result<u64, Error> = Err(Error::InProgress { retry_after: Duration::from_secs(30) });
    /// assert_eq!(Disposition::of(&busy, 1), Disposition::Retry { after: Duration::from_secs(1) });
    ///
    /// let poisoned: Result<u64, Error> = Err(Error::AttemptsExhausted { attempts: 3 });
    /// assert_eq!(Disposition::of(&poisoned, 4), Disposition::DeadLetter);
    /// ```
    pub fn of<T, E: AsIdempotencyError>(result: &Result<T, E>, delivery: u32) -> Disposition {
        RetryPolicy::default().disposition(result, delivery)
    }

    /// Whether this is [`Disposition::Ack`].
    pub fn is_ack(&self) -> bool {
        matches!(self, Disposition::Ack)
    }
}

/// The error type of a handler, seen as the dedup layer's [`Error`] when it is one.
///
/// Implement it for your handler's error type (the one with `From<Error>`) so a
/// [`Disposition`] can tell the dedup outcomes (in progress, attempts exhausted, missing
/// key…) from business failures, which are retried.
///
/// ```
/// use idempotent_runtime::{AsIdempotencyError, Error};
///
/// enum AppError {
///     Idempotency(Error),
///     Database(String),
/// }
///
/// impl From<Error> for AppError {
///     fn from(e: Error) -> Self {
///         AppError::Idempotency(e)
///     }
/// }
///
/// impl AsIdempotencyError for AppError {
///     fn idempotency_error(&self) -> Option<&Error> {
///         match self {
///             AppError::Idempotency(e) => Some(e),
///             AppError::Database(_) => None,
///         }
///     }
/// }
/// ```
pub trait AsIdempotencyError {
    /// The dedup layer's error this value carries, if any; `None` for a business error.
    fn idempotency_error(&self) -> Option<&Error>;
}

impl AsIdempotencyError for Error {
    fn idempotency_error(&self) -> Option<&Error> {
        Some(self)
    }
}

impl<E: AsIdempotencyError + ?Sized> AsIdempotencyError for Box<E> {
    fn idempotency_error(&self) -> Option<&Error> {
        (**self).idempotency_error()
    }
}

/// How long a [`Disposition::Retry`] waits: exponential backoff for failures, and a short
/// bounded delay for a message another consumer is working on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetryPolicy {
    /// The delay after a failed first delivery; doubled on each further delivery.
    pub initial: Duration,
    /// The longest backoff.
    pub max: Duration,
    /// The longest wait for a message in progress elsewhere: the holder's remaining
    /// lease (`retry_after`) is only an upper bound of when it finishes.
    pub in_progress_max: Duration,
}

impl Default for RetryPolicy {
    /// 1 s, doubled up to 60 s; in progress elsewhere: at most 1 s.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            in_progress_max: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The backoff before the delivery that follows the failed `delivery`-th one (1 for
    /// the first): `initial * 2^(delivery - 1)`, at most `max`.
    pub fn backoff(&self, delivery: u32) -> Duration {
        let doublings = delivery.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The disposition of a handler's result on its `delivery`-th delivery (1 for the
    /// first); see the table on [`Disposition`].
    pub fn disposition<T, E: AsIdempotencyError>(
        &self,
        result: &Result<T, E>,
        delivery: u32,
    ) -> Disposition {
        let e = match result {
            Ok(_) => return Disposition::Ack,
            Err(e) => e,
        };
        match e.idempotency_error() {
            None => Disposition::Retry {
                after: self.backoff(delivery),
            },
            Some(Error::OutputNotReplayable { .. }) => Disposition::Ack,
            Some(Error::InProgress { retry_after }) => Disposition::Retry {
                after: (*retry_after).min(self.in_progress_max),
            },
            Some(e) if e.is_retryable() => Disposition::Retry {
                after: self.backoff(delivery),
            },
            Some(_) => Disposition::DeadLetter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{NotReplayable, StoreError, StoreErrorKind};

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

    fn of(e: Error, delivery: u32) -> Disposition {
        Disposition::of(&Err::<(), _>(App::Dedup(e)), delivery)
    }

    #[test]
    fn every_outcome_has_its_disposition() {
        let secs = Duration::from_secs;
        assert_eq!(Disposition::of(&Ok::<_, Error>(1), 9), Disposition::Ack);
        assert_eq!(
            of(
                Error::OutputNotReplayable {
                    reason: NotReplayable::TooLarge
                },
                1
            ),
            Disposition::Ack
        );
        assert_eq!(
            of(
                Error::InProgress {
                    retry_after: secs(30)
                },
                5
            ),
            Disposition::Retry { after: secs(1) }
        );
        assert_eq!(
            of(
                Error::InProgress {
                    retry_after: Duration::from_millis(200)
                },
                1
            ),
            Disposition::Retry {
                after: Duration::from_millis(200)
            }
        );
        let down = || Error::Store(StoreError::new(StoreErrorKind::Unavailable, "down"));
        assert_eq!(of(down(), 1), Disposition::Retry { after: secs(1) });
        assert_eq!(of(down(), 3), Disposition::Retry { after: secs(4) });
        assert_eq!(
            Disposition::of(&Err::<(), _>(App::Business), 2),
            Disposition::Retry { after: secs(2) }
        );
        for poison in [
            Error::AttemptsExhausted { attempts: 3 },
            Error::MissingKey,
            Error::FingerprintMismatch,
            Error::UnknownStore { name: "x".into() },
            Error::Store(StoreError::new(StoreErrorKind::Corrupt, "bad")),
        ] {
            assert_eq!(of(poison, 1), Disposition::DeadLetter);
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_without_overflow() {
        let p = RetryPolicy::default();
        let b: Vec<u64> = [0, 1, 2, 3, 7, 8, 40, u32::MAX]
            .into_iter()
            .map(|d| p.backoff(d).as_secs())
            .collect();
        assert_eq!(b, [1, 1, 2, 4, 60, 60, 60, 60]);
        let huge = RetryPolicy {
            initial: Duration::MAX,
            ..p
        };
        assert_eq!(huge.backoff(3), p.max);
    }
}
