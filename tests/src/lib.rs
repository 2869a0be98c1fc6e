//! Shared test support: the store conformance suite and helpers for tests that need
//! real servers.

pub mod conformance;
