//! The Redis store: one Redis function (`FCALL`) per protocol step over one key,
//! records packed into one string per key, expiry and leases on the server's clock.

use crate::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage};
use crate::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release, Store, Token,
};
use crate::{RecordKey, StoreError, StoreErrorKind};
use async_trait::async_trait;
use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, ErrorKind, IntoConnectionInfo, RedisError, Script, ServerErrorKind, Value};
use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

#[path = "redis_scan.rs"]
mod scan;

/// A dedup store in Redis (single node or Redis Cluster), shared by every process that
/// connects to the same server.
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
/// the server; [`forget`](Store::forget) is one `DEL`. No function touches a key it is
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
/// expired records by itself and [`purge_expired`](Store::purge_expired) returns 0. The
/// store has no clock of its own; the consumers' clocks never enter a decision. Fencing
/// tokens are the larger of the record's previous token plus one and the server's
/// `TIME` in microseconds.
///
/// The batch methods ([`claim_batch`](Store::claim_batch),
/// [`complete_batch`](Store::complete_batch), [`release_batch`](Store::release_batch))
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
/// fail with [`StoreErrorKind::Corrupt`]; [`forget`](Store::forget) deletes it.
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
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &match self.conn {
                    Conn::Single(_) => "single node",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .field("prefix", &self.prefix.escape_ascii().to_string())
            .finish()
    }
}

impl RedisStore {
    /// The key prefix used unless [`with_prefix`](Self::with_prefix) sets another.
    pub const DEFAULT_PREFIX: &'static str = "idem:";

