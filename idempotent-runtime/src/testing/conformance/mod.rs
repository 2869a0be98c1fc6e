//! The store conformance suite: one set of checks that proves a [`Store`], for the
//! stores of this crate and for a store written anywhere else.
//!
//! Every case takes a fresh handle to the store under test (`Arc<dyn Store>`) and
//! checks one rule of the store contract or one guarantee of the protocol. Each case
//! works in its own random scope ([`unique_scope`]), so cases can run in parallel
//! against one shared server, and a case fails by panicking, as a test does.
//!
//! - The protocol cases ([`protocol`], [`run_protocol`]) need only the four protocol
//!   steps of [`Store`]. On a store with operator actions they also check the records
//!   they leave.
//! - The admin cases ([`admin`], [`run_admin`]) check [`StoreAdmin`]: inspect, forget,
//!   scans, statistics, the operator's release and attempt reset. They reach the
//!   operator actions through [`Store::as_admin`], so they fail on a store that has
//!   none, and pass through a wrapper only if it forwards `as_admin`.
//!
//! [`protocol_conformance_suite!`](crate::protocol_conformance_suite) and
//! [`admin_conformance_suite!`](crate::admin_conformance_suite) write one
//! `#[tokio::test]` per case (they need `tokio` with the `macros` and
//! `rt-multi-thread` features in the calling crate); [`run_protocol`], [`run_admin`] and [`run_all`] run the cases one
//! after another in one test, for a fixture that is expensive to start.
//!
//! ```no_run
//! use idempotent_runtime::{MemoryStore, Store};
//! use std::sync::Arc;
//!
//! // in `tests/my_store.rs`: one test per case; a store without operator actions
//! // runs the protocol cases only
//! idempotent_runtime::protocol_conformance_suite!(async {
//!     Arc::new(MemoryStore::new()) as Arc<dyn Store>
//! });
//! idempotent_runtime::admin_conformance_suite!(async {
//!     Arc::new(MemoryStore::new()) as Arc<dyn Store>
//! });
//! # fn main() {}
//! ```
//!
//! [`StoreAdmin`]: crate::store::StoreAdmin

pub mod admin;
pub mod outbox;
pub mod protocol;
mod support;

pub use admin::{
    force_release_fences_the_holder, forget_and_inspect,
    idempotency_inspects_and_forgets_by_message_key, reset_attempts_unpoisons,
    scan_pages_through_records_with_filters, stats_count_per_scope_and_state,
};
pub use protocol::{
    attempts_exhausted_after_failures, batch_fingerprints_are_checked,
    batch_protocol_runs_each_key_once, batches_follow_the_same_rules,
    cancellation_releases_for_retry, cancelled_while_completing_still_completes,
    claim_fresh_key_acquires, completed_record_expires_after_ttl,
    completed_without_output_replays_none, concurrent_duplicates_run_once,
    current_claim_matches_the_record, duplicate_of_completed_key_replays_output,
    expired_holder_cannot_overwrite, expired_lease_is_taken_over, fingerprint_mismatch_is_refused,
    fingerprint_mismatch_through_protocol, handler_error_releases_for_retry, keys_are_data,
    live_claim_refuses_others, long_handler_keeps_its_lease, lost_completion_frees_after_lease,
    max_attempts_poisons_the_key, observe_tells_replays_from_executions,
    oversized_output_is_not_replayed, panic_releases_for_retry, racing_claims_have_one_winner,
    released_key_is_claimable_at_once, renewal_extends_the_lease,
    renewal_in_flight_when_the_body_returns, retried_completion_after_a_lost_reply_is_held,
    retried_release_after_a_lost_reply_is_held, scopes_are_isolated, stale_owner_is_fenced,
    store_outage_fails_closed, tokens_strictly_increase, unserializable_output_says_why,
    waiting_duplicate_gets_winners_output,
};
pub use support::{HandlerError, LEASE, TTL, acquire_token, claim_request, unique_scope};

use crate::store::Store;
use std::future::Future;
use std::sync::Arc;

