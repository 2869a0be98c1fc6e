//! The feature gates of the crate's modules and re-exports, each written once: the
//! items inside `cfg_redis! { … }` are built with the `redis` feature and documented
//! as needing it.

/// Items built with the `redis` feature (the Redis store).
macro_rules! cfg_redis {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "redis")]
            #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
            $item
        )*
    };
}

/// Items built with any of the `mysql`, `postgres` and `sqlite` features (what the SQL stores share).
macro_rules! cfg_sql {
    ($($item:item)*) => {
        $(
            #[cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))]
            #[cfg_attr(docsrs, doc(cfg(any(feature = "mysql", feature = "postgres", feature = "sqlite"))))]
            $item
        )*
    };
}

/// Items built with the `mysql` feature.
macro_rules! cfg_mysql {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "mysql")]
            #[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
            $item
        )*
    };
}

/// Items built with the `postgres` feature.
macro_rules! cfg_postgres {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "postgres")]
            #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
            $item
        )*
    };
}

/// Items built with the `sqlite` feature.
macro_rules! cfg_sqlite {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "sqlite")]
            #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
            $item
        )*
    };
}

/// Items built with the `testing` feature.
macro_rules! cfg_testing {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "testing")]
            #[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
            $item
        )*
    };
}

/// Items built with the `tower` feature (the HTTP layer).
macro_rules! cfg_tower {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "tower")]
            #[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
            $item
        )*
    };
}

/// Items built with the `kafka` feature.
macro_rules! cfg_kafka {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "kafka")]
            #[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
            $item
        )*
    };
}

/// Items built with the `amqp` feature.
macro_rules! cfg_amqp {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "amqp")]
            #[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
            $item
        )*
    };
}

/// Items built with the `rocketmq` feature.
macro_rules! cfg_rocketmq {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "rocketmq")]
            #[cfg_attr(docsrs, doc(cfg(feature = "rocketmq")))]
            $item
        )*
    };
}

/// Items built with the `redis-streams` feature.
macro_rules! cfg_redis_streams {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "redis-streams")]
            #[cfg_attr(docsrs, doc(cfg(feature = "redis-streams")))]
            $item
        )*
    };
}

/// Items built with the `nats` feature.
macro_rules! cfg_nats {
    ($($item:item)*) => {
        $(
            #[cfg(feature = "nats")]
            #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
            $item
        )*
    };
}
