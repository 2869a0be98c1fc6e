//! Shared test support: helpers for tests that need real servers (the store
//! conformance suite itself is `idempotent_runtime::testing::conformance`).

pub mod broker_support;
pub mod metrics_support;
pub mod nats_support;
pub mod proxy;
pub mod redis_ha_support;
pub mod redis_support;
pub mod rng;
pub mod rocketmq_support;
pub mod sql_support;
pub mod stores;

/// Checks the effects an end-to-end test recorded per business key: every expected key
/// applied exactly once, none missing, none unexpected.
///
/// # Panics
/// When a key is missing, unexpected, or applied other than once.
pub fn assert_applied_once(
    effects: &std::collections::HashMap<String, u32>,
    expected: impl IntoIterator<Item = String>,
) {
    let expected: std::collections::HashSet<String> = expected.into_iter().collect();
    assert_eq!(
        effects
            .keys()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        expected,
        "nothing lost"
    );
    for (key, n) in effects {
        assert_eq!(*n, 1, "{key} applied {n} times");
    }
}
