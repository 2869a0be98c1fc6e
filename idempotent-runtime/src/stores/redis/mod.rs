//! The Redis store: one Redis function (`FCALL`) per protocol step over one key,
//! records packed into one string per key, expiry and leases on the server's clock.

use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind};
use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

mod acked;
mod batch;
mod library;
mod replica_ack;
mod reply;
mod scan;
mod sentinel;
mod store_impl;

pub use replica_ack::ReplicaAck;
use sentinel::{SentinelConn, Single};

/// A dedup store in Redis (single node, a master found through Redis Sentinel, or Redis
/// Cluster), shared by every process that connects to the same server.
///
/// ```no_run
/// use idempotent_runtime::{idempotent, register_store, Error, RedisStore};
///
/// # async fn start() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// register_store("redis", store);
/// # Ok(()) }
///
/// #[idempotent(key = "id", store = "redis", ttl = "7d")]
/// async fn on_order_paid(id: &str) -> Result<u64, Error> {
///     Ok(42)
/// }
/// ```
///
/// `RedisStore` is a cheap [`Clone`] handle: clones share one multiplexed connection
/// (a [`ConnectionManager`], which reconnects on its own after the server or the network
/// comes back; on a cluster, a [`ClusterConnection`] with one connection per node).
/// There is no pool to size: requests from all tasks are pipelined on the connection.
///
/// # Protocol on the server
///
/// The store keeps its logic in one Redis function library (Redis Functions), loaded
/// with `FUNCTION LOAD` the first time a call finds it missing (a new server, a
/// restart without persistence, `FUNCTION FLUSH`, a node added to a cluster; on a
/// cluster it is loaded on every master at once). Each step — claim, complete,
/// release, renew, inspect — is one `FCALL` of one function over one key, atomic on
/// the server; [`forget`](crate::store::StoreAdmin::forget) is one `DEL`. No function touches a key it is
/// not given, so the store works on Redis Cluster unchanged. The library's name
/// carries a hash of its code (`idempotent_<hash>`), so processes running different
/// versions of the store never replace each other's functions (each version leaves its
/// own library on the server; `FUNCTION DELETE` removes an old one).
///
/// Inside each function, Redis commands are kept to the minimum a step needs:
///
/// | step | commands | writes |
/// | --- | --- | --- |
/// | claim of a new key | `GET`, `TIME`, `SET … PX` | 1 |
/// | claim of a completed key (a duplicate) | `GET` | none |
/// | claim refused (in progress, exhausted) | `GET`, `TIME` | none |
/// | claim taking over a released or expired record | `GET`, `TIME`, `PTTL`, `SET` | 1 |
/// | complete | `GET`, `SET … PX` | 1 |
/// | release | `GET`, `SET … KEEPTTL` | 1 |
/// | renew | `GET`, `TIME`, `PTTL`, `SET` | 1 |
/// | inspect | `GET`, `TIME`, `PTTL` | none |
///
/// A fenced-off complete, release or renew is a `GET` alone. A duplicate of a
/// completed key is answered, with its cached output, by the claim in one round trip.
///
/// Leases and expiry use the server's clock only (guarantee G5): the functions read
/// `TIME`, and the key's own expiry (`PX`) is the record's expiry, so Redis frees
/// expired records by itself and [`purge_expired`](crate::store::StoreAdmin::purge_expired) returns 0. The
/// store has no clock of its own; the consumers' clocks never enter a decision. Fencing
/// tokens are the larger of the record's previous token plus one and the server's
/// `TIME` in microseconds.
///
/// The batch methods ([`claim_batch`](crate::Store::claim_batch),
/// [`complete_batch`](crate::Store::complete_batch), [`release_batch`](crate::Store::release_batch))
/// send one `FCALL` of a batch function over many keys, which applies the single-key
/// step to each key in turn (each key's answer is exactly the single-key answer):
/// on a single node one call per 128 keys, on a cluster one call per hash slot, all
/// sent at once, so a batch is one round trip.
///
/// Requires Redis 7.0 or later (or Valkey 7.2 or later) for Redis Functions; an older
/// server refuses every step with [`StoreErrorKind::Rejected`].
///
/// # Keys
///
/// A record lives at `prefix ‖ escape(len(scope) ":" scope ":" key)`, where `prefix`
/// defaults to [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX) (`idem:`), `len(scope)` is the
/// scope's length in bytes in decimal and `key` is the encoded key of the
/// [`RecordKey`] (any bytes). The length makes the scope/key boundary unambiguous
/// (`("a:1", "x")` and `("a", "1:x")` are different keys). `escape` replaces `{` by
/// `FF 28`, `}` by `FF 29` and `FF` by `FF FF`, so no key carries a Redis Cluster hash
/// tag and records spread over all slots; a hash tag placed in the prefix on purpose
/// (`"idem:{orders}:"`) still pins all records to one slot. For example the key
/// `order-17` of the scope `orders` lives at `idem:6:orders:order-17`.
///
/// # Record layout
///
/// A record is one Redis string, big-endian, 16 bytes smaller than a hash with the same
/// fields. `MEMORY USAGE` on Redis 7, key `idem:6:orders:order-17` included: 104 bytes
/// in progress or completed with a small output (`42`), against 120 for a hash; 168
/// with a 32-byte fingerprint and a 33-byte output, against 184.
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 1 | tag and state: `E1` in progress, `E2` completed, `E3` released |
/// | 1 | 1 | flags: bit 0 a fingerprint follows, bit 1 an output follows |
/// | 2 | 4 | attempts claimed so far |
/// | 6 | 8 | fencing token of the latest claim |
/// | 14 | 8 | lease deadline, server time in µs since the epoch (0 unless in progress) |
/// | 22 | 4 | fingerprint length *n* (only with flag bit 0) |
/// | 26 | *n* | fingerprint (only with flag bit 0) |
/// | … | rest | cached output (only with flag bit 1) |
///
/// Lifetime: the key expires (`PX`) at the record's expiry — at least `max(ttl, lease)`
/// after a claim, the completion's `ttl` after a completion, unchanged by a release;
/// a renewal only ever extends it. A value that does not follow this layout (a string
/// someone `SET` there, a hash, a truncated record) makes every operation on that key
/// fail with [`StoreErrorKind::Corrupt`]; [`forget`](crate::store::StoreAdmin::forget) deletes it.
///
/// # TLS
///
/// `rediss://host:port` connects over TLS (rustls), verifying the server's certificate
/// against the Mozilla root certificates bundled with `webpki-roots`, for managed Redis
/// services with publicly trusted certificates. For a private certificate authority or
/// mutual TLS, build the client with [`redis::Client::build_with_tls`] and pass the
/// connection in:
///
/// ```no_run
/// use idempotent_runtime::redis::{self, aio::ConnectionManager, TlsCertificates};
/// use idempotent_runtime::RedisStore;
///
/// # async fn start() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::build_with_tls(
///     "rediss://redis.internal:6380",
///     TlsCertificates {
///         client_tls: None, // or Some(ClientTlsConfig { client_cert, client_key })
///         root_cert: Some(std::fs::read("ca.pem")?),
///     },
/// )?;
/// let store = RedisStore::from_connection_manager(ConnectionManager::new(client).await?);
/// # Ok(()) }
/// ```
///
/// The same way, [`connect_with_config`](Self::connect_with_config) takes
/// [`ConnectionManagerConfig`] settings (timeouts, reconnect backoff), and
/// [`from_cluster_connection`](Self::from_cluster_connection) a cluster connection
/// built with [`redis::cluster::ClusterClientBuilder`].
///
/// # Sentinel
///
/// [`connect`](Self::connect) with
/// `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master-name[/db]`
/// asks the listed Sentinels (port 26379 when left out) for the current master of
/// `master-name` and connects to it; `user` and `password` (percent-encoded) are those
/// of the Redis servers, `?sentinel_username=…&sentinel_password=…` those of the
/// Sentinels. `rediss+sentinel://` uses TLS to the Sentinels and to the master. The
/// store follows the master: when a request fails on the connection (the master died,
/// the network broke) or the server answers `READONLY` (it was demoted), that request
/// fails with [`StoreErrorKind::Unavailable`] and the next one asks Sentinel again.
///
/// # Replication and failover
///
/// Redis replicates asynchronously: a claim or a completion the master acknowledged
/// may not have reached a replica when the master fails. After a failover, a key whose
/// completion was lost is claimed again and its handler runs a second time; a key whose
/// claim was lost can be claimed by a second consumer while the first still runs. Three
/// settings narrow this window:
///
/// - `min-replicas-to-write n` with `min-replicas-max-lag s` on the master: the master
///   refuses writes (`NOREPLICAS`, a claim then fails closed with
///   [`StoreErrorKind::Unavailable`]) while fewer than `n` replicas are connected and
///   acknowledged within `s` seconds; writes in the last `s` seconds can still be lost.
/// - [`with_replica_ack`](Self::with_replica_ack): each claim and completion waits
///   (`WAIT`) until `n` replicas hold it. A handler runs only after its claim is on
///   `n` replicas; a completion that is not is reported
///   ([`StoreErrorKind::NotReplicated`], a warning, the `unrecorded` outcome). `WAIT`
///   does not make Redis strongly consistent: Sentinel may still promote a replica that
///   missed a write, if the replicas that got it are unreachable.
/// - `appendonly yes` (with `appendfsync always` or `everysec`) protects against the
///   loss of a restarted master's data, not against a failover to a replica.
///
/// # Errors
///
/// A connection that fails, times out or is being re-established gives
/// [`StoreErrorKind::Unavailable`] (retryable) with the `redis` error as its source.
/// Commands the server refuses (authentication, permissions, a server without Redis
/// Functions) give [`StoreErrorKind::Rejected`]. When a connection breaks after a
/// request was sent, the function may have run without its answer arriving: a claim answered that way frees
/// when its lease expires.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<[u8]>,
    replica_ack: Option<ReplicaAck>,
}