    /// Connects to a single Redis server (`redis://`, `rediss://` for TLS, or
    /// `redis+unix://`), waiting for the first connection.
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
        RedisStore {
            conn: Conn::Single(manager),
            prefix: Arc::from(Self::DEFAULT_PREFIX.as_bytes()),
        }
    }

    /// A store on an existing Redis Cluster connection.
    pub fn from_cluster_connection(conn: ClusterConnection) -> Self {
        RedisStore {
            conn: Conn::Cluster(conn),
            prefix: Arc::from(Self::DEFAULT_PREFIX.as_bytes()),
        }
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

    /// The `FCALL` of `op` on `key`; the caller appends up to four arguments, `extra`
    /// bytes in all.
    fn fcall(op: Op, key: &[u8], extra: usize) -> Cmd {
        let name = op.function();
        let mut cmd = Cmd::with_capacity(8, 5 + name.len() + 1 + key.len() + extra + 64);
        cmd.arg("FCALL").arg(name).arg(1).arg(key);
        cmd
    }

    async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// Runs one function call, loading the library when the server does not know the
    /// function (a new or restarted server, a flushed library, a new cluster node).
    async fn call(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        match self.query(cmd).await {
            Err(e) if function_missing(e.code().unwrap_or(""), e.detail()) => {
                self.load().await?;
                self.query(cmd).await
            }
            v => v,
        }
    }

    /// Loads the function library (`FUNCTION LOAD REPLACE`; on a cluster, on every
    /// master).
    async fn load(&self) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(LIB.code.as_str());
        let _: Value = match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await?,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await?,
        };
        Ok(())
    }

    /// The batch calls of `op` over `keys`: on a single node one call per
    /// [`BATCH_CALL_KEYS`] keys, on a cluster one per hash slot (and as many keys);
    /// `push_args` appends the arguments of the key at an index. Returns the indices
    /// each call covers, and the calls.
    fn many_cmds(
        &self,
        op: Op,
        keys: &[Vec<u8>],
        push_args: impl Fn(usize, &mut Cmd),
    ) -> (Vec<Vec<usize>>, Vec<Cmd>) {
        let all: Vec<usize> = (0..keys.len()).collect();
        let groups: Vec<Vec<usize>> = match self.conn {
            Conn::Single(_) => all.chunks(BATCH_CALL_KEYS).map(<[usize]>::to_vec).collect(),
            Conn::Cluster(_) => {
                let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
                for i in all {
                    by_slot.entry(Slot::for_key(&keys[i])).or_default().push(i);
                }
                by_slot
                    .into_values()
                    .flat_map(|g| {
                        g.chunks(BATCH_CALL_KEYS)
                            .map(<[usize]>::to_vec)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            }
        };
        let cmds = groups
            .iter()
            .map(|g| {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg(op.function()).arg(g.len());
                for &i in g {
                    cmd.arg(&keys[i]);
                }
                for &i in g {
                    push_args(i, &mut cmd);
                }
                cmd
            })
            .collect();
        (groups, cmds)
    }

    /// Sends the batch calls all at once (they share the connection, so a single
    /// node gets them in one write) and splits their replies back into one per key.
    async fn call_many(
        &self,
        op: Op,
        n: usize,
        (groups, cmds): (Vec<Vec<usize>>, Vec<Cmd>),
    ) -> Result<Vec<Value>, StoreError> {
        let replies = join_all(cmds.iter().map(|c| self.run(op, c))).await;
        let mut out = vec![Value::Nil; n];
        for (group, reply) in groups.iter().zip(replies) {
            match reply? {
                Value::Array(items) if items.len() == group.len() => {
                    for (&i, v) in group.iter().zip(items) {
                        out[i] = v;
                    }
                }
                _ => {
                    return Err(StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!(
                            "unexpected reply from the Redis {} function for {} keys",
                            op.what(),
                            group.len()
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    fn claim_cmd(req: &ClaimRequest<'_>, key: &[u8]) -> Cmd {
        let mut cmd = Self::fcall(Op::Claim, key, req.fingerprint.map_or(0, <[u8]>::len));
        cmd.arg(micros(req.lease))
            .arg(millis(req.ttl.max(req.lease)))
            .arg(req.max_attempts.unwrap_or(0));
        if let Some(fp) = req.fingerprint {
            cmd.arg(fp);
        }
        cmd
    }

    fn complete_cmd(c: &Completion<'_>, key: &[u8]) -> Cmd {
        let mut cmd = Self::fcall(Op::Complete, key, c.output.map_or(0, <[u8]>::len));
        cmd.arg(c.token.0).arg(millis(c.ttl));
        if let Some(out) = c.output {
            cmd.arg(out);
        }
        cmd
    }

    fn release_cmd(r: &Release<'_>, key: &[u8]) -> Cmd {
        let mut cmd = Self::fcall(Op::Release, key, 0);
        cmd.arg(r.token.0);
        cmd
    }

    /// Runs one call of `op` and maps a failure to a [`StoreError`].
    async fn run(&self, op: Op, cmd: &Cmd) -> Result<Value, StoreError> {
        self.call(cmd).await.map_err(|e| {
            let what = match op {
                Op::Claim => "claim failed",
                Op::Complete => "complete failed",
                Op::Release => "release failed",
                Op::Renew => "renew failed",
                Op::Inspect => "inspect failed",
                Op::ClaimMany => "claim batch failed",
                Op::CompleteMany => "complete batch failed",
                Op::ReleaseMany => "release batch failed",
            };
            if e.detail()
                .is_some_and(|d| d.contains("unknown command 'FCALL'"))
            {
                return redis_error(e, &format!("{what} (the store needs Redis 7.0 or later)"));
            }
            redis_error(e, what)
        })
    }
}

/// Whether a server error says that a function of the library is not loaded.
fn function_missing(code: &str, detail: Option<&str>) -> bool {
    code == "ERR" && detail.is_some_and(|d| d.starts_with("Function not found"))
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

/// Keys per batch call, so that one call holds the server for a bounded time (about
/// a millisecond).
const BATCH_CALL_KEYS: usize = 128;

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

// ---------------------------------------------------------------------------------------
// The function library
// ---------------------------------------------------------------------------------------

/// The Lua library loaded with `FUNCTION LOAD`: the record layout (see [`RedisStore`]),
/// the server clock and one function per protocol step. `$V` stands for the version
/// of the library (a hash of this text), so that processes running different versions
/// of the store each call their own functions.
///
/// Every function reads the key with one `GET` and writes it with at most one `SET`;
/// `TIME` is read only when a decision needs the clock (not for a duplicate of a
/// completed key), and `PTTL` only where a record's expiry may only grow (a takeover,
/// a renewal) or is reported (inspect).
const LIBRARY: &str = r#"#!lua name=idempotent_$V

local IN_PROGRESS, COMPLETED, RELEASED = 225, 226, 227
local HEAD = '>BBI4I8I8'
local NO_LEASE = '\0\0\0\0\0\0\0\0'
-- Lua numbers are doubles: tokens and times stay below 2^53 - 1, so that every value
-- read, incremented and written back is exact (a larger one is a corrupt record)
local MAX_EXACT = 9007199254740991

local function now_us()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end

local function int(n)
  return string.format('%d', n)
end

-- Checks the record `v`. Returns its state, flags, attempts, token, lease deadline and
-- the position of the last byte of its fingerprint part (22 without a fingerprint),
-- or nil and why `v` is not a record.
local function decode(v)
  local n = #v
  if n < 22 then
    return nil, 'a ' .. n .. '-byte string is too short for a record'
  end
  local state, flags, attempts, token, lease = struct.unpack(HEAD, v)
  if state < IN_PROGRESS or state > RELEASED then
    return nil, 'unknown record tag ' .. state
  end
  if flags > 3 then
    return nil, 'unknown flags ' .. flags
  end
  if token < 1 then
    return nil, 'zero token'
  end
  if token >= MAX_EXACT or lease >= MAX_EXACT then
    return nil, 'token or lease deadline out of range'
  end
  local e = 22
  if flags % 2 == 1 then
    if n < 26 then
      return nil, 'truncated fingerprint length'
    end
    e = 26 + struct.unpack('>I4', v, 23)
    if e > n then
      return nil, 'truncated fingerprint'
    end
  end
  if flags < 2 and e < n then
    return nil, (n - e) .. ' unexpected trailing bytes'
  end
  return state, flags, attempts, token, lease, e
end

-- The string under `key`, false when absent, nil and a reason for another type.
local function get(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then
    return nil, 'the key holds a ' .. redis.call('TYPE', key).ok .. ', not a string'
  end
  return v
end

-- The record under `key` if `token` owns it (in progress, same token): the record,
-- its flags and the end of its fingerprint part; false if not, with the record's state
-- and token when there is one; nil and a reason if the key holds no record.
local function owned(key, token)
  local v, err = get(key)
  if not v then
    return v, err
  end
  local state, flags, _, t, _, e = decode(v)
  if not state then
    return nil, flags
  end
  if state ~= IN_PROGRESS or t ~= tonumber(token) then
    return false, state, t
  end
  return v, flags, e
end

-- Writes `v`, keeping the key's expiry at least `keep_ms` away (a later expiry, or
-- none, stays).
local function save_extend(key, v, keep_ms)
  local pttl = redis.call('PTTL', key)
  if pttl == -1 then
    redis.call('SET', key, v, 'KEEPTTL')
  else
    redis.call('SET', key, v, 'PX', int(math.max(pttl, keep_ms)))
  end
end

-- ARGV lease µs, keep ms, max attempts (0: none)[, fingerprint].
-- Reply, shortest for the two common answers: token (an integer) acquired for the
-- first attempt, output (a string) completed; otherwise {0, reason} corrupt,
-- {1, token, attempt} acquired, {2} completed without output, {3, retry after µs} in
-- progress, {4, attempts} exhausted, {5} fingerprint mismatch.
local function claim(keys, args)
  local key = keys[1]
  local fp = args[4]
  local v, err = get(key)
  if v == nil then
    return {0, err}
  end
  if not v then
    local now = now_us()
    local rec
    if fp then
      rec = struct.pack('>BBI4I8I8I4', IN_PROGRESS, 1, 1, now, now + args[1], #fp) .. fp
    else
      rec = struct.pack(HEAD, IN_PROGRESS, 0, 1, now, now + args[1])
    end
    redis.call('SET', key, rec, 'PX', args[2])
    return now
  end
  local state, flags, attempts, token, lease, e = decode(v)
  if not state then
    return {0, flags}
  end
  local has_fp = flags % 2 == 1
  if fp and has_fp and string.sub(v, 27, e) ~= fp then
    return {5}
  end
  if state == COMPLETED then
    if flags >= 2 then
      return string.sub(v, e + 1)
    end
    return {2}
  end
  local now = now_us()
  if state == IN_PROGRESS and lease > now then
    return {3, lease - now}
  end
  local max = tonumber(args[3])
  if max > 0 and attempts >= max then
    return {4, attempts}
  end
  if attempts < 4294967295 then
    attempts = attempts + 1
  end
  token = math.max(token + 1, now)
  local f, rest = 0, ''
  if has_fp then
    f, rest = 1, string.sub(v, 23, e)
  elseif fp then
    f, rest = 1, struct.pack('>I4', #fp) .. fp
  end
  local rec = struct.pack(HEAD, IN_PROGRESS, f, attempts, token, now + args[1]) .. rest
  save_extend(key, rec, tonumber(args[2]))
  return {1, token, attempts}
end

-- ARGV token, ttl ms[, output]. Reply {0, reason} | 1 held | 2 lost.
local function complete(keys, args)
  local key = keys[1]
  local v, flags, e = owned(key, args[1])
  if v == nil then
    return {0, flags}
  end
  if not v then
    -- completed by this very token: a retry of a completion whose reply was lost
    if flags == COMPLETED and e == tonumber(args[1]) then
      return 1
    end
    return 2
  end
  local out = args[3]
  local f = flags % 2
  if out then
    f = f + 2
  else
    out = ''
  end
  local rec = string.char(COMPLETED, f) .. string.sub(v, 3, 14) .. NO_LEASE
    .. string.sub(v, 23, e) .. out
  redis.call('SET', key, rec, 'PX', args[2])
  return 1
end

-- ARGV token. Reply {0, reason} | 1 held | 2 lost.
local function release(keys, args)
  local key = keys[1]
  local v, flags, e = owned(key, args[1])
  if v == nil then
    return {0, flags}
  end
  if not v then
    return 2
  end
  local rec = string.char(RELEASED, flags % 2) .. string.sub(v, 3, 14) .. NO_LEASE
    .. string.sub(v, 23, e)
  redis.call('SET', key, rec, 'KEEPTTL')
  return 1
end

-- ARGV token, lease µs, lease ms. Reply {0, reason} | 1 held | 2 lost.
local function renew(keys, args)
  local key = keys[1]
  local v, flags = owned(key, args[1])
  if v == nil then
    return {0, flags}
  end
  if not v then
    return 2
  end
  local rec = string.sub(v, 1, 14) .. struct.pack('>I8', now_us() + args[2])
    .. string.sub(v, 23)
  save_extend(key, rec, tonumber(args[3]))
  return 1
end

-- Reply {0, reason} | {2} absent |
-- {1, state, attempts, token, lease left µs or -1, pttl ms, has fp, fp, has output, output}.
local function inspect(keys)
  local key = keys[1]
  local v, err = get(key)
  if v == nil then
    return {0, err}
  end
  if not v then
    return {2}
  end
  local state, flags, attempts, token, lease, e = decode(v)
  if not state then
    return {0, flags}
  end
  local now = now_us()
  local left = -1
  if state == IN_PROGRESS and lease > now then
    left = lease - now
  end
  local has_fp, fp, has_out, out = 0, '', 0, ''
  if flags % 2 == 1 then
    has_fp, fp = 1, string.sub(v, 27, e)
  end
  if flags >= 2 then
    has_out, out = 1, string.sub(v, e + 1)
  end
  return {1, state, attempts, token, left, redis.call('PTTL', key), has_fp, fp, has_out, out}
end

-- The batch forms: one call over many keys (on a cluster, keys of one hash slot),
-- `n` arguments per key; the reply holds each key's answer, in order.
local function claim_args(args, b)
  local a = {args[b + 1], args[b + 2], args[b + 3]}
  if args[b + 4] == '1' then
    a[4] = args[b + 5]
  end
  return a
end

local function complete_args(args, b)
  local a = {args[b + 1], args[b + 2]}
  if args[b + 3] == '1' then
    a[3] = args[b + 4]
  end
  return a
end

local function release_args(args, b)
  return {args[b + 1]}
end

local function many(step, n, args_of)
  return function(keys, args)
    local out = {}
    for i = 1, #keys do
      out[i] = step({keys[i]}, args_of(args, (i - 1) * n))
    end
    return out
  end
end

redis.register_function('idempotent_$V_claim', claim)
redis.register_function('idempotent_$V_complete', complete)
redis.register_function('idempotent_$V_release', release)
redis.register_function('idempotent_$V_renew', renew)
redis.register_function('idempotent_$V_inspect', inspect)
redis.register_function('idempotent_$V_claim_many', many(claim, 5, claim_args))
redis.register_function('idempotent_$V_complete_many', many(complete, 4, complete_args))
redis.register_function('idempotent_$V_release_many', many(release, 1, release_args))
"#;

/// A protocol step: one function of the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Claim,
    Complete,
    Release,
    Renew,
    Inspect,
    ClaimMany,
    CompleteMany,
    ReleaseMany,
}

impl Op {
    /// The name given to `FCALL`.
    fn function(self) -> &'static str {
        &LIB.functions[self as usize]
    }

    fn what(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Renew => "renew",
            Op::Inspect => "inspect",
            Op::ClaimMany => "claim_many",
            Op::CompleteMany => "complete_many",
            Op::ReleaseMany => "release_many",
        }
    }
}

/// The library with its version filled in, and the names of its functions.
struct Library {
    code: String,
    functions: [String; 8],
}

static LIB: LazyLock<Library> = LazyLock::new(|| {
    // the first 16 hex digits of the SHA-1 of the template name this version
    let script = Script::new(LIBRARY);
    let version = &script.get_hash()[..16];
    let code = LIBRARY.replace("$V", version);
    let functions = [
        Op::Claim,
        Op::Complete,
        Op::Release,
        Op::Renew,
        Op::Inspect,
        Op::ClaimMany,
        Op::CompleteMany,
        Op::ReleaseMany,
    ]
    .map(|op| format!("idempotent_{version}_{}", op.what()));
    Library { code, functions }
});

// ---------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------

/// A function reply, split into its code and the rest.
struct Reply<'a> {
    key: &'a RecordKey,
    op: &'static str,
    items: Vec<Value>,
}

impl<'a> Reply<'a> {
    fn new(key: &'a RecordKey, op: &'static str, v: Value) -> Result<(i64, Self), StoreError> {
        let mut r = Reply {
            key,
            op,
            items: Vec::new(),
        };
        let Value::Array(items) = v else {
            return Err(r.unexpected());
        };
        r.items = items;
        let code = r.int(0)?;
        if code == 0 {
            let reason = match r.items.get(1) {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => "unreadable record".to_owned(),
            };
            return Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "the Redis key of a record in scope `{}` holds data that is not an \
                     idempotency record ({reason}); inspect it with `redis-cli` and delete it \
                     with `forget` if it is stale",
                    key.scope()
                ),
            ));
        }
        Ok((code, r))
    }

    fn unexpected(&self) -> StoreError {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!(
                "unexpected reply from the Redis {} function for a record in scope `{}`",
                self.op,
                self.key.scope()
            ),
        )
    }

    fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.items.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            _ => Err(self.unexpected()),
        }
    }

    fn uint<T: TryFrom<i64>>(&self, i: usize) -> Result<T, StoreError> {
        T::try_from(self.int(i)?).map_err(|_| self.unexpected())
    }

    fn bytes(&mut self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.items.get_mut(i) {
            Some(Value::BulkString(b)) => Ok(std::mem::take(b)),
            _ => Err(self.unexpected()),
        }
    }

    fn fence(self, code: i64) -> Result<Fence, StoreError> {
        match code {
            1 => Ok(Fence::Held),
            2 => Ok(Fence::Lost),
            _ => Err(self.unexpected()),
        }
    }
}

