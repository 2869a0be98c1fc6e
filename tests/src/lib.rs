//! Shared test support: the store conformance suite and helpers for tests that need
//! real servers.

pub mod broker_support;
pub mod conformance;
pub mod conformance_scan;
pub mod metrics_support;
pub mod nats_support;
pub mod proxy;
pub mod redis_ha_support;
pub mod redis_support;
pub mod rng;
pub mod rocketmq_support;
pub mod sql_support;

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
