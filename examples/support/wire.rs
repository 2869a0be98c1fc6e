//! A counting TCP proxy for `examples/roundtrips.rs`: it forwards every byte between the
//! clients and one server unchanged, and counts the round trips on each connection — a
//! flight of client bytes followed by the server's answer — each named by the messages
//! the client sent in it (`FCALL claim`, `Bind+Execute+Sync UPDATE`, `Ping`).
//!
//! It reads the client side of three protocols: RESP (Redis), the MySQL/MariaDB client
//! protocol and the PostgreSQL frontend protocol (without TLS: the counting program asks
//! for `sslmode=disable`). From the server side it takes the connection's id on the
//! server (MariaDB's thread id from its greeting, PostgreSQL's backend pid from
//! `BackendKeyData`), to pick the connection's lines out of the server's log, and the
//! id MariaDB gives a prepared statement, to name what a later `Execute` runs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The protocol a proxy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Redis,
    MySql,
    Postgres,
}

/// What a proxy counted since it started.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Client flights the server answered.
    pub round_trips: u64,
    /// The round trips by what the client sent in each.
    pub by_kind: BTreeMap<String, u64>,
    /// Connections the clients opened.
    pub connections: u64,
}

impl Counts {
    /// What was counted between `before` and `self`.
    pub fn since(&self, before: &Counts) -> Counts {
        let mut by_kind = self.by_kind.clone();
        for (k, n) in &before.by_kind {
            let e = by_kind.entry(k.clone()).or_default();
            *e -= n;
        }
        by_kind.retain(|_, n| *n > 0);
        Counts {
            round_trips: self.round_trips - before.round_trips,
            by_kind,
            connections: self.connections - before.connections,
        }
    }
}

#[derive(Default)]
struct Shared {
    counts: Mutex<Counts>,
    /// Ids of the proxied connections on the server.
    server_ids: Mutex<Vec<u64>>,
}

/// A running proxy; it stops with the program.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(protocol: Protocol, upstream: String) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                s.counts.lock().unwrap().connections += 1;
                tokio::spawn(forward(protocol, client, server, s.clone()));
            }
        });
        Ok(Proxy { addr, shared })
    }

    pub fn counts(&self) -> Counts {
        self.shared.counts.lock().unwrap().clone()
    }

    /// The server's ids of the connections opened through this proxy so far.
    pub fn server_ids(&self) -> Vec<u64> {
        self.shared.server_ids.lock().unwrap().clone()
    }
}

async fn forward(protocol: Protocol, client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let conn = Arc::new(Mutex::new(Conn::new(protocol)));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (c, s) = (conn.clone(), shared.clone());
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // counted before it is sent on, so the answer always finds it
            c.lock().unwrap().client_sent(&buf[..n]);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    });
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            conn.lock().unwrap().server_sent(&buf[..n], &s);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    });
    let _ = tokio::join!(up, down);
}

/// One proxied connection.
struct Conn {
    protocol: Protocol,
    /// The client has sent bytes the server has not answered yet.
    client_turn: bool,
    /// What the client sent in the current flight.
    flight: Vec<String>,
    client_buf: Vec<u8>,
    server_buf: Vec<u8>,
    /// PostgreSQL: the untyped startup message was read.
    started: bool,
    /// The connection's id on the server is known.
    identified: bool,
    /// The client's bytes can no longer be read (a TLS request).
    opaque: bool,
    /// What each prepared statement runs, by its name (PostgreSQL) or id (MySQL).
    statements: HashMap<Vec<u8>, String>,
    /// MySQL: the statement of a `Prepare` whose answer has not arrived.
    preparing: Option<String>,
}

impl Conn {
    fn new(protocol: Protocol) -> Self {
        Conn {
            protocol,
            client_turn: false,
            flight: Vec::new(),
            client_buf: Vec::new(),
            server_buf: Vec::new(),
            started: false,
            identified: false,
            opaque: false,
            statements: HashMap::new(),
            preparing: None,
        }
    }

    fn client_sent(&mut self, bytes: &[u8]) {
        if !self.client_turn {
            self.client_turn = true;
            self.flight.clear();
        }
        if self.opaque {
            return;
        }
        self.client_buf.extend_from_slice(bytes);
        loop {
            let used = match self.protocol {
                Protocol::Redis => self.redis_command(),
                Protocol::MySql => self.mysql_command(),
                Protocol::Postgres => self.postgres_message(),
            };
            match used {
                Some(n) => {
                    self.client_buf.drain(..n);
                }
                None => break,
            }
        }
    }

