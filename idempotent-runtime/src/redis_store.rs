//! Redis store.
