//! The outbox's publishers end to end, one broker each, on real servers (NATS
//! JetStream, RabbitMQ, Redis) or in-process ones (librdkafka's mock cluster, the
//! embedded RocketMQ): each test publishes messages through the publisher, reads them
//! back with the broker's own client, and checks that the id is in the broker's dedup
//! field and that the headers, payload and ordering key arrive intact; then provokes a
//! refusal (`Rejected`) and an outage (`Unavailable`). On NATS, the same message is
//! published twice and the stream stores it once.
//!
//! Each broker's test is built with the tests crate's feature of that broker; a server
//! that is missing fails the test, naming it.

#![allow(clippy::unwrap_used)]
// the RocketMQ client's futures are deeply nested types
#![recursion_limit = "512"]

use idempotent_runtime::RecordKey;
use idempotent_runtime::outbox::{Emission, OutgoingMessage, PublishErrorKind, message_id};

/// A payload that is not UTF-8 and holds a NUL: bytes must arrive unchanged.
fn payload(i: usize) -> Vec<u8> {
    let mut p = vec![0xff, 0x00, 0xfe];
    p.extend_from_slice(format!("{{\"order\":{i}}}").as_bytes());
    p
}

/// Messages as a handler would emit them: stable ids from a record key, headers (one
/// repeated when `repeat`), every other one with an ordering key; messages 1 and 3
/// share the key `customer-1`.
fn messages(run: &str, destination: &str, n: usize, repeat: bool) -> Vec<OutgoingMessage> {
    (0..n)
        .map(|i| {
            let key = RecordKey::new("outbox-publishers", &format!("{run}-{i}")).unwrap();
            let mut m = OutgoingMessage::new(
                message_id(&key, Emission::Position(0)),
                destination,
                payload(i),
            )
            .with_header("content-type", "application/json")
            .with_header("trace", format!("t-{i}"));
            if repeat {
                m = m.with_header("tag", "a").with_header("tag", "b");
            }
            if i % 2 == 1 {
                m = m.with_ordering_key("customer-1");
            }
            m
        })
        .collect()
}

#[cfg(feature = "nats")]
mod nats {
    use super::*;
    use futures_util::StreamExt;
    use idempotent_runtime::nats::async_nats::jetstream::consumer::pull;
    use idempotent_runtime::nats::async_nats::jetstream::{self, stream};
    use idempotent_runtime::nats::{JetStreamPublisher, MESSAGE_ID_HEADER, ORDERING_KEY_HEADER};
    use idempotent_runtime::outbox::Publisher;
    use idempotent_tests::nats_support::{connect, nats_url, run_id};
    use idempotent_tests::proxy::{Proxy, Wire};
    use std::time::Duration;

