//! Scans and operator changes of the [`RedisStore`]: `SCAN` over the store's prefix
//! (per master on a cluster), the records of each batch of keys read with one
//! pipelined `GET` and `PTTL` per key, and the operator changes as single-key scripts.
//! Keys under the prefix that hold no record (another program's) are left out of a
//! page and counted in [`ScanPage::skipped`].

use super::{Conn, RedisStore, push_escaped, redis_error};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanItem, ScanPage};
use crate::store::{RecordState, Token};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisError, Script, Value};
use std::sync::LazyLock;
use std::time::Duration;

/// `SCAN` calls one page makes at most before it returns what it found (possibly
/// nothing) with a cursor, so that a page over a sparse keyspace stays short.
const SCANS_PER_PAGE: usize = 16;

impl RedisStore {
    /// One page of a scan (see [`StoreAdmin::scan`](crate::store::StoreAdmin::scan)).
    ///
    /// The cursor is the `SCAN` cursor in decimal, on a cluster preceded by the
    /// `host:port` of the master being scanned and a newline.
    pub(super) async fn scan_page(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let limit = limit.max(1);
        let pattern = self.match_pattern(filter.scope.as_deref());
        let (mut node, mut cur) = match cursor {
            None => (None, 0u64),
            Some(c) => parse_cursor(c.as_bytes())?,
        };
        let masters = match &self.conn {
            Conn::Single(_) => Vec::new(),
            Conn::Cluster(c) => masters(&mut c.clone()).await?,
        };
        if self.is_cluster() {
            match &node {
                None => node = masters.first().cloned(),
                Some(n) if !masters.contains(n) => {
                    return Err(StoreError::new(
                        StoreErrorKind::Rejected,
                        format!(
                            "the scan cursor names the node {}:{}, which is no longer a \
                             master of the cluster; start the scan again",
                            n.0, n.1
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let mut items = Vec::new();
        let mut skipped = 0u64;
        for _ in 0..SCANS_PER_PAGE {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cur)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(limit);
            let reply = self.on_node(node.as_ref(), cmd).await?;
            let (next, keys) = scan_reply(reply)?;
            if !keys.is_empty() {
                skipped += self
                    .read_records(node.as_ref(), &keys, filter, &mut items)
                    .await?;
            }
            cur = next;
            if cur == 0 {
                // this node is done; on a cluster go on with the next master
                let following = node.as_ref().and_then(|n| {
                    let at = masters.iter().position(|m| m == n)?;
                    masters.get(at + 1).cloned()
                });
                match following {
                    Some(m) => node = Some(m),
                    None => return Ok(ScanPage::new(items, None).with_skipped(skipped)),
                }
            }
            if items.len() >= limit {
                break;
            }
        }
        let mut c = Vec::new();
        if let Some((host, port)) = &node {
            c.extend_from_slice(format!("{host}:{port}\n").as_bytes());
        }
        c.extend_from_slice(cur.to_string().as_bytes());
        Ok(ScanPage::new(items, Some(ScanCursor::new(c))).with_skipped(skipped))
    }

    /// `SCAN`'s `MATCH` pattern: the prefix (and the scope's part of the key when the
    /// filter names one), glob characters escaped, then `*`.
    fn match_pattern(&self, scope: Option<&str>) -> Vec<u8> {
        let mut literal = self.prefix.to_vec();
        if let Some(scope) = scope {
            let probe = RecordKey::from_encoded(scope, b"");
            let scope = probe.scope().as_bytes();
            literal.extend_from_slice(format!("{}:", scope.len()).as_bytes());
            push_escaped(&mut literal, scope);
            literal.push(b':');
        }
        let mut out = Vec::with_capacity(literal.len() + 8);
        for b in literal {
            if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'*');
        out
    }

    /// Runs `cmd` on the single node, or on the given master of the cluster.
    async fn on_node(&self, node: Option<&(String, u16)>, cmd: Cmd) -> Result<Value, StoreError> {
        let r: Result<Value, RedisError> = match (&self.conn, node) {
            (Conn::Single(c), _) => cmd.query_async(&mut c.clone()).await,
            (Conn::Cluster(c), Some((host, port))) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                c.clone().route_command(cmd, route).await
            }
            (Conn::Cluster(_), None) => return Ok(Value::Array(vec![Value::Int(0)])),
        };
        r.map_err(|e| redis_error(e, "scan failed"))
    }

    /// Reads the records under `keys` (one `TIME`, then `GET` and `PTTL` per key, in one
    /// pipeline on the node that holds them) and appends those that pass `filter`.
    /// Keys that vanished meanwhile are passed over; keys whose name or value is not a
    /// record's (another program's: a string in another layout, a hash, a list…) are
    /// left out and counted: the count is returned.
    async fn read_records(
        &self,
        node: Option<&(String, u16)>,
        keys: &[Vec<u8>],
        filter: &ScanFilter,
        items: &mut Vec<ScanItem>,
    ) -> Result<u64, StoreError> {
        let mut pipe = Pipeline::with_capacity(1 + 2 * keys.len());
        pipe.cmd("TIME");
        for k in keys {
            pipe.cmd("GET").arg(k);
            pipe.cmd("PTTL").arg(k);
        }
        pipe.ignore_errors();
        let values: Vec<Value> = match (&self.conn, node) {
            (Conn::Single(c), _) => pipe.query_async(&mut c.clone()).await,
            (Conn::Cluster(c), Some((host, port))) => {
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                let n = 1 + 2 * keys.len();
                c.clone().route_pipeline(pipe, 0, n, route).await
            }
            (Conn::Cluster(_), None) => return Ok(0),
        }
        .map_err(|e| redis_error(e, "scan failed"))?;
        let mut values = values.into_iter();
        let now = match values.next() {
            Some(Value::Array(t)) if t.len() == 2 => match (int_of(&t[0]), int_of(&t[1])) {
                (Some(s), Some(us)) => s * 1_000_000 + us,
                _ => return Err(unexpected()),
            },
            _ => return Err(unexpected()),
        };
        let mut skipped = 0;
        for k in keys {
            let (Some(v), Some(pttl)) = (values.next(), values.next()) else {
                return Err(unexpected());
            };
            let v = match v {
                Value::BulkString(v) => v,
                // deleted or expired since `SCAN` returned it
                Value::Nil => continue,
                // `WRONGTYPE`: a hash, a list, a set… under the prefix
                _ => {
                    skipped += 1;
                    continue;
                }
            };
            let item =
                record_key(&self.prefix, k).and_then(|key| decode(key, &v, now, int_of(&pttl)));
            let Some(item) = item else {
                skipped += 1;
                continue;
            };
            if filter.matches(&item) {
                items.push(item);
            }
        }
        Ok(skipped)
    }

    /// One operator change by script on the record's key.
    pub(super) async fn admin(
        &self,
        key: &RecordKey,
        mode: &str,
    ) -> Result<AdminOutcome, StoreError> {
        let mut inv = ADMIN.key(self.redis_key(key));
        inv.arg(mode);
        let v: Result<Value, RedisError> = match &self.conn {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        };
        let v = v.map_err(|e| redis_error(e, &format!("{mode} failed")))?;
        match v {
            Value::Int(1) => Ok(AdminOutcome::Applied),
            Value::Int(0) => Ok(AdminOutcome::NotFound),
            Value::Array(s) if s.len() == 1 => match int_of(&s[0]).and_then(state_of) {
                Some(state) => Ok(AdminOutcome::Unchanged { state }),
                None => Err(unexpected()),
            },
            _ => Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "the Redis key of the record in scope `{}` holds data that is not an \
                     idempotency record; inspect it with `redis-cli` and delete it with \
                     `forget` if it is stale",
                    key.scope()
                ),
            )),
        }
    }
}

/// The operator changes, atomic on the record's key. `ARGV[1]` is `release` (an In
/// progress record becomes Released, attempts kept) or `reset` (a Released record, or
/// an In progress one past its lease, becomes Released with zero attempts). Both give
/// the record a token larger than its last and than the server clock in µs, and keep
/// its fingerprint and expiry. Reply: 1 applied, 0 absent, {state} unchanged, -1 not a
/// record.
static ADMIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return -1 end
if not v then return 0 end
if #v < 22 then return -1 end
local state, flags, attempts, token, lease = struct.unpack('>BBI4I8I8', v)
if state < 225 or state > 227 or flags > 3 then return -1 end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
if ARGV[1] == 'release' then
  if state ~= 225 then return {state} end
else
  if state == 226 or (state == 225 and lease > now) then return {state} end
  attempts = 0
end
local rest = ''
if flags % 2 == 1 then
  if #v < 26 then return -1 end
  rest = string.sub(v, 23, 26 + struct.unpack('>I4', v, 23))
end
local rec = struct.pack('>BBI4I8I8', 227, flags % 2, attempts, math.max(token + 1, now), 0) .. rest
redis.call('SET', KEYS[1], rec, 'KEEPTTL')
return 1
"#,
    )
});

