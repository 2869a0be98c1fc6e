//! [`StreamPublisher`]: outgoing messages appended to a stream with `XADD`, the id in
//! the `message-id` field (and `XADD … IDMP` where the server has it).

use crate::outbox::{OutgoingMessage, PublishError, PublishErrorKind, Publisher};
use async_trait::async_trait;
use redis::aio::ConnectionLike;
use redis::{RedisError, Value};
use std::fmt;
use tokio::sync::OnceCell;

/// The field that carries [`OutgoingMessage::id`]; a consumer reads it with
/// `redis_streams::dedup_key(&entry, MESSAGE_ID_FIELD)`.
pub const MESSAGE_ID_FIELD: &str = "message-id";

/// The field that carries the payload.
pub const PAYLOAD_FIELD: &str = "payload";

/// The field that carries [`OutgoingMessage::ordering_key`].
pub const ORDERING_KEY_FIELD: &str = "ordering-key";

/// The producer id `XADD … IDMP` is given unless [`StreamPublisher::producer_id`] says
/// otherwise.
pub const DEFAULT_PRODUCER_ID: &str = "idempotent-outbox";

/// Whether [`StreamPublisher`] uses `XADD … IDMP` (Redis 8.6+).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Idmp {
    /// Asks the server once (`COMMAND DOCS XADD`) whether `XADD` takes `IDMP`, and uses
    /// it when it does.
    #[default]
    Detect,
    /// Never uses it: a plain `XADD`.
    Off,
}

/// Appends outgoing messages to Redis streams with `XADD <stream> * …`: the message's
/// destination is the stream's key, and the entry's fields are, in order:
///
/// | field | value |
/// | --- | --- |
/// | `message-id` | [`OutgoingMessage::id`], hyphenated |
/// | `payload` | the payload bytes, unchanged |
/// | `ordering-key` | the ordering key, when the message has one |
/// | each header's name | its value, in the message's order (a name may repeat: a stream entry keeps both, a reader that maps fields by name keeps one) |
///
/// A header named like one of the first three fields is `Rejected`.
///
/// # The confirmation
///
/// [`publish`](Publisher::publish) returns once `XADD` replied with the entry's id: the
/// entry is in the server's memory, and on disk as the server's persistence
/// (`appendfsync`) and replication (`WAIT`, not sent here) make it.
///
/// # The dedup
///
/// From Redis 8.6, `XADD … IDMP <producer> <iid>` drops an entry whose idempotent id
/// the stream has recorded for that producer and answers with the first entry's id. The
/// publisher sends the message id as the idempotent id, with one producer id for every
/// relay ([`DEFAULT_PRODUCER_ID`]), so a message any relay publishes again is dropped.
/// The stream remembers the ids for `IDMP-DURATION` seconds, at most `IDMP-MAXSIZE` per
/// producer (100 s and 100 ids by default: raise them with `XCFGSET <stream>
/// IDMP-DURATION 86400 IDMP-MAXSIZE 10000`). On a server without `IDMP` (detected once,
/// [`idmp_supported`](StreamPublisher::idmp_supported)), a plain `XADD` is sent: a
/// message published again is a second entry with the same `message-id` field, which a
/// consumer keyed by it answers from its store. Either way the `message-id` field is
/// there, so consumers do not depend on the server's version.
///
/// # Errors
///
/// | what happened | [`PublishErrorKind`] |
/// | --- | --- |
/// | the key holds another type (`WRONGTYPE`), the command refused (`ERR …`, `NOPERM`), a reserved header name | `Rejected` |
/// | the connection lost, refused or timed out, the server loading, read-only, out of memory, a cluster redirection or outage, any other error | `Unavailable` |
///
/// ```no_run
/// use idempotent_runtime::redis::aio::ConnectionManager;
/// use idempotent_runtime::redis_streams::StreamPublisher;
/// use idempotent_runtime::outbox::{OutgoingMessage, Publisher, Uuid};
///
/// # async fn run(conn: ConnectionManager) -> Result<(), Box<dyn std::error::Error>> {
/// let publisher = StreamPublisher::new(conn);
/// let message = OutgoingMessage::new(Uuid::from_u128(7), "payments", b"o-17".to_vec())
///     .with_header("content-type", "text/plain")
///     .with_ordering_key("customer-4");
/// publisher.publish(&message).await?;
/// # Ok(())
/// # }
/// ```
pub struct StreamPublisher<C> {
    conn: C,
    idmp: Idmp,
    producer: String,
    supported: OnceCell<bool>,
}