    fn server_sent(&mut self, bytes: &[u8], shared: &Shared) {
        if self.client_turn {
            self.client_turn = false;
            let kind = match self.protocol {
                Protocol::Postgres => postgres_flight(&self.flight),
                _ => self.flight.join(" + "),
            };
            let kind = if kind.is_empty() {
                "(unread)".to_owned()
            } else {
                kind
            };
            let mut counts = shared.counts.lock().unwrap();
            counts.round_trips += 1;
            *counts.by_kind.entry(kind).or_default() += 1;
        }
        if self.protocol == Protocol::Redis || self.opaque {
            return;
        }
        self.server_buf.extend_from_slice(bytes);
        loop {
            let used = match self.protocol {
                Protocol::MySql => self.mysql_answer(shared),
                _ => self.postgres_answer(shared),
            };
            match used {
                Some(n) => {
                    self.server_buf.drain(..n);
                }
                None => break,
            }
        }
    }

    /// One RESP command (`*n` bulk strings) off the client buffer: its length.
    fn redis_command(&mut self) -> Option<usize> {
        let b = &self.client_buf;
        let (n, mut at) = resp_header(b, 0, b'*')?;
        let mut args = Vec::new();
        for _ in 0..n {
            let (len, start) = resp_header(b, at, b'$')?;
            let end = start + len;
            if b.len() < end + 2 {
                return None;
            }
            if args.len() < 2 {
                args.push(String::from_utf8_lossy(&b[start..end]).into_owned());
            }
            at = end + 2;
        }
        let mut name = args.first().cloned().unwrap_or_default().to_uppercase();
        if name == "FCALL"
            && let Some(f) = args.get(1)
        {
            // idempotent_<version>_<step>
            let step = f.splitn(3, '_').nth(2).unwrap_or(f);
            name = format!("FCALL {step}");
        }
        self.flight.push(name);
        Some(at)
    }

    /// One MySQL packet off the client buffer: its length. A packet with sequence 0
    /// starts a command.
    fn mysql_command(&mut self) -> Option<usize> {
        let (payload, len) = mysql_packet(&self.client_buf)?;
        let seq = self.client_buf[3];
        if seq != 0 || payload.is_empty() {
            self.flight.push("Handshake".into());
            return Some(len);
        }
        let text = || summary(&String::from_utf8_lossy(&payload[1..]));
        let label = match payload[0] {
            0x01 => "Quit".to_owned(),
            0x02 => "Init DB".to_owned(),
            0x03 => format!("Query {}", text()),
            0x0e => "Ping".to_owned(),
            0x16 => {
                self.preparing = Some(text());
                format!("Prepare {}", text())
            }
            0x17 => {
                let id = payload.get(1..5).map(<[u8]>::to_vec).unwrap_or_default();
                let what = self.statements.get(&id).cloned().unwrap_or("?".into());
                format!("Execute {what}")
            }
            0x19 => "Close stmt".to_owned(),
            0x1a => "Reset stmt".to_owned(),
            0x1f => "Reset connection".to_owned(),
            c => format!("command 0x{c:02x}"),
        };
        self.flight.push(label);
        Some(len)
    }

    /// One MySQL packet off the server buffer: the greeting's thread id, the id of a
    /// statement just prepared.
    fn mysql_answer(&mut self, shared: &Shared) -> Option<usize> {
        let (payload, len) = mysql_packet(&self.server_buf)?;
        let seq = self.server_buf[3];
        if !self.identified && seq == 0 && payload.first() == Some(&10) {
            // protocol 10, the server's version (NUL-terminated), the thread id
            if let Some(nul) = payload[1..].iter().position(|&b| b == 0)
                && let Some(id) = payload.get(nul + 2..nul + 6)
            {
                let id = u32::from_le_bytes(id.try_into().unwrap());
                shared.server_ids.lock().unwrap().push(u64::from(id));
            }
            self.identified = true;
        } else if seq == 1
            && let Some(what) = self.preparing.take()
            && payload.first() == Some(&0)
            && let Some(id) = payload.get(1..5)
        {
            self.statements.insert(id.to_vec(), what);
        }
        Some(len)
    }

