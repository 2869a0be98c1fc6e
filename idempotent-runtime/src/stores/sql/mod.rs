//! SQL stores on `sqlx`: [`MySqlStore`] (MySQL 8, MariaDB 10.11), [`PostgresStore`]
//! and [`SqliteStore`], each behind its own cargo feature.
//!
//! The three share one table layout (the classic `message_id`, `status` and
//! `retry_times` columns plus scope, owner token, lease deadline, expiry, fingerprint
//! and cached output; each store's docs give its DDL), keep every value in bound
//! parameters (only the validated table name is part of the SQL text), and take every
//! lease and expiry decision on the database clock.
//!
//! A row holding a value the stores never write (a status other than 0 or 1, a
//! negative or out-of-range attempt count, token, lease or expiry, a value of the
//! wrong type) is never acted on: every step on that record fails with
//! [`StoreErrorKind::Corrupt`](crate::StoreErrorKind::Corrupt), naming its scope, and
//! leaves the row as it is. A completion retried by the claim that made it (its
//! first reply lost) finds the record Completed under its own token and is
//! [`Fence::Held`](crate::store::Fence::Held).

mod common;

cfg_mysql! {
    mod mysql;
    pub use mysql::MySqlStore;
    pub use mysql::outbox::MySqlOutbox;
}

cfg_postgres! {
    mod postgres;
    pub use postgres::PostgresStore;
    pub use postgres::outbox::PostgresOutbox;
}

cfg_sqlite! {
    mod sqlite;
    pub use sqlite::SqliteStore;
    pub use sqlite::outbox::SqliteOutbox;
}

pub use common::DEFAULT_TABLE;