impl<C> fmt::Debug for StreamPublisher<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamPublisher")
            .field("idmp", &self.idmp)
            .field("producer", &self.producer)
            .field("idmp_supported", &self.supported.get())
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> StreamPublisher<C> {
    /// A publisher on this connection (a `ConnectionManager` or a multiplexed
    /// connection, cloned for each publish), using `IDMP` where the server has it.
    pub fn new(conn: C) -> Self {
        StreamPublisher {
            conn,
            idmp: Idmp::Detect,
            producer: DEFAULT_PRODUCER_ID.to_owned(),
            supported: OnceCell::new(),
        }
    }

    /// Whether to use `XADD … IDMP`.
    pub fn idmp(mut self, idmp: Idmp) -> Self {
        self.idmp = idmp;
        self
    }

    /// The producer id of `XADD … IDMP` ([`DEFAULT_PRODUCER_ID`] by default). Every relay
    /// that may publish the same messages must use the same one: the stream drops a
    /// repeat only within one producer's ids.
    pub fn producer_id(mut self, producer: impl Into<String>) -> Self {
        self.producer = producer.into();
        self
    }

    /// Whether the publisher sends `XADD … IDMP`: `false` with [`Idmp::Off`]; else
    /// whether the server's `COMMAND DOCS XADD` lists `IDMP`, asked once and remembered
    /// (a server without `COMMAND DOCS`, before Redis 7, has no `IDMP` either).
    ///
    /// # Errors
    /// The connection's, when the server could not be asked (nothing is remembered then).
    pub async fn idmp_supported(&self) -> Result<bool, RedisError> {
        if self.idmp == Idmp::Off {
            return Ok(false);
        }
        self.supported
            .get_or_try_init(|| async {
                let mut conn = self.conn.clone();
                let docs: Result<Value, RedisError> = redis::cmd("COMMAND")
                    .arg("DOCS")
                    .arg("XADD")
                    .query_async(&mut conn)
                    .await;
                match docs {
                    Ok(docs) => Ok(mentions_idmp(&docs)),
                    // the server answered: it has no COMMAND DOCS, so no IDMP either
                    Err(e) if e.code().is_some() => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await
            .copied()
    }
}

#[async_trait]
impl<C: ConnectionLike + Clone + Send + Sync + 'static> Publisher for StreamPublisher<C> {
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        if message.destination().is_empty() {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                "the message has an empty destination (a stream's key)",
            ));
        }
        let reserved = [MESSAGE_ID_FIELD, PAYLOAD_FIELD, ORDERING_KEY_FIELD];
        if let Some((name, _)) = message
            .headers()
            .iter()
            .find(|(n, _)| reserved.iter().any(|r| r.eq_ignore_ascii_case(n)))
        {
            return Err(PublishError::new(
                PublishErrorKind::Rejected,
                format!("the header {name:?} is reserved: the publisher sets the field"),
            ));
        }
        let idmp = self
            .idmp_supported()
            .await
            .map_err(|e| classify(message, e))?;
        let id = message.id().to_string();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(message.destination());
        if idmp {
            cmd.arg("IDMP").arg(&self.producer).arg(&id);
        }
        cmd.arg("*")
            .arg(MESSAGE_ID_FIELD)
            .arg(&id)
            .arg(PAYLOAD_FIELD)
            .arg(message.payload());
        if let Some(key) = message.ordering_key() {
            cmd.arg(ORDERING_KEY_FIELD).arg(key);
        }
        for (name, value) in message.headers() {
            cmd.arg(name).arg(value);
        }
        let mut conn = self.conn.clone();
        let _entry: Value = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| classify(message, e))?;
        Ok(())
    }
}

/// Whether a `COMMAND DOCS` reply names the `IDMP` argument anywhere.
fn mentions_idmp(v: &Value) -> bool {
    match v {
        Value::BulkString(b) => b.eq_ignore_ascii_case(b"idmp"),
        Value::SimpleString(s) => s.eq_ignore_ascii_case("idmp"),
        Value::Array(items) | Value::Set(items) => items.iter().any(mentions_idmp),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| mentions_idmp(k) || mentions_idmp(v)),
        _ => false,
    }
}

fn classify(message: &OutgoingMessage, e: RedisError) -> PublishError {
    let kind = match e.code() {
        Some("WRONGTYPE" | "NOPERM" | "ERR") => PublishErrorKind::Rejected,
        _ => PublishErrorKind::Unavailable,
    };
    PublishError::new(
        kind,
        format!(
            "XADD of {} to {:?}: {e}",
            message.id(),
            message.destination()
        ),
    )
    .with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idmp_is_found_in_a_docs_reply_of_either_protocol() {
        let resp2 = Value::Array(vec![
            Value::BulkString(b"xadd".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"arguments".to_vec()),
                Value::Array(vec![Value::Array(vec![
                    Value::BulkString(b"name".to_vec()),
                    Value::BulkString(b"idmp".to_vec()),
                    Value::BulkString(b"token".to_vec()),
                    Value::BulkString(b"IDMP".to_vec()),
                ])]),
            ]),
        ]);
        assert!(mentions_idmp(&resp2));
        let resp3 = Value::Map(vec![(
            Value::SimpleString("xadd".into()),
            Value::Map(vec![(
                Value::SimpleString("token".into()),
                Value::SimpleString("IDMP".into()),
            )]),
        )]);
        assert!(mentions_idmp(&resp3));
        let old = Value::Array(vec![
            Value::BulkString(b"xadd".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"token".to_vec()),
                Value::BulkString(b"NOMKSTREAM".to_vec()),
            ]),
        ]);
        assert!(!mentions_idmp(&old));
    }
}
