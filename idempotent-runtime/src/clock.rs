//! Clocks for in-process stores. Stores that live in a server (Redis, SQL) use the
//! server's clock instead; see guarantee G5.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time for [`MemoryStore`](crate::MemoryStore): microseconds on a
/// timeline that never goes backwards.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Duration;
}

/// The process's clock: wall time at creation, advanced by a monotonic clock, so a
/// wall-clock step (NTP, a VM resume) neither expires nor extends leases.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    base_wall: Duration,
    base: Instant,
}

impl SystemClock {
    /// A clock starting at the current wall time.
    pub fn new() -> Self {
        SystemClock {
            base_wall: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            base: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.base_wall + self.base.elapsed()
    }
}

/// A clock that moves only when told to, for deterministic tests of leases and expiry.
///
/// Clones share the same time.
///
/// ```
/// use idempotent_runtime::MemoryStore;
/// use idempotent_runtime::memory::ManualClock;
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let store = MemoryStore::with_clock(clock.clone());
/// clock.advance(Duration::from_secs(61)); // every 60 s lease has now expired
/// # drop(store);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at an arbitrary fixed start (one second after the epoch).
    pub fn new() -> Self {
        ManualClock {
            micros: Arc::new(AtomicU64::new(1_000_000)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.micros
            .fetch_add(by.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::SeqCst))
    }
}
