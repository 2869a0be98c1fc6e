//! Shared test support: the store conformance suite and helpers for tests that need
//! real servers.

pub mod conformance;
pub mod metrics_support;
pub mod nats_support;
pub mod proxy;
pub mod redis_support;
pub mod rocketmq_support;
pub mod sql_support;