fn claim_outcome(key: &RecordKey, v: Value) -> Result<ClaimOutcome, StoreError> {
    let v = match v {
        Value::Int(token) if token > 0 => {
            return Ok(ClaimOutcome::Acquired {
                token: Token(token.unsigned_abs()),
                attempt: 1,
            });
        }
        Value::BulkString(output) => {
            return Ok(ClaimOutcome::Completed {
                output: Some(output),
            });
        }
        v => v,
    };
    let (code, mut r) = Reply::new(key, "claim", v)?;
    Ok(match code {
        1 => ClaimOutcome::Acquired {
            token: Token(r.uint(1)?),
            attempt: r.uint(2)?,
        },
        2 => ClaimOutcome::Completed {
            output: if r.items.len() > 1 {
                Some(r.bytes(1)?)
            } else {
                None
            },
        },
        3 => ClaimOutcome::InProgress {
            retry_after: Duration::from_micros(r.uint(1)?),
        },
        4 => ClaimOutcome::Exhausted {
            attempts: r.uint(1)?,
        },
        5 => ClaimOutcome::FingerprintMismatch,
        _ => return Err(r.unexpected()),
    })
}

/// A fence reply: `1` held, `2` lost, or `{0, reason}` for data that is not a record.
fn fence(key: &RecordKey, op: &'static str, v: Value) -> Result<Fence, StoreError> {
    match v {
        Value::Int(1) => Ok(Fence::Held),
        Value::Int(2) => Ok(Fence::Lost),
        v => {
            let (code, r) = Reply::new(key, op, v)?;
            r.fence(code)
        }
    }
}

