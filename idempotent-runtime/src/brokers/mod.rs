//! The message brokers, one file each: what a broker's message is deduplicated by and
//! how an outcome settles it, each behind its cargo feature.

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
