//! The stores of this crate, one folder each: [`memory`] (in process, the default),
//! `redis` and `sql` (MySQL, PostgreSQL and SQLite), each behind its cargo feature.

pub mod memory;

cfg_redis! {
    pub(crate) mod redis;
}

cfg_sql! {
    pub(crate) mod sql;
}