fn record(key: &RecordKey, v: Value) -> Result<Option<Record>, StoreError> {
    let (code, mut r) = Reply::new(key, "inspect", v)?;
    match code {
        2 => return Ok(None),
        1 => {}
        _ => return Err(r.unexpected()),
    }
    let state = match r.int(1)? {
        225 => RecordState::InProgress,
        226 => RecordState::Completed,
        227 => RecordState::Released,
        _ => return Err(r.unexpected()),
    };
    let mut rec = Record::new(state, r.uint(2)?, Token(r.uint(3)?));
    let left = r.int(4)?;
    rec.lease_remaining = u64::try_from(left).ok().map(Duration::from_micros);
    let pttl = r.int(5)?;
    rec.expires_in = u64::try_from(pttl).ok().map(Duration::from_millis);
    let fp = r.bytes(7)?;
    rec.fingerprint = (r.int(6)? == 1).then_some(fp);
    let out = r.bytes(9)?;
    rec.output = (r.int(8)? == 1).then_some(out);
    Ok(Some(rec))
}

#[async_trait]
impl Store for RedisStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let cmd = Self::claim_cmd(req, &self.redis_key(req.key));
        claim_outcome(req.key, self.run(Op::Claim, &cmd).await?)
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        let cmd = Self::complete_cmd(c, &self.redis_key(c.key));
        fence(c.key, "complete", self.run(Op::Complete, &cmd).await?)
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        let cmd = Self::release_cmd(r, &self.redis_key(r.key));
        fence(r.key, "release", self.run(Op::Release, &cmd).await?)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let mut cmd = Self::fcall(Op::Renew, &self.redis_key(key), 0);
        cmd.arg(token.0).arg(micros(lease)).arg(millis(lease));
        fence(key, "renew", self.run(Op::Renew, &cmd).await?)
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let cmd = Self::fcall(Op::Inspect, &self.redis_key(key), 0);
        record(key, self.run(Op::Inspect, &cmd).await?)
    }

    /// Deletes the key with one `DEL`, whatever it holds (a record or foreign data).
    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.redis_key(key));
        let n: i64 = match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
        .map_err(|e| redis_error(e, "forget failed"))?;
        Ok(n > 0)
    }

    /// Redis expires records by itself (each key carries the record's expiry): returns 0.
    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// `SCAN` with the store's prefix (and the scope's part of the key when the filter
    /// names a scope), on a cluster master after master; each batch of keys is read
    /// with one pipelined `GET` and `PTTL` per key. Keys under the prefix that do not
    /// hold a record are skipped.
    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        self.scan_page(filter, cursor, limit).await
    }

    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        self.admin(key, "release").await
    }

    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        self.admin(key, "reset").await
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let keys: Vec<Vec<u8>> = reqs.iter().map(|r| self.redis_key(r.key)).collect();
        let calls = self.many_cmds(Op::ClaimMany, &keys, |i, cmd| {
            let r = &reqs[i];
            cmd.arg(micros(r.lease))
                .arg(millis(r.ttl.max(r.lease)))
                .arg(r.max_attempts.unwrap_or(0))
                .arg(u8::from(r.fingerprint.is_some()))
                .arg(r.fingerprint.unwrap_or_default());
        });
        let values = self.call_many(Op::ClaimMany, reqs.len(), calls).await?;
        reqs.iter()
            .zip(values)
            .map(|(r, v)| claim_outcome(r.key, v))
            .collect()
    }

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        let keys: Vec<Vec<u8>> = items.iter().map(|c| self.redis_key(c.key)).collect();
        let calls = self.many_cmds(Op::CompleteMany, &keys, |i, cmd| {
            let c = &items[i];
            cmd.arg(c.token.0)
                .arg(millis(c.ttl))
                .arg(u8::from(c.output.is_some()))
                .arg(c.output.unwrap_or_default());
        });
        let values = self.call_many(Op::CompleteMany, items.len(), calls).await?;
        items
            .iter()
            .zip(values)
            .map(|(c, v)| fence(c.key, "complete", v))
            .collect()
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        let keys: Vec<Vec<u8>> = items.iter().map(|r| self.redis_key(r.key)).collect();
        let calls = self.many_cmds(Op::ReleaseMany, &keys, |i, cmd| {
            cmd.arg(items[i].token.0);
        });
        let values = self.call_many(Op::ReleaseMany, items.len(), calls).await?;
        items
            .iter()
            .zip(values)
            .map(|(r, v)| fence(r.key, "release", v))
            .collect()
    }
}

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
