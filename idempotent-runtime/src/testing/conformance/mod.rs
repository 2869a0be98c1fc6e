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

/// The protocol cases, for [`run_protocol`]: calls `$m!($($arg)* case, case, …)`.
/// [`protocol_conformance_suite!`](crate::protocol_conformance_suite) lists them too.
macro_rules! __conformance_protocol_cases {
    ($m:ident ! ($($arg:tt)*)) => {
        $m!(
            $($arg)*
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
        );
    };
}

/// The admin cases, for [`run_admin`]: calls `$m!($($arg)* case, case, …)`.
/// [`admin_conformance_suite!`](crate::admin_conformance_suite) lists them too.
macro_rules! __conformance_admin_cases {
    ($m:ident ! ($($arg:tt)*)) => {
        $m!(
            $($arg)*
            scan_pages_through_records_with_filters,
            stats_count_per_scope_and_state,
            force_release_fences_the_holder,
            reset_attempts_unpoisons,
            forget_and_inspect,
            idempotency_inspects_and_forgets_by_message_key,
        );
    };
}

/// Runs every protocol case against stores made by `make`, one after another.
pub async fn run_protocol<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    macro_rules! run {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("conformance: {}", stringify!($case));
            $case(make().await).await;
        )*};
    }
    __conformance_protocol_cases!(run!());
}

/// Runs every admin case against stores made by `make`, one after another; the stores
/// must have operator actions ([`Store::as_admin`]).
pub async fn run_admin<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    macro_rules! run {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("conformance: {}", stringify!($case));
            $case(make().await).await;
        )*};
    }
    __conformance_admin_cases!(run!());
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
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn claim_fresh_key_acquires() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::claim_fresh_key_acquires(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_of_completed_key_replays_output() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::duplicate_of_completed_key_replays_output(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn completed_without_output_replays_none() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::completed_without_output_replays_none(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn live_claim_refuses_others() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::live_claim_refuses_others(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn racing_claims_have_one_winner() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::racing_claims_have_one_winner(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn released_key_is_claimable_at_once() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::released_key_is_claimable_at_once(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn expired_lease_is_taken_over() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::expired_lease_is_taken_over(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn stale_owner_is_fenced() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::stale_owner_is_fenced(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tokens_strictly_increase() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::tokens_strictly_increase(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn renewal_extends_the_lease() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::renewal_extends_the_lease(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn max_attempts_poisons_the_key() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::max_attempts_poisons_the_key(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fingerprint_mismatch_is_refused() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::fingerprint_mismatch_is_refused(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn completed_record_expires_after_ttl() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::completed_record_expires_after_ttl(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn scopes_are_isolated() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::scopes_are_isolated(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn keys_are_data() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::keys_are_data(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn batches_follow_the_same_rules() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::batches_follow_the_same_rules(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_duplicates_run_once() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::concurrent_duplicates_run_once(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn handler_error_releases_for_retry() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::handler_error_releases_for_retry(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn panic_releases_for_retry() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::panic_releases_for_retry(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cancellation_releases_for_retry() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::cancellation_releases_for_retry(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cancelled_while_completing_still_completes() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::cancelled_while_completing_still_completes(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn long_handler_keeps_its_lease() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::long_handler_keeps_its_lease(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn expired_holder_cannot_overwrite() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::expired_holder_cannot_overwrite(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store_outage_fails_closed() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::store_outage_fails_closed(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn lost_completion_frees_after_lease() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::lost_completion_frees_after_lease(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retried_completion_after_a_lost_reply_is_held() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::retried_completion_after_a_lost_reply_is_held(store)
                .await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn retried_release_after_a_lost_reply_is_held() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::retried_release_after_a_lost_reply_is_held(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn renewal_in_flight_when_the_body_returns() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::renewal_in_flight_when_the_body_returns(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn waiting_duplicate_gets_winners_output() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::waiting_duplicate_gets_winners_output(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn attempts_exhausted_after_failures() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::attempts_exhausted_after_failures(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fingerprint_mismatch_through_protocol() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::fingerprint_mismatch_through_protocol(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn oversized_output_is_not_replayed() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::oversized_output_is_not_replayed(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn unserializable_output_says_why() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::unserializable_output_says_why(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn current_claim_matches_the_record() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::current_claim_matches_the_record(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn batch_protocol_runs_each_key_once() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::batch_protocol_runs_each_key_once(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn batch_fingerprints_are_checked() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::batch_fingerprints_are_checked(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn observe_tells_replays_from_executions() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::observe_tells_replays_from_executions(store).await;
        }
    };
}

/// One `#[tokio::test]` per admin case ([`admin`]), each with a store from `$make`,
/// which must have operator actions ([`Store::as_admin`]). See the
/// [module docs](crate::testing::conformance).
#[macro_export]
macro_rules! admin_conformance_suite {
    ($make:expr) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn scan_pages_through_records_with_filters() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::scan_pages_through_records_with_filters(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn stats_count_per_scope_and_state() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::stats_count_per_scope_and_state(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn force_release_fences_the_holder() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::force_release_fences_the_holder(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn reset_attempts_unpoisons() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::reset_attempts_unpoisons(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn forget_and_inspect() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::forget_and_inspect(store).await;
        }
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn idempotency_inspects_and_forgets_by_message_key() {
            let store: ::std::sync::Arc<dyn $crate::store::Store> = $make.await;
            $crate::testing::conformance::idempotency_inspects_and_forgets_by_message_key(store)
                .await;
        }
    };
}