#[derive(Clone)]
enum Conn {
    Single(Single),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &match self.conn {
                    Conn::Single(Single::Manager(_)) => "single node",
                    Conn::Single(Single::Sentinel(_)) => "sentinel",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .field("prefix", &self.prefix.escape_ascii().to_string())
            .field("replica_ack", &self.replica_ack)
            .finish()
    }
}

impl RedisStore {
    /// The key prefix used unless [`with_prefix`](Self::with_prefix) sets another.
    pub const DEFAULT_PREFIX: &'static str = "idem:";

    /// Connects to a single Redis server (`redis://`, `rediss://` for TLS, or
    /// `redis+unix://`), or to the master Redis Sentinel names (`redis+sentinel://`,
    /// `rediss+sentinel://`, see [Sentinel](Self#sentinel)), waiting for the first
    /// connection.
    ///
    /// The connection manager uses the driver's timeouts (1 s to connect, 500 ms per
    /// answer) and retries a lost connection once before failing the requests that
    /// wait for it, so that during an outage a handler fails closed within a fraction
    /// of a second instead of holding its message; the next request tries again. Use
    /// [`connect_with_config`](Self::connect_with_config) for other settings.
    ///
    /// An unreachable server is [`StoreErrorKind::Unavailable`]; a malformed URL is
    /// [`StoreErrorKind::Rejected`]. Like every store's `connect`, it takes the URL as
    /// `&str` (so `&String` works too); for a prepared [`redis::ConnectionInfo`] build
    /// the connection yourself and use
    /// [`from_connection_manager`](Self::from_connection_manager).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if sentinel::is_sentinel_url(url) {
            return Self::connect_sentinel(url).await;
        }
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Self::connect_with_config(url, config).await
    }

    /// Connects to a single Redis server with the given connection manager settings
    /// (timeouts, reconnection backoff).
    pub async fn connect_with_config(
        url: &str,
        config: ConnectionManagerConfig,
    ) -> Result<Self, StoreError> {
        if sentinel::is_sentinel_url(url) {
            return Err(StoreError::new(
                StoreErrorKind::Rejected,
                "a redis+sentinel:// URL takes no connection manager settings: use connect",
            ));
        }
        let client = redis::Client::open(url)
            .map_err(|e| redis_error(e, "invalid Redis connection settings"))?;
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| redis_error(e, "could not connect to Redis"))?;
        Ok(Self::from_connection_manager(manager))
    }

    /// Connects to a Redis Cluster through one or more of its nodes
    /// (`&["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`; `rediss://` for TLS),
    /// discovering the others.
    ///
    /// ```no_run
    /// # async fn start() -> Result<(), idempotent_runtime::StoreError> {
    /// let store = idempotent_runtime::RedisStore::connect_cluster(&[
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    /// ])
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A request that meets a failing node or a moving slot is retried up to 3 times,
    /// waiting at most 1 s between tries, before it fails with
    /// [`StoreErrorKind::Unavailable`]; build a connection with
    /// [`redis::cluster::ClusterClientBuilder`] and pass it to
    /// [`from_cluster_connection`](Self::from_cluster_connection) for other settings.
    pub async fn connect_cluster<T>(nodes: &[T]) -> Result<Self, StoreError>
    where
        T: IntoConnectionInfo + Clone,
    {
        let client = redis::cluster::ClusterClientBuilder::new(nodes.iter().cloned())
            .retries(3)
            .max_retry_wait(1000)
            .build()
            .map_err(|e| redis_error(e, "invalid Redis Cluster connection settings"))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| redis_error(e, "could not connect to Redis Cluster"))?;
        Ok(Self::from_cluster_connection(conn))
    }

    /// A store on an existing single-node connection manager (for TLS certificates,
    /// timeouts or reconnect settings of your own, or to share the application's
    /// connection).
    pub fn from_connection_manager(manager: ConnectionManager) -> Self {
        Self::new(Conn::Single(Single::Manager(manager)))
    }

    fn new(conn: Conn) -> Self {
        RedisStore {
            conn,
            prefix: Arc::from(Self::DEFAULT_PREFIX.as_bytes()),
            replica_ack: None,
        }
    }

    /// Connects to the master a group of Redis Sentinels names, and follows it: after
    /// the connection to the master fails (or the server answers that it is no longer a
    /// master), the next request asks Sentinel for the master again. See
    /// [Sentinel](Self#sentinel) for the URL.
    async fn connect_sentinel(url: &str) -> Result<Self, StoreError> {
        let parsed = sentinel::parse(url).map_err(|e| {
            StoreError::new(
                StoreErrorKind::Rejected,
                format!("invalid Redis Sentinel URL: {e}"),
            )
        })?;
        let conn = SentinelConn::connect(&parsed).await.map_err(|e| {
            redis_error(e, "could not connect to the Redis master through Sentinel")
        })?;
        Ok(Self::new(Conn::Single(Single::Sentinel(conn))))
    }

    /// A store on an existing Redis Cluster connection.
    pub fn from_cluster_connection(conn: ClusterConnection) -> Self {
        Self::new(Conn::Cluster(conn))
    }

    /// After every claim and every completion, waits until `ack.replicas` replicas
    /// acknowledge the write (`WAIT`), for at most `ack.timeout`. See
    /// [Replication and failover](Self#replication-and-failover).
    ///
    /// - A claim that acquires a key but is acknowledged by fewer replicas fails closed
    ///   with [`StoreErrorKind::NotReplicated`] (retryable): the handler does not run,
    ///   and the claim stays on the master until its lease expires.
    /// - A completion acknowledged by fewer replicas was recorded on the master but
    ///   could be lost in a failover: the store logs a warning and answers
    ///   [`StoreErrorKind::NotReplicated`]; the protocol retries the completion (each
    ///   retry waits again) for up to a third of the lease, then counts the message as
    ///   `unrecorded` and returns the handler's value.
    ///
    /// Duplicates of completed keys and refused claims are answered whatever the
    /// acknowledgement. On Redis Cluster, a single key's `WAIT` goes to the master of
    /// its key; after a batch, to every master.
    ///
    /// ```no_run
    /// use idempotent_runtime::{RedisStore, ReplicaAck};
    /// use std::time::Duration;
    ///
    /// # async fn start() -> Result<(), idempotent_runtime::StoreError> {
    /// let store = RedisStore::connect("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster")
    ///     .await?
    ///     .with_replica_ack(ReplicaAck::new(1, Duration::from_millis(100)));
    /// # Ok(()) }
    /// ```
    pub fn with_replica_ack(mut self, ack: ReplicaAck) -> Self {
        self.replica_ack = Some(ack);
        self
    }

    /// The replica acknowledgement set with [`with_replica_ack`](Self::with_replica_ack).
    pub fn replica_ack(&self) -> Option<ReplicaAck> {
        self.replica_ack
    }

    /// Uses `prefix` in front of every Redis key instead of `idem:`, for example to keep
    /// several applications apart on one server. Stores with different prefixes never
    /// see each other's records.
    pub fn with_prefix(mut self, prefix: impl AsRef<[u8]>) -> Self {
        self.prefix = Arc::from(prefix.as_ref());
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The Redis key holding the record of `key` (see [Keys](Self#keys)), for
    /// inspecting records with `redis-cli`.
    pub fn redis_key(&self, key: &RecordKey) -> Vec<u8> {
        let scope = key.scope().as_bytes();
        let bytes = key.key();
        let mut out = Vec::with_capacity(self.prefix.len() + scope.len() + bytes.len() + 32);
        out.extend_from_slice(&self.prefix);
        // decimal digits need no escaping
        write!(out, "{}:", scope.len()).expect("writing to a Vec");
        push_escaped(&mut out, scope);
        out.push(b':');
        push_escaped(&mut out, bytes);
        out
    }
}

fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    if !bytes.iter().any(|&b| matches!(b, b'{' | b'}' | 0xff)) {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'{' => out.extend_from_slice(&[0xff, b'(']),
            b'}' => out.extend_from_slice(&[0xff, b')']),
            0xff => out.extend_from_slice(&[0xff, 0xff]),
            _ => out.push(b),
        }
    }
}