fn unexpected() -> StoreError {
    StoreError::new(
        StoreErrorKind::Corrupt,
        "scan failed: unexpected reply from Redis",
    )
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn state_of(tag: i64) -> Option<RecordState> {
    match tag {
        225 => Some(RecordState::InProgress),
        226 => Some(RecordState::Completed),
        227 => Some(RecordState::Released),
        _ => None,
    }
}

/// `SCAN`'s reply: the next cursor and the keys.
fn scan_reply(v: Value) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
    let Value::Array(mut parts) = v else {
        return Err(unexpected());
    };
    if parts.len() == 1 {
        // a cluster without masters: nothing to scan
        return Ok((0, Vec::new()));
    }
    if parts.len() != 2 {
        return Err(unexpected());
    }
    let keys = parts.pop().ok_or_else(unexpected)?;
    let cursor = int_of(&parts[0])
        .and_then(|c| u64::try_from(c).ok())
        .or_else(|| match &parts[0] {
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        })
        .ok_or_else(unexpected)?;
    let Value::Array(keys) = keys else {
        return Err(unexpected());
    };
    let keys = keys
        .into_iter()
        .filter_map(|k| match k {
            Value::BulkString(b) => Some(b),
            _ => None,
        })
        .collect();
    Ok((cursor, keys))
}