    #[tokio::test]
    async fn jetstream_carries_the_id_in_nats_msg_id_and_drops_a_repeat() {
        let (_client, js) = connect("outbox-publishers").await;
        let run = run_id();
        let name = format!("OUTBOX_{run}");
        let subject = format!("outbox.{run}.payments");
        let mut stream = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("outbox.{run}.>")],
                ..Default::default()
            })
            .await
            .expect("create the stream");
        assert!(
            stream.info().await.unwrap().config.duplicate_window > Duration::from_secs(10),
            "the stream has a duplicate window"
        );
        let publisher = JetStreamPublisher::new(js.clone());
        let sent = messages(&run, &subject, 4, true);
        for m in &sent {
            publisher.publish(m).await.expect("publish");
        }
        // the relay publishes message 2 again (it crashed before marking it sent)
        let again = publisher
            .publish_acked(&sent[2])
            .await
            .expect("publish again");
        assert!(
            again.duplicate,
            "the stream recognised the repeat: {again:?}"
        );
        publisher
            .publish(&sent[2])
            .await
            .expect("a repeat is confirmed");
        let info = stream.info().await.unwrap();
        assert_eq!(info.state.messages, 4, "each message stored once");

        // read through a consumer (the stream's get-message API keeps only the last
        // value of a repeated header name when it parses the headers)
        let consumer = stream
            .create_consumer(pull::Config::default())
            .await
            .expect("a consumer");
        let mut batch = consumer
            .fetch()
            .max_messages(10)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        let mut got = Vec::new();
        while let Some(m) = batch.next().await {
            got.push(m.expect("a message"));
        }
        assert_eq!(got.len(), sent.len(), "each message delivered once");
        for (i, (got, m)) in got.iter().zip(&sent).enumerate() {
            let h = got.headers.as_ref().expect("headers");
            assert_eq!(got.subject.as_str(), subject);
            assert_eq!(
                h.get(MESSAGE_ID_HEADER).map(|v| v.as_str().to_owned()),
                Some(m.id().to_string()),
                "the id in Nats-Msg-Id"
            );
            assert_eq!(
                h.get(ORDERING_KEY_HEADER).map(|v| v.as_str()),
                m.ordering_key()
            );
            assert_eq!(
                h.get("content-type").map(|v| v.as_str()),
                Some("application/json")
            );
            assert_eq!(
                h.get("trace").map(|v| v.as_str().to_owned()),
                Some(format!("t-{i}"))
            );
            let tags: Vec<&str> = h.get_all("tag").map(|v| v.as_str()).collect();
            assert_eq!(
                tags,
                ["a", "b"],
                "a repeated header keeps both values, in order"
            );
            assert_eq!(&got.payload[..], m.payload(), "payload unchanged");
        }

        // refusals: no stream captures the subject, a message over the stream's limit,
        // a reserved or invalid header
        let nowhere = OutgoingMessage::new(sent[0].id(), format!("nowhere.{run}"), b"x".to_vec());
        let e = publisher.publish(&nowhere).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        let small = format!("OUTBOX_SMALL_{run}");
        js.create_stream(stream::Config {
            name: small.clone(),
            subjects: vec![format!("small.{run}")],
            max_message_size: 256,
            ..Default::default()
        })
        .await
        .expect("create the small stream");
        let big = OutgoingMessage::new(sent[0].id(), format!("small.{run}"), vec![7u8; 4096]);
        let e = publisher.publish(&big).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        let fits = OutgoingMessage::new(sent[0].id(), format!("small.{run}"), vec![7u8; 16]);
        publisher
            .publish(&fits)
            .await
            .expect("a message within the limit");
        for bad in [
            sent[0].clone().with_header("nats-msg-id", "other"),
            sent[0].clone().with_header("line", "a\r\nb"),
            sent[0].clone().with_header("bad:name", "v"),
        ] {
            let e = publisher.publish(&bad).await.unwrap_err();
            assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        }

        js.delete_stream(&name).await.unwrap();
        js.delete_stream(&small).await.unwrap();
    }

    #[tokio::test]
    async fn jetstream_out_of_reach_is_unavailable() {
        let (_client, js) = connect("outbox-publishers-outage").await;
        let run = run_id();
        let name = format!("OUTBOX_OUTAGE_{run}");
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("outage.{run}")],
            ..Default::default()
        })
        .await
        .expect("create the stream");
        let target = nats_url()
            .trim_start_matches("nats://")
            .trim_end_matches('/')
            .to_owned();
        let mut proxy = Proxy::start(&target, Wire::Raw).await;
        let client = idempotent_runtime::nats::async_nats::connect(format!(
            "nats://127.0.0.1:{}",
            proxy.port()
        ))
        .await
        .expect("connect through the proxy");
        let context = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(client);
        let publisher = JetStreamPublisher::new(context);
        let m = &messages(&run, &format!("outage.{run}"), 1, false)[0];
        publisher.publish(m).await.expect("through the proxy");
        proxy.cut().await;
        let e = publisher.publish(m).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable());
        js.delete_stream(&name).await.unwrap();
    }
}

