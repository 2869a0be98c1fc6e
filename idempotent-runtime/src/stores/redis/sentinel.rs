//! Redis Sentinel: the `redis+sentinel://` URL, and a single-node connection that asks
//! Sentinel for the master again after losing the one it had.

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, TlsMode, Value,
};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The connection to a single node: a connection manager (which reconnects to the same
/// address) or a connection through Sentinel (which reconnects to the current master).
#[derive(Clone)]
pub(super) enum Single {
    Manager(ConnectionManager),
    Sentinel(SentinelConn),
}

impl ConnectionLike for Single {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Single::Manager(m) => m.req_packed_command(cmd),
            Single::Sentinel(s) => Box::pin(async move {
                let (generation, mut conn) = s.current().await?;
                let r = conn.req_packed_command(cmd).await;
                s.check(generation, &r);
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Single::Manager(m) => m.req_packed_commands(pipeline, offset, count),
            Single::Sentinel(s) => Box::pin(async move {
                let (generation, mut conn) = s.current().await?;
                let r = conn.req_packed_commands(pipeline, offset, count).await;
                s.check(generation, &r);
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Single::Manager(m) => m.get_db(),
            Single::Sentinel(s) => s.0.db,
        }
    }
}

/// A multiplexed connection to the master Sentinel names. A request that fails on the
/// connection (I/O error, timeout, a closed connection) or that the server refuses
/// because it is no longer a master (`READONLY`, `MASTERDOWN`) drops the connection; the
/// next request asks Sentinel for the master again and connects to it. Requests are
/// not retried: the one that met the failure fails.
#[derive(Clone)]
pub(super) struct SentinelConn(Arc<Inner>);

struct Inner {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The current connection and its generation (`None` after a failure).
    current: Mutex<(u64, Option<MultiplexedConnection>)>,
    config: AsyncConnectionConfig,
    db: i64,
}

impl SentinelConn {
    /// Asks Sentinel for the master and connects to it.
    pub(super) async fn connect(url: &SentinelUrl) -> RedisResult<Self> {
        let addrs = url.sentinels.iter().map(|(host, port)| {
            if url.tls {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.clone(), *port)
            }
        });
        let mut builder =
            SentinelClientBuilder::new(addrs, &url.master, SentinelServerType::Master)?
                .set_client_to_redis_db(url.db);
        if url.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(user) = &url.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &url.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(user) = &url.sentinel_username {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = &url.sentinel_password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        let conn = SentinelConn(Arc::new(Inner {
            client: tokio::sync::Mutex::new(builder.build()?),
            current: Mutex::new((0, None)),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_millis(500))),
            db: url.db,
        }));
        conn.current().await?;
        Ok(conn)
    }

    /// The current connection, or a new one to the master Sentinel names now.
    async fn current(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        // one task at a time asks Sentinel; the others then find its connection
        let mut client = self.0.client.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let conn = client
            .get_async_connection_with_config(&self.0.config)
            .await?;
        let mut current = self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.0 += 1;
        current.1 = Some(conn.clone());
        Ok((current.0, conn))
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.1.clone().map(|c| (current.0, c))
    }

    /// Drops connection `generation` if `r` shows it no longer reaches a master.
    fn check<T>(&self, generation: u64, r: &RedisResult<T>) {
        let Err(e) = r else { return };
        if !master_lost(e) {
            return;
        }
        let mut current = self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.0 == generation && current.1.is_some() {
            tracing::warn!(error = %e, "lost the Redis master; asking Sentinel again on the next request");
            current.1 = None;
        }
    }
}

fn master_lost(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown) => true,
        ErrorKind::Server(_) => false,
        _ => {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
        }
    }
}

/// A parsed `redis+sentinel://` (or `rediss+sentinel://`) URL.
#[derive(Debug, PartialEq)]
pub(super) struct SentinelUrl {
    sentinels: Vec<(String, u16)>,
    master: String,
    db: i64,
    tls: bool,
    username: Option<String>,
    password: Option<String>,
    sentinel_username: Option<String>,
    sentinel_password: Option<String>,
}

/// Whether `url` names Sentinel (its scheme is `redis+sentinel` or `rediss+sentinel`).
pub(super) fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

/// Parses
/// `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master[/db][?sentinel_username=…&sentinel_password=…]`
/// (port 26379 when left out).
pub(super) fn parse(url: &str) -> Result<SentinelUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("redis+sentinel://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("rediss+sentinel://") {
        (true, r)
    } else {
        return Err("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://".into());
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest
        .split_once('/')
        .ok_or("a Sentinel URL names its master: redis+sentinel://host:26379/mymaster")?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((user, pw)) => (non_empty(decode(user)?), non_empty(decode(pw)?)),
            None => (non_empty(decode(u)?), None),
        },
    };
    let mut sentinels = Vec::new();
    for node in hosts.split(',') {
        let (host, port) = match node.rsplit_once(':') {
            Some((h, p)) if !node.ends_with(']') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("`{p}` is not a port number"))?,
            ),
            _ => (node, 26379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("a Sentinel URL lists its Sentinels as host:port,host:port".into());
        }
        sentinels.push((host.to_owned(), port));
    }
    let (master, db) = match path.split_once('/') {
        Some((m, db)) if !db.is_empty() => (
            m,
            db.parse::<i64>()
                .map_err(|_| format!("`{db}` is not a database number"))?,
        ),
        Some((m, _)) => (m, 0),
        None => (path, 0),
    };
    let master = decode(master)?;
    if master.is_empty() {
        return Err("a Sentinel URL names its master: redis+sentinel://host:26379/mymaster".into());
    }
    let mut out = SentinelUrl {
        sentinels,
        master,
        db,
        tls,
        username,
        password,
        sentinel_username: None,
        sentinel_password: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "sentinel_username" => out.sentinel_username = non_empty(decode(value)?),
            "sentinel_password" => out.sentinel_password = non_empty(decode(value)?),
            other => {
                return Err(format!(
                    "unknown Sentinel URL parameter `{other}` (known: sentinel_username, \
                     sentinel_password)"
                ));
            }
        }
    }
    Ok(out)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Percent-decoding (`%40` is `@`).
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in `{s}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinel_urls() {
        let u = parse("redis+sentinel://a:26380,b/mymaster").unwrap();
        assert_eq!(u.sentinels, [("a".into(), 26380), ("b".into(), 26379)]);
        assert_eq!((u.master.as_str(), u.db, u.tls), ("mymaster", 0, false));
        assert_eq!((u.username, u.password), (None, None));

        let u = parse(
            "rediss+sentinel://app:p%40ss@[::1]:5000/m/3?sentinel_password=s&sentinel_username=x",
        )
        .unwrap();
        assert_eq!(u.sentinels, [("::1".into(), 5000)]);
        assert_eq!((u.master.as_str(), u.db, u.tls), ("m", 3, true));
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.sentinel_username.as_deref(), Some("x"));
        assert_eq!(u.sentinel_password.as_deref(), Some("s"));

        let u = parse("redis+sentinel://:secret@h:1/m").unwrap();
        assert_eq!((u.username, u.password.as_deref()), (None, Some("secret")));
    }

    #[test]
    fn refuses_malformed_sentinel_urls() {
        for bad in [
            "redis://h/m",
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:x/m",
            "redis+sentinel://h:1,/m",
            "redis+sentinel://h:1/m/x",
            "redis+sentinel://h:1/m?db=2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