/// Durations are clamped to 100 years so that server time plus a lease stays exact in
/// Lua's numbers (2^53 µs is year 2255).
const MAX_MICROS: u64 = 100 * 365 * 24 * 3600 * 1_000_000;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(MAX_MICROS)
}

/// Milliseconds for `PX`, rounded up (a key never expires before the lease it holds)
/// and at least 1 (`PX 0` is an error).
fn millis(d: Duration) -> u64 {
    micros(d).div_ceil(1000).max(1)
}

fn redis_error(e: RedisError, what: &str) -> StoreError {
    if e.code() == Some("NOREPLICAS") {
        return StoreError::with_source(
            StoreErrorKind::NotReplicated,
            format!(
                "{what}: the Redis master refused the write: fewer replicas than its \
                 min-replicas-to-write are connected"
            ),
            e,
        );
    }
    let kind = match e.kind() {
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::RESP3NotSupported
        | ErrorKind::Server(
            ServerErrorKind::ResponseError
            | ServerErrorKind::ExecAbort
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NoPerm,
        ) => StoreErrorKind::Rejected,
        ErrorKind::UnexpectedReturnType => StoreErrorKind::Corrupt,
        // I/O, timeouts, dropped connections, cluster reconfiguration, a loading or
        // busy server and everything else a later retry may fix
        _ => StoreErrorKind::Unavailable,
    };
    let message = match kind {
        StoreErrorKind::Unavailable => format!("{what}: Redis is unreachable or not ready"),
        StoreErrorKind::Rejected => format!("{what}: Redis rejected the request"),
        _ => format!("{what}: unexpected reply from Redis"),
    };
    StoreError::with_source(kind, message, e)
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_escaped(&mut out, b);
        out
    }

    #[test]
    fn escaping_removes_hash_tags_and_stays_injective() {
        assert_eq!(escaped(b"a{b}c"), b"a\xff(b\xff)c");
        assert_eq!(escaped(b"\xff("), b"\xff\xff(");
        assert_ne!(escaped(b"\xff("), escaped(b"{"));
        assert!(!escaped(b"{x}{}}{").iter().any(|b| *b == b'{' || *b == b'}'));
    }

    #[test]
    fn millis_round_up_and_are_never_zero() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_secs(7)), 7000);
        assert_eq!(micros(Duration::MAX), MAX_MICROS);
    }
}
