//! SQL stores on `sqlx`: [`MySqlStore`] (MySQL 8, MariaDB 10.11), [`PostgresStore`]
//! and [`SqliteStore`], each behind its own cargo feature.
//!
//! The three share one table layout (the classic `message_id`, `status` and
//! `retry_times` columns plus scope, owner token, lease deadline, expiry, fingerprint
//! and cached output; each store's docs give its DDL), keep every value in bound
//! parameters (only the validated table name is part of the SQL text), and take every
//! lease and expiry decision on the database clock.

mod common;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
mod scan;
#[cfg(feature = "sqlite")]
mod sqlite;
pub(crate) mod tx;

pub use common::DEFAULT_TABLE;
#[cfg(feature = "mysql")]
pub use mysql::MySqlStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