    /// One PostgreSQL message off the client buffer: its length.
    fn postgres_message(&mut self) -> Option<usize> {
        let b = &self.client_buf;
        if !self.started {
            let len = be32(b.get(..4)?) as usize;
            let code = be32(b.get(4..8)?);
            if b.len() < len {
                return None;
            }
            if code == 80_877_103 || code == 80_877_104 {
                // SSLRequest, GSSENCRequest: the rest is encrypted
                self.opaque = true;
                self.flight.push("TLS".into());
                return None;
            }
            self.started = true;
            self.flight.push("Startup".into());
            return Some(len);
        }
        let tag = *b.first()?;
        let len = be32(b.get(1..5)?) as usize + 1;
        if b.len() < len {
            return None;
        }
        let body = &b[5..len];
        let cstr = |from: usize| -> (&[u8], usize) {
            let end = body[from..]
                .iter()
                .position(|&c| c == 0)
                .map_or(body.len(), |p| from + p);
            (&body[from..end], end + 1)
        };
        let label = match tag {
            b'P' => {
                let (name, next) = cstr(0);
                let (query, _) = cstr(next);
                let what = summary(&String::from_utf8_lossy(query));
                self.statements.insert(name.to_vec(), what.clone());
                format!("Parse\0{what}")
            }
            b'B' => {
                let (_, next) = cstr(0);
                let (name, _) = cstr(next);
                let what = self.statements.get(name).cloned().unwrap_or("?".into());
                format!("Bind\0{what}")
            }
            b'Q' => format!("Query\0{}", summary(&String::from_utf8_lossy(cstr(0).0))),
            b'E' => "Execute".into(),
            b'S' => "Sync".into(),
            b'D' => "Describe".into(),
            b'C' => "Close".into(),
            b'H' => "Flush".into(),
            b'X' => "Terminate".into(),
            b'p' => "Password".into(),
            t => format!("'{}'", t as char),
        };
        self.flight.push(label);
        Some(len)
    }

    /// One PostgreSQL message off the server buffer: the backend's pid.
    fn postgres_answer(&mut self, shared: &Shared) -> Option<usize> {
        let b = &self.server_buf;
        let tag = *b.first()?;
        let len = be32(b.get(1..5)?) as usize + 1;
        if b.len() < len {
            return None;
        }
        if tag == b'K' && !self.identified {
            shared
                .server_ids
                .lock()
                .unwrap()
                .push(u64::from(be32(&b[5..9])));
            self.identified = true;
        }
        Some(len)
    }
}

/// A PostgreSQL flight as one name: its messages, then the statements they name
/// (`Bind+Execute+Sync UPDATE`); a lone `Sync` is sqlx's ping.
fn postgres_flight(messages: &[String]) -> String {
    let mut kinds = Vec::new();
    let mut what = Vec::new();
    for m in messages {
        let (kind, stmt) = m.split_once('\0').unwrap_or((m, ""));
        kinds.push(kind);
        if !stmt.is_empty() && !what.contains(&stmt) {
            what.push(stmt);
        }
    }
    if kinds == ["Sync"] {
        return "Sync (ping)".into();
    }
    let mut s = kinds.join("+");
    if !what.is_empty() {
        s.push(' ');
        s.push_str(&what.join(", "));
    }
    s
}

/// A statement's text as a short name: its first keyword (`WITH … INSERT` for a
/// statement that starts with a `WITH` clause, named by what it writes; `CALL` with
/// the procedure's name).
pub fn summary(sql: &str) -> String {
    let mut words = sql.split_whitespace();
    let first = words.next().unwrap_or("").to_uppercase();
    match first.as_str() {
        "WITH" => {
            // the first statement that writes, else a read
            let verb = sql
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .map(str::to_uppercase)
                .find(|w| matches!(w.as_str(), "INSERT" | "UPDATE" | "DELETE"))
                .unwrap_or_else(|| "SELECT".into());
            format!("WITH … {verb}")
        }
        "CALL" => {
            let name = words.next().unwrap_or("");
            let name = name.split('(').next().unwrap_or(name).replace('`', "");
            // the table's claim procedure: `<table>_claim_v2`
            match name.rsplit_once("_claim_") {
                Some((_, v)) => format!("CALL claim_{v}"),
                None => format!("CALL {name}"),
            }
        }
        _ => first,
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// A RESP header `<tag><n>\r\n` at `at`: `n` and where what follows starts.
fn resp_header(b: &[u8], at: usize, tag: u8) -> Option<(usize, usize)> {
    if *b.get(at)? != tag {
        return None;
    }
    let end = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
    let n = std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok()?;
    Some((n, end + 2))
}

/// The payload of the MySQL packet at the start of `b`, and the packet's length.
fn mysql_packet(b: &[u8]) -> Option<(&[u8], usize)> {
    let h = b.get(..4)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize + 4;
    if b.len() < len {
        return None;
    }
    Some((&b[4..len], len))
}
