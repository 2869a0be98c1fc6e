//! The definitions that the `#[idempotent]` attribute (`idempotent-macros`), the runtime
//! (`idempotent-runtime`) and the `idempotent` command (`idempotent-cli`) must agree on,
//! written once:
//!
//! - the duration grammar of `ttl = "7d"`, `lease = "60s"` and `--older-than 1h30m`:
//!   [`parse_duration`] and [`format_duration`];
//! - the rule for SQL dedup table names (`table = "billing.message_idempotent"`,
//!   `with_table`): [`parse_table_name`];
//! - the defaults and limits: [`DEFAULT_TTL`], [`DEFAULT_LEASE`], [`MIN_LEASE`],
//!   [`MAX_TTL`], [`MAX_SCOPE_BYTES`], [`DEFAULT_MAX_OUTPUT_BYTES`], [`DEFAULT_STORE`],
//!   [`DEFAULT_TABLE`], [`DEFAULT_OUTBOX_TABLE`], [`MAX_IDENT_BYTES`].
//!
//! A procedural macro crate cannot export functions or constants, so the attribute's
//! compile-time checks and the runtime's checks call this crate instead of keeping copies.
//! Applications depend on `idempotent-runtime`, which defines its public constants
//! (`MIN_LEASE`, `MAX_TTL`, `DEFAULT_TABLE`, …) from these.
//!
//! ```
//! use core::time::Duration;
//! use idempotent_shared::{MAX_TTL, format_duration, parse_duration, parse_table_name};
//!
//! assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
//! assert_eq!(format_duration(Duration::from_secs(5400)), "90m");
//! assert_eq!(
//!     parse_duration("7days").unwrap_err().to_string(),
//!     "has the unknown unit `days`; use ms, s, m, h, d or w"
//! );
//! assert!(parse_duration("3651d").is_err());
//! assert_eq!(parse_duration("3650d"), Ok(MAX_TTL));
//!
//! let name = parse_table_name("billing.message_idempotent").unwrap();
//! assert_eq!((name.schema, name.table), (Some("billing"), "message_idempotent"));
//! assert!(parse_table_name("dedup; DROP TABLE orders").is_err());
//! ```
//!
//! The crate has no dependencies and is `#![no_std]`; it needs `alloc` for the text in
//! its errors.

#![no_std]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

extern crate alloc;

mod duration;
mod table;
mod type_ident;

pub use duration::{DurationError, format_duration, parse_duration};
pub use table::{TableName, TableNameError, TableNameProblem, parse_table_name};
pub use type_ident::type_ident;

use core::time::Duration;

/// How long a completed key is remembered when `ttl` is not given: 7 days.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a claim holds without renewal when `lease` is not given: 60 s.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The shortest lease: 100 ms. A running handler's lease is renewed every third of it,
/// and a store round trip under load can take tens of milliseconds; a shorter lease would
/// lapse under running handlers and let duplicates run them again.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The longest `ttl` and `lease`: 3650 days (ten years), a deadline every store can
/// represent. It is also the longest duration [`parse_duration`] accepts.
pub const MAX_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);

/// The longest scope, in bytes: the attribute refuses a longer `scope`; the runtime
/// shortens a longer one, with a hash suffix that keeps it distinct.
pub const MAX_SCOPE_BYTES: usize = 200;

/// The default cap on a cached output's serialized size: 64 KiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The name of the store a handler uses when it names none: the process-wide memory
/// store, registered from the start.
pub const DEFAULT_STORE: &str = "memory";

/// The dedup table of the SQL stores and of transactional mode when none is given, after
/// the classic `message_idempotent` table of hand-written consumers.
pub const DEFAULT_TABLE: &str = "message_idempotent";

/// The outbox table of `#[idempotent(tx = "…", outbox = "…")]` and of the SQL stores'
/// outbox, when none is named.
pub const DEFAULT_OUTBOX_TABLE: &str = "idempotent_outbox";

/// The longest part of a table name ([`parse_table_name`]), in bytes: PostgreSQL's
/// limit, which it would otherwise apply by silently truncating (MySQL's is 64).
pub const MAX_IDENT_BYTES: usize = 63;

// What the attribute and the runtime assume of the values above: the defaults are valid
// settings, and the longest duration fits the grammar's milliseconds (`u64`).
const _: () = {
    assert!(MIN_LEASE.as_millis() <= DEFAULT_LEASE.as_millis());
    assert!(DEFAULT_LEASE.as_millis() < DEFAULT_TTL.as_millis());
    assert!(DEFAULT_TTL.as_millis() <= MAX_TTL.as_millis());
    assert!(MAX_TTL.as_millis() <= u64::MAX as u128);
    assert!(MAX_TTL.subsec_nanos() == 0);
    assert!(!DEFAULT_STORE.is_empty());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_is_a_valid_table_name() {
        let name = parse_table_name(DEFAULT_TABLE).expect("valid");
        assert_eq!((name.schema, name.table), (None, DEFAULT_TABLE));
    }

    #[test]
    fn the_defaults_and_limits_are_written_in_the_grammar() {
        for d in [DEFAULT_TTL, DEFAULT_LEASE, MIN_LEASE, MAX_TTL] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