#[cfg(feature = "redis-streams")]
mod redis_streams {
    use super::*;
    use idempotent_runtime::outbox::Publisher;
    use idempotent_runtime::redis;
    use idempotent_runtime::redis_streams::{
        Idmp, MESSAGE_ID_FIELD, ORDERING_KEY_FIELD, PAYLOAD_FIELD, StreamGroup, StreamPublisher,
        dedup_key,
    };
    use idempotent_tests::broker_support::run_id;
    use idempotent_tests::proxy::{Proxy, Wire};
    use idempotent_tests::redis_support::{raw, redis_url};

    type Entries = Vec<(String, Vec<Vec<u8>>)>;

    /// The server's version as (major, minor).
    async fn version(conn: &mut redis::aio::ConnectionManager) -> (u32, u32) {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(conn)
            .await
            .unwrap();
        let v = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .expect("redis_version in INFO");
        let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap())
    }

    #[tokio::test]
    async fn stream_entries_carry_the_id_in_the_message_id_field() {
        let url = redis_url();
        let mut conn = raw(&url).await;
        let run = run_id();
        let stream = format!("outbox-publishers:{run}");
        let publisher = StreamPublisher::new(conn.clone());
        // IDMP where the server has it (Redis 8.6+); the plain XADD on older ones
        let expected_idmp = version(&mut conn).await >= (8, 6);
        assert_eq!(
            publisher.idmp_supported().await.unwrap(),
            expected_idmp,
            "IDMP detected from the server"
        );

        let sent = messages(&run, &stream, 4, true);
        for m in &sent {
            publisher.publish(m).await.expect("publish");
        }
        // the relay publishes message 2 again
        publisher.publish(&sent[2]).await.expect("publish again");

        let entries: Entries = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let stored = if expected_idmp { 4 } else { 5 };
        assert_eq!(
            entries.len(),
            stored,
            "with IDMP the repeat is dropped; without, it is a second entry"
        );
        for (i, (_, fields)) in entries.iter().enumerate() {
            let m = &sent[if i == 4 { 2 } else { i }];
            let mut expected: Vec<Vec<u8>> = vec![
                MESSAGE_ID_FIELD.into(),
                m.id().to_string().into(),
                PAYLOAD_FIELD.into(),
                m.payload().to_vec(),
            ];
            if let Some(k) = m.ordering_key() {
                expected.extend([ORDERING_KEY_FIELD.into(), k.into()]);
            }
            for (n, v) in m.headers() {
                expected.extend([n.clone().into_bytes(), v.clone().into_bytes()]);
            }
            assert_eq!(fields, &expected, "entry {i}: the fields, in order");
        }
        // a consumer group reads the id as its dedup key
        let group = StreamGroup::new(&stream, "billing", "c1");
        group.create(&mut conn).await.unwrap();
        let read = group.read(&mut conn).await.unwrap();
        assert_eq!(read.len(), stored);
        for (entry, m) in read.iter().zip(&sent) {
            assert_eq!(
                dedup_key(entry, MESSAGE_ID_FIELD),
                Some(m.id().to_string().as_bytes())
            );
        }

        // the plain XADD, asked for: no IDMP, every publish an entry
        let plain_stream = format!("outbox-publishers:{run}:plain");
        let plain = StreamPublisher::new(conn.clone()).idmp(Idmp::Off);
        assert!(!plain.idmp_supported().await.unwrap());
        let m = OutgoingMessage::new(sent[0].id(), &plain_stream, b"p".to_vec());
        plain.publish(&m).await.unwrap();
        plain.publish(&m).await.unwrap();
        let n: usize = redis::cmd("XLEN")
            .arg(&plain_stream)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 2);

        // refusals: the key holds a string; a header named like a field of the publisher
        let string_key = format!("outbox-publishers:{run}:string");
        let _: () = redis::cmd("SET")
            .arg(&string_key)
            .arg("x")
            .query_async(&mut conn)
            .await
            .unwrap();
        let e = publisher
            .publish(&OutgoingMessage::new(
                sent[0].id(),
                &string_key,
                b"p".to_vec(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        for name in ["message-id", "Payload", "ordering-key"] {
            let e = publisher
                .publish(&sent[0].clone().with_header(name, "x"))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        }

        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .arg(&plain_stream)
            .arg(&string_key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn stream_out_of_reach_is_unavailable() {
        let url = redis_url();
        let target = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let mut proxy = Proxy::start(&target, Wire::Raw).await;
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", proxy.port())).unwrap();
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} through a proxy: {e}"));
        let run = run_id();
        let stream = format!("outbox-publishers:{run}:outage");
        let publisher = StreamPublisher::new(conn);
        publisher
            .idmp_supported()
            .await
            .expect("asked once, before the cut");
        let m = &messages(&run, &stream, 1, false)[0];
        publisher.publish(m).await.expect("through the proxy");
        proxy.cut().await;
        let e = publisher.publish(m).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Unavailable, "{e}");
        let mut direct = raw(&url).await;
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .query_async(&mut direct)
            .await
            .unwrap();
    }
}

#[cfg(feature = "amqp")]
mod amqp {
    use super::*;
    use idempotent_runtime::amqp::lapin::options::{
        BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use idempotent_runtime::amqp::lapin::types::{AMQPValue, FieldTable};
    use idempotent_runtime::amqp::lapin::{
        Channel, Connection, ConnectionProperties, ExchangeKind,
    };
    use idempotent_runtime::amqp::{self, AmqpPublisher, ORDERING_KEY_HEADER};
    use idempotent_runtime::outbox::Publisher;
    use idempotent_tests::broker_support::run_id;
    use idempotent_tests::proxy::{Proxy, Wire};
    use std::sync::Arc;
    use std::time::Duration;

    const URL_VAR: &str = "IDEMPOTENT_AMQP_URL";

    fn amqp_url() -> String {
        std::env::var(URL_VAR).unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    async fn connect(url: &str) -> Connection {
        Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the RabbitMQ tests need a server at {url} \
                     (`rabbitmq-server -detached`; set {URL_VAR} to use another): {e}"
                )
            })
    }

    async fn declare_queue(ch: &Channel, queue: &str) {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the queue");
    }

    fn long_string(v: &AMQPValue) -> Option<String> {
        match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn rabbitmq_carries_the_id_in_message_id_with_confirms() {
        let conn = Arc::new(connect(&amqp_url()).await);
        let admin = conn.create_channel().await.expect("channel");
        let run = run_id();
        let queue = format!("idempotent.outbox.{run}");
        declare_queue(&admin, &queue).await;
        let publisher = AmqpPublisher::new(conn.clone()).confirm_timeout(Duration::from_secs(10));
        let sent = messages(&run, &queue, 4, true);
        for m in &sent {
            publisher.publish(m).await.expect("publish");
        }
        for m in &sent {
            let got = admin
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
                .expect("a message")
                .delivery;
            let id = m.id().to_string();
            assert_eq!(
                amqp::message_id(&got),
                Some(id.as_str()),
                "the id in message_id"
            );
            assert_eq!(
                amqp::dedup_key(&got, "no-such-header"),
                amqp::DedupKey::MessageId(&id)
            );
            assert_eq!(*got.properties.delivery_mode(), Some(2), "persistent");
            let headers = got.properties.headers().clone().expect("headers");
            let h = headers.inner();
            assert_eq!(
                h.get(ORDERING_KEY_HEADER).and_then(long_string).as_deref(),
                m.ordering_key()
            );
            for (name, value) in m.headers().iter().filter(|(n, _)| n != "tag") {
                assert_eq!(
                    h.get(name.as_str()).and_then(long_string).as_ref(),
                    Some(value)
                );
            }
            match h.get("tag") {
                Some(AMQPValue::FieldArray(a)) => {
                    let tags: Vec<String> = a.as_slice().iter().filter_map(long_string).collect();
                    assert_eq!(tags, ["a", "b"], "a repeated header: its values, in order");
                }
                other => panic!("the repeated header as an array, got {other:?}"),
            }
            assert_eq!(got.data, m.payload(), "payload unchanged");
        }

        // refusals: no queue for the routing key (returned, mandatory), a reserved header
        let e = publisher
            .publish(&OutgoingMessage::new(
                sent[0].id(),
                format!("idempotent.outbox.{run}.nowhere"),
                b"x".to_vec(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        let e = publisher
            .publish(&sent[0].clone().with_header("Ordering-Key", "x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");

        // an exchange that is gone: the broker closes the channel (404), Rejected; once
        // the exchange is back the publisher goes on, on a new channel
        let exchange = format!("idempotent.outbox.{run}.x");
        let declare_exchange = async || {
            admin
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("declare the exchange");
            admin
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "pay".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind");
        };
        declare_exchange().await;
        let via_exchange = AmqpPublisher::new(conn.clone())
            .exchange(&exchange)
            .unwrap()
            .confirm_timeout(Duration::from_secs(10));
        let pay = OutgoingMessage::new(sent[0].id(), "pay", b"through the exchange".to_vec());
        via_exchange
            .publish(&pay)
            .await
            .expect("through the exchange");
        admin
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        let e = via_exchange.publish(&pay).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        assert!(e.to_string().contains("NOT_FOUND"), "{e}");
        declare_exchange().await;
        via_exchange
            .publish(&pay)
            .await
            .expect("on a new channel once the exchange is back");
        let mut through = 0;
        while let Some(m) = admin
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            assert_eq!(m.delivery.data, b"through the exchange");
            through += 1;
        }
        assert_eq!(
            through, 2,
            "the two confirmed publishes arrived, nothing else"
        );

        admin
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        admin
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn rabbitmq_out_of_reach_is_unavailable() {
        let url = amqp_url();
        let run = run_id();
        let queue = format!("idempotent.outbox.{run}.outage");
        let direct = connect(&url).await;
        let admin = direct.create_channel().await.unwrap();
        declare_queue(&admin, &queue).await;
        let host = url
            .rsplit_once('@')
            .map_or("127.0.0.1:5672", |(_, h)| h)
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let mut proxy = Proxy::start(&host, Wire::Raw).await;
        let proxied = url.replace(&host, &format!("127.0.0.1:{}", proxy.port()));
        let conn = Arc::new(connect(&proxied).await);
        let publisher = AmqpPublisher::new(conn).confirm_timeout(Duration::from_secs(2));
        let m = &messages(&run, &queue, 1, false)[0];
        publisher.publish(m).await.expect("through the proxy");
        proxy.cut().await;
        let e = publisher.publish(m).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Unavailable, "{e}");
        admin
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use idempotent_runtime::kafka::rdkafka::Message;
    use idempotent_runtime::kafka::rdkafka::config::ClientConfig;
    use idempotent_runtime::kafka::rdkafka::consumer::{Consumer, StreamConsumer};
    use idempotent_runtime::kafka::rdkafka::message::Headers;
    use idempotent_runtime::kafka::rdkafka::mocking::MockCluster;
    use idempotent_runtime::kafka::{self, KafkaPublisher, MESSAGE_ID_HEADER};
    use idempotent_runtime::outbox::Publisher;
    use idempotent_tests::broker_support::run_id;
    use std::time::Duration;

    fn producer_config(bootstrap: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap);
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_carries_the_id_in_a_header_and_the_ordering_key_as_record_key() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let bootstrap = mock.bootstrap_servers();
        let run = run_id();
        let topic = format!("outbox-{run}");
        mock.create_topic(&topic, 4, 1).expect("topic");

        let publisher = KafkaPublisher::from_config(&producer_config(&bootstrap)).unwrap();
        // messages 1, 3 and 5 share the ordering key customer-1
        let sent = messages(&run, &topic, 6, true);
        for m in &sent {
            publisher.publish(m).await.expect("publish");
        }

        let consumer: StreamConsumer = producer_config(&bootstrap)
            .set("group.id", format!("outbox-{run}"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).unwrap();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("every message consumed within 30 s")
                .expect("a record");
            got.push(m.detach());
        }
        let mut customer_1 = Vec::new();
        for m in &sent {
            let id = m.id().to_string();
            let r = got
                .iter()
                .find(|r| kafka::header(*r, MESSAGE_ID_HEADER) == Some(id.as_bytes()))
                .unwrap_or_else(|| panic!("{id} consumed, in the message-id header"));
            assert_eq!(
                kafka::dedup_key(r, MESSAGE_ID_HEADER),
                kafka::DedupKey::Header(id.as_bytes())
            );
            assert_eq!(r.key(), m.ordering_key().map(str::as_bytes), "record key");
            assert_eq!(r.payload(), Some(m.payload()), "payload unchanged");
            let headers: Vec<(String, String)> = r
                .headers()
                .expect("headers")
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                    )
                })
                .collect();
            let mut expected = vec![(MESSAGE_ID_HEADER.to_owned(), id.clone())];
            expected.extend(m.headers().iter().cloned());
            assert_eq!(headers, expected, "the headers, in order, repeats kept");
            if m.ordering_key().is_some() {
                customer_1.push((r.partition(), r.offset()));
            }
        }
        assert_eq!(customer_1.len(), 3);
        assert!(
            customer_1.iter().all(|(p, _)| *p == customer_1[0].0),
            "one ordering key, one partition: {customer_1:?}"
        );
        assert!(
            customer_1.windows(2).all(|w| w[0].1 < w[1].1),
            "in emission order: {customer_1:?}"
        );

        // refusals: a record over the producer's message.max.bytes; a reserved header
        let small = KafkaPublisher::from_config(
            producer_config(&bootstrap).set("message.max.bytes", "1000"),
        )
        .unwrap();
        let big = OutgoingMessage::new(sent[0].id(), &topic, vec![7u8; 5000]);
        let e = small.publish(&big).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        let e = publisher
            .publish(&sent[0].clone().with_header("Message-Id", "x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        // the idempotent producer cannot be switched off through from_config
        assert!(
            KafkaPublisher::from_config(
                producer_config(&bootstrap).set("enable.idempotence", "false")
            )
            .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_broker_down_is_unavailable() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let bootstrap = mock.bootstrap_servers();
        let run = run_id();
        let topic = format!("outbox-{run}");
        mock.create_topic(&topic, 1, 1).expect("topic");
        let publisher = KafkaPublisher::from_config(
            producer_config(&bootstrap).set("message.timeout.ms", "2000"),
        )
        .unwrap();
        let m = &messages(&run, &topic, 1, false)[0];
        publisher
            .publish(m)
            .await
            .expect("publish while the broker is up");
        mock.broker_down(-1).unwrap();
        let e = publisher.publish(m).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Unavailable, "{e}");
    }
}

#[cfg(feature = "rocketmq")]
mod rocketmq {
    use super::*;
    use idempotent_runtime::outbox::Publisher;
    use idempotent_runtime::rocketmq::{DedupKey, RocketMqPublisher, dedup_key};
    use idempotent_tests::broker_support::run_id;
    use idempotent_tests::rocketmq_support::EmbeddedRocketMq;
    use rocketmq_client_rust::{
        ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQProducer,
        DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
    };
    use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
    use rocketmq_model::common::message::message_ext::MessageExt;
    use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// What the test reads of a consumed message.
    #[derive(Debug, Clone)]
    struct Got {
        keys: Option<String>,
        dedup: Option<String>,
        sharding_key: Option<String>,
        headers: Vec<(String, Option<String>)>,
        body: Vec<u8>,
        queue_id: i32,
    }

    struct Collect(Arc<Mutex<Vec<Got>>>);

    impl MessageListenerConcurrently for Collect {
        fn consume_message(
            &self,
            msgs: &[&MessageExt],
            _context: &ConsumeConcurrentlyContext,
        ) -> ClientResult<ConsumeConcurrentlyStatus> {
            for m in msgs {
                let inner = m.message_inner();
                let prop = |name: &str| inner.property(name).map(str::to_owned);
                self.0.lock().unwrap().push(Got {
                    keys: prop("KEYS"),
                    dedup: match dedup_key(m) {
                        DedupKey::Business(k) => Some(k.to_owned()),
                        _ => None,
                    },
                    sharding_key: prop("__SHARDINGKEY"),
                    headers: ["content-type", "trace"]
                        .iter()
                        .map(|h| (h.to_string(), prop(h)))
                        .collect(),
                    body: m.body().map(|b| b.to_vec()).unwrap_or_default(),
                    queue_id: m.queue_id(),
                });
            }
            Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn rocketmq_carries_the_id_in_keys_and_the_ordering_key_selects_the_queue() {
        let mq = EmbeddedRocketMq::start("outbox-publishers").await;
        let run = run_id();
        let topic = format!("OutboxPayments{run}");
        let mut producer = DefaultMQProducer::builder(mq.client_runtime("producer"))
            .producer_group(format!("outbox_producer_{run}"))
            .name_server_addr(mq.namesrv_addr.clone())
            .build();
        producer.start().await.expect("start the producer");
        let publisher = RocketMqPublisher::new(producer.clone());

        // messages 1, 3 and 5 share the ordering key customer-1; no repeated header
        // (properties are a map)
        let sent = messages(&run, &topic, 6, false);
        let mut queues = Vec::new();
        for m in &sent {
            let r = publisher.publish_sent(m).await.expect("publish");
            if m.ordering_key().is_some() {
                queues.push(r.message_queue.expect("the queue").queue_id());
            }
        }
        assert!(
            queues.iter().all(|q| *q == queues[0]),
            "one ordering key, one queue: {queues:?}"
        );

        let got = Arc::new(Mutex::new(Vec::new()));
        let mut consumer = DefaultMQPushConsumer::builder(mq.client_runtime("consumer"))
            .consumer_group(format!("outbox_consumer_{run}"))
            .name_server_addr(mq.namesrv_addr.clone())
            .message_model(MessageModel::Clustering)
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .build();
        consumer.subscribe(&topic, "*").await.expect("subscribe");
        consumer.register_message_listener_concurrently(Collect(got.clone()));
        consumer.start().await.expect("start the consumer");
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.lock().unwrap().len() < sent.len() {
            assert!(
                Instant::now() < deadline,
                "every message consumed within 60 s: {:?}",
                got.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = got.lock().unwrap().clone();
        for (i, m) in sent.iter().enumerate() {
            let id = m.id().to_string();
            let g = got
                .iter()
                .find(|g| g.keys.as_deref() == Some(id.as_str()))
                .unwrap_or_else(|| panic!("{id} consumed, as the message's keys: {got:?}"));
            assert_eq!(g.dedup.as_deref(), Some(id.as_str()), "rocketmq::dedup_key");
            assert_eq!(g.sharding_key.as_deref(), m.ordering_key());
            assert_eq!(
                g.headers,
                [
                    (
                        "content-type".to_owned(),
                        Some("application/json".to_owned())
                    ),
                    ("trace".to_owned(), Some(format!("t-{i}")))
                ]
            );
            assert_eq!(g.body, m.payload(), "payload unchanged");
            if m.ordering_key().is_some() {
                assert_eq!(g.queue_id, queues[0]);
            }
        }

        // refusals: a header named like a reserved property, an empty body, a topic
        // the client does not take
        let e = publisher
            .publish(&OutgoingMessage::new(
                sent[0].id(),
                "no spaces",
                b"x".to_vec(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        let e = publisher
            .publish(&sent[0].clone().with_header("KEYS", "other"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");
        let e = publisher
            .publish(&OutgoingMessage::new(sent[0].id(), &topic, Vec::new()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Rejected, "{e}");

        consumer.shutdown().await;
        // the broker gone: Unavailable
        let mut mq = mq;
        mq.stop_broker().await;
        let e = publisher.publish(&sent[0]).await.unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Unavailable, "{e}");
        // the producer shut down: Unavailable too (its state, not the message)
        producer.shutdown().await;
        for m in &sent[..2] {
            // with and without an ordering key
            let e = publisher.publish(m).await.unwrap_err();
            assert_eq!(e.kind(), PublishErrorKind::Unavailable, "{e}");
        }
        mq.shutdown().await;
    }
}
