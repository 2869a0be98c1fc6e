//! What the three SQL stores share: table names, statement text, binding the protocol's
//! values, time arithmetic, opening a pool and error classification in [`base`];
//! reading a record row and the claim rules applied to it in [`row`]; the methods every
//! store has alike and the background sweeper in [`methods`]; the statements of scans,
//! statistics and operator changes in [`scan`]; the steps every store takes alike,
//! written once over the database's [`SqlDialect`], in [`steps`]; the shared part of
//! transactional mode in [`tx`].
//!
//! The stores use it through this module's re-exports; the files here import each
//! other directly.

pub(crate) mod base;
pub(crate) mod methods;
pub(crate) mod outbox;
pub(crate) mod row;
mod scan;
mod steps;
pub(crate) mod tx;

pub use base::DEFAULT_TABLE;
pub(crate) use base::*;
pub(crate) use methods::store_accessors;
pub(crate) use row::*;
pub(crate) use steps::{SqlQuery, SqlStore, StepSql, Steps};