/// The masters of the cluster as `(host, port)`, sorted, from `CLUSTER SLOTS`.
async fn masters(
    conn: &mut redis::cluster_async::ClusterConnection,
) -> Result<Vec<(String, u16)>, StoreError> {
    let v = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await
        .map_err(|e| redis_error(e, "reading the cluster's masters failed"))?;
    let Value::Array(ranges) = v else {
        return Err(unexpected());
    };
    let mut out = Vec::new();
    for r in ranges {
        let Value::Array(r) = r else { continue };
        let Some(Value::Array(master)) = r.get(2) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(port) = master.get(1).and_then(int_of) else {
            continue;
        };
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if !out.contains(&(host.clone(), port)) {
            out.push((host, port));
        }
    }
    out.sort();
    Ok(out)
}

/// Splits a cursor into the node (on a cluster) and the `SCAN` cursor.
fn parse_cursor(c: &[u8]) -> Result<(Option<(String, u16)>, u64), StoreError> {
    let bad = || {
        StoreError::new(
            StoreErrorKind::Rejected,
            "the scan cursor was not made by a Redis store scan",
        )
    };
    let text = std::str::from_utf8(c).map_err(|_| bad())?;
    let (node, cur) = match text.split_once('\n') {
        Some((node, cur)) => {
            let (host, port) = node.rsplit_once(':').ok_or_else(bad)?;
            (
                Some((host.to_owned(), port.parse().map_err(|_| bad())?)),
                cur,
            )
        }
        None => (None, text),
    };
    Ok((node, cur.parse().map_err(|_| bad())?))
}

