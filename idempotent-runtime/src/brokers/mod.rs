//! The message brokers, one folder each, behind its cargo feature: what a broker's
//! message is deduplicated by and how an outcome settles it (`mod.rs`), and the outbox's
//! publisher to it (`publisher.rs`).

cfg_kafka! {
    pub mod kafka;
}

cfg_amqp! {
    pub mod amqp;
}

cfg_rocketmq! {
    pub mod rocketmq;
}

cfg_redis_streams! {
    pub mod redis_streams;
}

cfg_nats! {
    pub mod nats;
}