/// The one list of the conformance cases, and what is made of it: `(protocol [view])`
/// and `(admin [view])` hand their cases to the view `[tests make]` (one
/// `#[tokio::test]` per case, each with a store from the future `make`, for
/// [`protocol_conformance_suite!`](crate::protocol_conformance_suite) and
/// [`admin_conformance_suite!`](crate::admin_conformance_suite)) or `[run make]` (each
/// case in turn on a store from `make()`, for [`run_protocol`] and [`run_admin`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($kind:ident $view:tt) => {
        $crate::testing::conformance::__cases!(
            @pick $kind $view
            protocol [
                claim_fresh_key_acquires,
                duplicate_of_completed_key_replays_output,
                completed_without_output_replays_none,
                live_claim_refuses_others,
                racing_claims_have_one_winner,
                released_key_is_claimable_at_once,
                expired_lease_is_taken_over,
                stale_owner_is_fenced,
                tokens_strictly_increase,
                renewal_extends_the_lease,
                max_attempts_poisons_the_key,
                fingerprint_mismatch_is_refused,
                completed_record_expires_after_ttl,
                scopes_are_isolated,
                keys_are_data,
                batches_follow_the_same_rules,
                concurrent_duplicates_run_once,
                handler_error_releases_for_retry,
                panic_releases_for_retry,
                cancellation_releases_for_retry,
                cancelled_while_completing_still_completes,
                long_handler_keeps_its_lease,
                expired_holder_cannot_overwrite,
                store_outage_fails_closed,
                lost_completion_frees_after_lease,
                retried_completion_after_a_lost_reply_is_held,
                retried_release_after_a_lost_reply_is_held,
                renewal_in_flight_when_the_body_returns,
                waiting_duplicate_gets_winners_output,
                attempts_exhausted_after_failures,
                fingerprint_mismatch_through_protocol,
                oversized_output_is_not_replayed,
                unserializable_output_says_why,
                current_claim_matches_the_record,
                batch_protocol_runs_each_key_once,
                batch_fingerprints_are_checked,
                observe_tells_replays_from_executions,
            ]
            admin [
                scan_pages_through_records_with_filters,
                stats_count_per_scope_and_state,
                force_release_fences_the_holder,
                reset_attempts_unpoisons,
                forget_and_inspect,
                idempotency_inspects_and_forgets_by_message_key,
            ]
        );
    };
    (@pick protocol $view:tt protocol [$($p:ident,)*] admin [$($a:ident,)*]) => {
        $crate::testing::conformance::__cases!(@each $view $($p,)*);
    };
    (@pick admin $view:tt protocol [$($p:ident,)*] admin [$($a:ident,)*]) => {
        $crate::testing::conformance::__cases!(@each $view $($a,)*);
    };
    (@each [tests $make:expr] $($case:ident,)*) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::$case(store).await;
        }
    )*};
    (@each [run $make:expr] $($case:ident,)*) => {$(
        eprintln!("conformance: {}", stringify!($case));
        $crate::testing::conformance::$case($make().await).await;
    )*};
}

#[doc(hidden)]
pub use __conformance_cases as __cases;

/// Runs every protocol case against stores made by `make`, one after another.
pub async fn run_protocol<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    __conformance_cases!(protocol [run make]);
}

/// Runs every admin case against stores made by `make`, one after another; the stores
/// must have operator actions ([`Store::as_admin`]).
pub async fn run_admin<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    __conformance_cases!(admin [run make]);
}

/// Runs every case, protocol then admin, against stores made by `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    run_protocol(&make).await;
    run_admin(&make).await;
}

/// One `#[tokio::test]` per protocol case ([`protocol`]), each with a store from
/// `$make` (an expression, usually an `async` block, evaluating to a future of
/// `Arc<dyn Store>`). See the [module docs](crate::testing::conformance).
#[macro_export]
macro_rules! protocol_conformance_suite {
    ($make:expr) => {
        $crate::testing::conformance::__cases!(protocol [tests $make]);
    };
}

/// One `#[tokio::test]` per admin case ([`admin`]), each with a store from `$make`,
/// which must have operator actions ([`Store::as_admin`]). See the
/// [module docs](crate::testing::conformance).
#[macro_export]
macro_rules! admin_conformance_suite {
    ($make:expr) => {
        $crate::testing::conformance::__cases!(admin [tests $make]);
    };
}