/// The record key of a Redis key under `prefix` (the inverse of
/// [`RedisStore::redis_key`]); `None` for a key not in that layout.
pub(super) fn record_key(prefix: &[u8], redis_key: &[u8]) -> Option<RecordKey> {
    let rest = redis_key.strip_prefix(prefix)?;
    let mut raw = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == 0xff {
            match rest.get(i + 1)? {
                b'(' => raw.push(b'{'),
                b')' => raw.push(b'}'),
                0xff => raw.push(0xff),
                _ => return None,
            }
            i += 2;
        } else {
            raw.push(rest[i]);
            i += 1;
        }
    }
    let colon = raw.iter().position(|&b| b == b':')?;
    let n: usize = std::str::from_utf8(&raw[..colon]).ok()?.parse().ok()?;
    let scope = raw.get(colon + 1..colon + 1 + n)?;
    let key = raw.get(colon + 1 + n..)?.strip_prefix(b":")?;
    let scope = std::str::from_utf8(scope).ok()?;
    if key.is_empty() {
        return None;
    }
    Some(RecordKey::from_encoded(scope, key))
}

/// Decodes a record value (see the layout in [`RedisStore`]) read at `now` µs with
/// the key's `PTTL`; `None` when it is not a record.
fn decode(key: RecordKey, v: &[u8], now: i64, pttl: Option<i64>) -> Option<ScanItem> {
    if v.len() < 22 {
        return None;
    }
    let state = state_of(i64::from(v[0]))?;
    let flags = v[1];
    if flags > 3 {
        return None;
    }
    let attempts = u32::from_be_bytes(v[2..6].try_into().ok()?);
    let token = u64::from_be_bytes(v[6..14].try_into().ok()?);
    let lease = u64::from_be_bytes(v[14..22].try_into().ok()?);
    let mut end = 22;
    if flags & 1 == 1 {
        let n = u32::from_be_bytes(v.get(22..26)?.try_into().ok()?) as usize;
        end = 26usize.checked_add(n)?;
        if end > v.len() {
            return None;
        }
    }
    let now = u64::try_from(now).ok()?;
    let mut item = ScanItem::new(key, state, attempts, Token(token));
    item.lease_remaining = (state == RecordState::InProgress && lease > now)
        .then(|| Duration::from_micros(lease - now));
    item.expires_in = pttl
        .and_then(|ms| u64::try_from(ms).ok())
        .map(Duration::from_millis);
    item.claimed_ago = Duration::from_micros(now.saturating_sub(token));
    item.output_size = (flags & 2 == 2).then(|| (v.len() - end) as u64);
    Some(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_keys_map_back_to_record_keys() {
        let store_prefix = b"idem:";
        for (scope, key) in [
            ("orders", &b"order-17"[..]),
            ("a:1", b"x"),
            ("{s}", b"\xff{k}:\x00"),
        ] {
            let rk = RecordKey::from_encoded(scope, key);
            let mut redis_key = store_prefix.to_vec();
            redis_key.extend_from_slice(format!("{}:", scope.len()).as_bytes());
            push_escaped(&mut redis_key, scope.as_bytes());
            redis_key.push(b':');
            push_escaped(&mut redis_key, key);
            assert_eq!(record_key(store_prefix, &redis_key), Some(rk));
        }
        assert_eq!(record_key(b"idem:", b"idem:zz"), None);
        assert_eq!(record_key(b"idem:", b"other:1:a:b"), None);
        assert_eq!(record_key(b"idem:", b"idem:9:a:b"), None);
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor(b"17").unwrap(), (None, 17));
        assert_eq!(
            parse_cursor(b"127.0.0.1:7000\n5").unwrap(),
            (Some(("127.0.0.1".to_owned(), 7000)), 5)
        );
        assert!(parse_cursor(b"x").is_err());
    }
}
