//! Round trips and statements per message, per store: `#[idempotent]` beside the
//! hand-written loop of `examples/bench.rs` (Redis: `SET NX PX` + `SET XX PX`, a
//! duplicate `SET NX` + `GET`; SQL: `INSERT` + `UPDATE`, a duplicate `INSERT` that
//! inserts nothing + `SELECT`), first deliveries and duplicates of completed keys, one
//! message at a time, in store mode.
//!
//! ```sh
//! cargo run -p idempotent-examples --example roundtrips --features stores
//! cargo run -p idempotent-examples --example roundtrips --features stores -- \
//!     --stores redis,postgres --messages 500
//! ```
//!
//! Each case runs `--messages` messages (500 by default) after a warm-up of 50
//! (connections open, statements prepared, the Redis library loaded) and is counted
//! twice:
//!
//! - **On the wire.** The store and the loop talk to their server through a counting
//!   proxy (`support/wire.rs`), which names each round trip — a flight of client bytes
//!   and the server's answer — by what the client sent in it: `FCALL claim`,
//!   `Bind+Execute+Close+Sync UPDATE`, `Execute CALL claim_v2`, and the pings sqlx sends when
//!   a connection goes back to its pool (`Sync (ping)`, `Ping`), which no server log
//!   shows. PostgreSQL is reached with `sslmode=disable` so that the proxy can read it.
//! - **On the server.** Redis: `INFO commandstats`, reset with `CONFIG RESETSTAT` before
//!   each case, with each command's `usec_per_call` (the claim and the completion are
//!   also run apart, since `cmdstat_fcall` lumps every function together); by default
//!   on a private `redis-server` the program starts on a free port, so that no other
//!   client's commands are counted (`--redis URL` uses another server). The commands a
//!   function runs are counted by the server too, and shown apart. MariaDB/MySQL: the
//!   general log (every command: `Prepare`, `Execute`, `Query`), and the slow query log
//!   with `long_query_time = 0` and `log_slow_disabled_statements = ''` for the
//!   statements run inside the claim procedure, both switched on for the run (files in
//!   the temporary directory; `--mysql-log PATH` names the general log, the slow log
//!   goes beside it) and restored after it; the lines of the proxied connections' thread
//!   ids. PostgreSQL: `log_statement = 'all'` and `log_min_duration_statement = 0` with
//!   `ALTER SYSTEM` and `pg_reload_conf()` for the run (then `ALTER SYSTEM RESET`), the
//!   lines of the proxied backends' pids
//!   in the server's log (`pg_current_logfile()`, else Debian's
//!   `/var/log/postgresql/postgresql-<major>-main.log`, or `--pg-log PATH`): each
//!   statement run (`execute`, `statement`) and each `parse`, which shows a statement
//!   prepared again. SQLite: an `sqlite3_trace_v2` hook on every connection of the
//!   store's pool counts each statement SQLite runs, and the pool's `after_release`
//!   hook each return of a connection (sqlx then pings it: one more call to the
//!   connection's worker thread).
//!
//! Options: `--stores` (comma list of redis, mysql, postgres, sqlite; default all),
//! `--messages N`, `--redis URL`, `--mysql-log PATH`, `--pg-log PATH`. The servers come
//! from `IDEMPOTENT_MYSQL_URL` and `IDEMPOTENT_POSTGRES_URL` with the local defaults.
//! Changing the log settings needs a superuser on both databases (root, postgres). The
//! program prints each case's counts in full as it goes, then the tables of
//! `BENCHMARKS.md` ("Round trips and statements per message").

mod support;
#[path = "support/wire.rs"]
mod wire;

use idempotent_runtime::redis::{self, aio::ConnectionManager};
use idempotent_runtime::sqlx::{self, AssertSqlSafe};
use idempotent_runtime::store::{ClaimOutcome, ClaimRequest, Completion};
use idempotent_runtime::{
    Error, MySqlStore, PostgresStore, RecordKey, RedisStore, SqliteStore, Store, idempotent,
};
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use wire::{Counts, Protocol, Proxy};

// ------------------------------------------------------------------ options

struct Options {
    stores: Vec<String>,
    messages: u64,
    redis: Option<String>,
    mysql_log: Option<PathBuf>,
    pg_log: Option<PathBuf>,
}

const ALL_STORES: [&str; 4] = ["redis", "mysql", "postgres", "sqlite"];

fn options() -> Result<Options, String> {
    let mut o = Options {
        stores: ALL_STORES.map(String::from).to_vec(),
        messages: 500,
        redis: None,
        mysql_log: None,
        pg_log: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--stores" => o.stores = value()?.split(',').map(str::to_owned).collect(),
            "--messages" => {
                o.messages = value()?.parse().map_err(|e| format!("--messages: {e}"))?
            }
            "--redis" => o.redis = Some(value()?),
            "--mysql-log" => o.mysql_log = Some(value()?.into()),
            "--pg-log" => o.pg_log = Some(value()?.into()),
            "-h" | "--help" => {
                return Err("usage: roundtrips [--stores redis,mysql,postgres,sqlite] \
                            [--messages N] [--redis URL] [--mysql-log PATH] [--pg-log PATH]"
                    .into());
            }
            other => return Err(format!("unknown option {other}; see --help")),
        }
    }
    for s in &o.stores {
        if !ALL_STORES.contains(&s.as_str()) {
            return Err(format!("unknown store {s}"));
        }
    }
    o.messages = o.messages.max(10);
    Ok(o)
}

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// `url` with its `host:port` replaced by `addr`.
fn through(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{path}", user.unwrap_or_default())
}

/// The `host:port` of `url`.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// `url` with the query parameter `param` added.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

// ------------------------------------------------------------------ the handler

#[derive(Debug)]
struct CountError(#[allow(dead_code)] Error);

impl From<Error> for CountError {
    fn from(e: Error) -> Self {
        CountError(e)
    }
}

static BODY_RUNS: AtomicU64 = AtomicU64::new(0);

async fn body(key: &str) -> Result<u32, CountError> {
    BODY_RUNS.fetch_add(1, Ordering::Relaxed);
    Ok(key.len() as u32)
}

/// The store of the store being counted; stores put here live for the rest of the run.
static CURRENT: RwLock<Option<&'static dyn Store>> = RwLock::new(None);

fn current() -> &'static dyn Store {
    CURRENT.read().unwrap().expect("a store is selected")
}

fn select(store: Arc<dyn Store>) {
    let leaked: &'static Arc<dyn Store> = Box::leak(Box::new(store));
    *CURRENT.write().unwrap() = Some(&**leaked);
}

#[idempotent(key = "key", store = current(), scope = "roundtrips")]
async fn on_message(key: &str) -> Result<u32, CountError> {
    body(key).await
}

// ------------------------------------------------------------------ the loop

/// The hand-written loop of `examples/bench.rs`, on a table of its own.
#[derive(Clone)]
enum Loop {
    Redis(ConnectionManager),
    MySql(sqlx::MySqlPool, LoopSql),
    Postgres(sqlx::PgPool, LoopSql),
    Sqlite(sqlx::SqlitePool, LoopSql),
}

/// The loop's statements on its table.
#[derive(Clone)]
struct LoopSql {
    create: String,
    insert: String,
    update: String,
    insert_dup: String,
    select: String,
    drop: String,
}

impl LoopSql {
    fn new(store: &str) -> LoopSql {
        let t = format!("rt_loop_{}", std::process::id());
        let p = |n: usize| {
            if store == "postgres" {
                format!("${n}")
            } else {
                "?".into()
            }
        };
        let (bytes, text) = match store {
            "postgres" => ("BYTEA", "VARCHAR(200)"),
            "mysql" => ("VARBINARY(255)", "VARCHAR(200)"),
            _ => ("BLOB", "TEXT"),
        };
        LoopSql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (message_id {text} PRIMARY KEY, \
                 status INT NOT NULL, output {bytes})"
            ),
            insert: format!("INSERT INTO {t} (message_id, status) VALUES ({}, 0)", p(1)),
            update: format!(
                "UPDATE {t} SET status = 1, output = {} WHERE message_id = {}",
                p(1),
                p(2)
            ),
            insert_dup: match store {
                "mysql" => format!("INSERT IGNORE INTO {t} (message_id, status) VALUES (?, 0)"),
                _ => format!(
                    "INSERT INTO {t} (message_id, status) VALUES ({}, 0) ON CONFLICT DO NOTHING",
                    p(1)
                ),
            },
            select: format!("SELECT status, output FROM {t} WHERE message_id = {}", p(1)),
            drop: format!("DROP TABLE IF EXISTS {t}"),
        }
    }
}

macro_rules! sql_first {
    ($pool:expr, $s:expr, $k:expr) => {{
        sqlx::query(AssertSqlSafe($s.insert.clone()))
            .bind($k)
            .execute($pool)
            .await
            .unwrap();
        let out = body($k).await.unwrap();
        sqlx::query(AssertSqlSafe($s.update.clone()))
            .bind(out.to_string().into_bytes())
            .bind($k)
            .execute($pool)
            .await
            .unwrap();
    }};
}

macro_rules! sql_duplicate {
    ($pool:expr, $s:expr, $k:expr) => {{
        let r = sqlx::query(AssertSqlSafe($s.insert_dup.clone()))
            .bind($k)
            .execute($pool)
            .await
            .unwrap();
        assert_eq!(r.rows_affected(), 0);
        let row = sqlx::query(AssertSqlSafe($s.select.clone()))
            .bind($k)
            .fetch_one($pool)
            .await
            .unwrap();
        std::hint::black_box(row);
    }};
}

macro_rules! sql_run {
    ($pool:expr, $s:expr) => {{
        for stmt in [&$s.drop, &$s.create] {
            sqlx::query(AssertSqlSafe(stmt.clone()))
                .execute($pool)
                .await
                .unwrap();
        }
    }};
}

impl Loop {
    async fn setup(&self) {
        match self {
            Loop::Redis(_) => {}
            Loop::MySql(p, s) => sql_run!(p, s),
            Loop::Postgres(p, s) => sql_run!(p, s),
            Loop::Sqlite(p, s) => sql_run!(p, s),
        }
    }

    async fn first(&self, k: &str) {
        match self {
            Loop::Redis(c) => {
                let mut c = c.clone();
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(k)
                    .arg("0")
                    .arg("NX")
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert!(claimed.is_some());
                let out = body(k).await.unwrap();
                let _: Option<String> = redis::cmd("SET")
                    .arg(k)
                    .arg(out)
                    .arg("XX")
                    .arg("PX")
                    .arg(604_800_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
            Loop::MySql(p, s) => sql_first!(p, s, k),
            Loop::Postgres(p, s) => sql_first!(p, s, k),
            Loop::Sqlite(p, s) => sql_first!(p, s, k),
        }
    }

    async fn duplicate(&self, k: &str) {
        match self {
            Loop::Redis(c) => {
                let mut c = c.clone();
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(k)
                    .arg("0")
                    .arg("NX")
                    .arg("PX")
                    .arg(60_000)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert!(claimed.is_none());
                let out: Option<String> =
                    redis::cmd("GET").arg(k).query_async(&mut c).await.unwrap();
                std::hint::black_box(out.expect("completed"));
            }
            Loop::MySql(p, s) => sql_duplicate!(p, s, k),
            Loop::Postgres(p, s) => sql_duplicate!(p, s, k),
            Loop::Sqlite(p, s) => sql_duplicate!(p, s, k),
        }
    }

    async fn clean_up(&self) {
        match self {
            Loop::Redis(_) | Loop::Sqlite(..) => {}
            Loop::MySql(p, s) => {
                let _ = sqlx::query(AssertSqlSafe(s.drop.clone())).execute(p).await;
            }
            Loop::Postgres(p, s) => {
                let _ = sqlx::query(AssertSqlSafe(s.drop.clone())).execute(p).await;
            }
        }
    }
}

// ------------------------------------------------------------------ SQLite hooks

/// Statements SQLite ran on the store's connections, by their first keyword.
static SQLITE_STATEMENTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
/// Connections given back to the store's SQLite pool (sqlx pings each).
static SQLITE_RELEASES: AtomicU64 = AtomicU64::new(0);

const SQLITE_TRACE_STMT: c_uint = 0x01;

unsafe extern "C" {
    fn sqlite3_trace_v2(
        db: *mut c_void,
        mask: c_uint,
        callback: Option<
            unsafe extern "C" fn(c_uint, *mut c_void, *mut c_void, *mut c_void) -> c_int,
        >,
        context: *mut c_void,
    ) -> c_int;
}

/// `SQLITE_TRACE_STMT`: a statement starts running; `x` is its text.
unsafe extern "C" fn on_statement(
    _event: c_uint,
    _context: *mut c_void,
    _stmt: *mut c_void,
    x: *mut c_void,
) -> c_int {
    // SAFETY: SQLite passes the statement's text, NUL-terminated, for this event
    let text = unsafe { CStr::from_ptr(x as *const c_char) }.to_string_lossy();
    *SQLITE_STATEMENTS
        .lock()
        .unwrap()
        .entry(wire::summary(&text))
        .or_default() += 1;
    0
}

async fn trace(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr().cast::<c_void>();
    // SAFETY: `db` is the connection's open handle; the callback lives for the program
    unsafe {
        sqlite3_trace_v2(
            db,
            SQLITE_TRACE_STMT,
            Some(on_statement),
            std::ptr::null_mut(),
        )
    };
    Ok(())
}

/// The store on a pool whose connections carry the statement hook, set up as
/// `SqliteStore::connect_with_table` sets up its own (write-ahead log,
/// `synchronous = NORMAL`, a busy timeout).
async fn sqlite_store(path: &str, table: &str) -> SqliteStore {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    use std::str::FromStr;
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}?mode=rwc"))
        .expect("sqlite url")
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(SqliteStore::BUSY_TIMEOUT);
    let pool = SqlitePoolOptions::new()
        .after_connect(|conn, _| Box::pin(trace(conn)))
        .after_release(|_, _| {
            Box::pin(async {
                SQLITE_RELEASES.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            })
        });
    let pool = SqliteStore::open_pool(pool, options)
        .await
        .expect("sqlite pool");
    let store = SqliteStore::from_pool(pool)
        .with_table(table)
        .expect("table name");
    store.migrate().await.expect("sqlite table");
    store
}

// ------------------------------------------------------------------ server counts

/// A `redis-server` of this program on a free port, in its own directory; killed when
/// dropped.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl RedisServer {
    fn start() -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let dir = std::env::temp_dir().join(format!(
            "idempotent-roundtrips-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server (is it on PATH? else pass --redis URL): {e}")
            })?;
        Ok(RedisServer { port, dir, child })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the server's own counts come from.
enum ServerLog {
    /// `INFO commandstats`, on a connection that does not go through the proxy.
    Redis(ConnectionManager),
    /// Log files the server writes and this program can read.
    Files(Vec<(PathBuf, LogKind)>),
    Sqlite,
    /// Not available: why.
    Missing(String),
}

#[derive(Clone, Copy)]
enum LogKind {
    /// MariaDB's general log: every command a client sends.
    MySql,
    /// MariaDB's slow query log with `long_query_time = 0`: the statements run inside
    /// stored procedures (the other ones are in the general log).
    MySqlSlow,
    Postgres,
}

/// What the server counted in one case: statements (or commands) by kind, and for
/// Redis each command's mean time on the server.
#[derive(Default)]
struct ServerCounts {
    by_kind: BTreeMap<String, u64>,
    usec_per_call: BTreeMap<String, f64>,
    /// Connections given back to a pool (SQLite: each pinged).
    releases: u64,
    note: Option<String>,
}

impl ServerLog {
    /// Starts a case: resets the counters, or notes where the log ends.
    async fn mark(&self) -> Vec<u64> {
        match self {
            ServerLog::Redis(c) => {
                let _: () = redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query_async(&mut c.clone())
                    .await
                    .expect("CONFIG RESETSTAT");
                Vec::new()
            }
            ServerLog::Files(files) => files
                .iter()
                .map(|(path, _)| std::fs::metadata(path).map_or(0, |m| m.len()))
                .collect(),
            ServerLog::Sqlite | ServerLog::Missing(_) => Vec::new(),
        }
    }

    /// What the server counted since `mark`, on the connections `ids`.
    async fn read(
        &self,
        mark: &[u64],
        ids: &[u64],
        sqlite_before: &SqliteSnapshot,
    ) -> ServerCounts {
        let mut out = ServerCounts::default();
        match self {
            ServerLog::Redis(c) => {
                let info: String = redis::cmd("INFO")
                    .arg("commandstats")
                    .query_async(&mut c.clone())
                    .await
                    .expect("INFO commandstats");
                for line in info.lines() {
                    let Some((name, fields)) = line
                        .strip_prefix("cmdstat_")
                        .and_then(|l| l.split_once(':'))
                    else {
                        continue;
                    };
                    if name.starts_with("config") || name == "info" {
                        continue;
                    }
                    let field = |f: &str| {
                        fields
                            .split(',')
                            .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))
                            .and_then(|v| v.parse::<f64>().ok())
                    };
                    let name = name.to_uppercase();
                    out.by_kind
                        .insert(name.clone(), field("calls").unwrap_or(0.0) as u64);
                    out.usec_per_call
                        .insert(name, field("usec_per_call").unwrap_or(0.0));
                }
            }
            ServerLog::Files(files) => {
                for ((path, kind), from) in files.iter().zip(mark) {
                    let text = match read_from(path, *from) {
                        Ok(t) => t,
                        Err(e) => {
                            out.note = Some(format!("{}: {e}", path.display()));
                            return out;
                        }
                    };
                    let lines: Vec<(u64, String)> = match kind {
                        LogKind::MySql => text.lines().filter_map(mysql_log_line).collect(),
                        LogKind::MySqlSlow => mysql_routine_statements(&text),
                        LogKind::Postgres => text.lines().filter_map(postgres_log_line).collect(),
                    };
                    for (id, what) in lines {
                        if ids.contains(&id) {
                            *out.by_kind.entry(what).or_default() += 1;
                        }
                    }
                }
            }
            ServerLog::Sqlite => {
                let now = SqliteSnapshot::take();
                out.by_kind = now.statements;
                for (k, n) in &sqlite_before.statements {
                    *out.by_kind.get_mut(k).expect("counts only grow") -= n;
                }
                out.by_kind.retain(|_, n| *n > 0);
                out.releases = now.releases - sqlite_before.releases;
            }
            ServerLog::Missing(why) => out.note = Some(why.clone()),
        }
        out
    }
}

#[derive(Default)]
struct SqliteSnapshot {
    statements: BTreeMap<String, u64>,
    releases: u64,
}

impl SqliteSnapshot {
    fn take() -> SqliteSnapshot {
        SqliteSnapshot {
            statements: SQLITE_STATEMENTS.lock().unwrap().clone(),
            releases: SQLITE_RELEASES.load(Ordering::Relaxed),
        }
    }
}

fn read_from(path: &PathBuf, offset: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A line of MariaDB's general log: the thread id and `Command summary`
/// (`Execute UPDATE`, `Query BEGIN`).
fn mysql_log_line(line: &str) -> Option<(u64, String)> {
    let mut fields = line.split('\t');
    while let Some(f) = fields.next() {
        // `<thread id> <Command>`; the first line of each second starts with its time
        let Some((id, command)) = f.trim().split_once(' ') else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else { continue };
        if !command.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue;
        }
        let arg = fields.next().unwrap_or("");
        let what = match command {
            "Query" | "Execute" | "Prepare" => format!("{command} {}", wire::summary(arg)),
            c => c.to_owned(),
        };
        return Some((id, what));
    }
    None
}

/// The statements MariaDB's slow query log shows run inside a stored procedure (an
/// entry with `# Stored_routine:`), each with the thread id of its entry, as
/// `in CALL: SELECT`.
fn mysql_routine_statements(text: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let (mut thread, mut routine, mut taken) = (None, false, true);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# Thread_id: ") {
            thread = rest.split_whitespace().next().and_then(|t| t.parse().ok());
            (routine, taken) = (false, false);
        } else if line.starts_with("# Stored_routine:") {
            routine = true;
        } else if line.starts_with('#')
            || line.starts_with("SET timestamp=")
            || line.starts_with("use ")
        {
        } else if !taken {
            taken = true;
            if let (true, Some(id)) = (routine, thread) {
                out.push((id, format!("in CALL: {}", wire::summary(line))));
            }
        }
    }
    out
}

/// A line of PostgreSQL's log: the backend's pid and what it ran (`execute …`,
/// `statement …`) or prepared (`parse …`); other lines (parameters, durations of
/// statements already logged, binds) are left out.
fn postgres_log_line(line: &str) -> Option<(u64, String)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let pid = line[open + 1..close].parse().ok()?;
    let (_, msg) = line.split_once("LOG:  ")?;
    let msg = msg
        .strip_prefix("duration: ")
        .map_or(msg, |m| m.split_once(" ms  ").map_or("", |(_, rest)| rest));
    let (what, text) = msg.split_once(": ")?;
    let kind = what.split_whitespace().next()?;
    match kind {
        "execute" | "statement" | "parse" => Some((pid, format!("{kind} {}", wire::summary(text)))),
        _ => None,
    }
}

// ------------------------------------------------------------------ cases

/// One case's counts.
struct Case {
    store: &'static str,
    side: &'static str,
    case: &'static str,
    messages: u64,
    wire: Option<Counts>,
    server: ServerCounts,
}

/// Everything one store's cases need.
struct Bench<'a> {
    store_name: &'static str,
    store: Arc<dyn Store>,
    raw: Loop,
    proxy: Option<&'a Proxy>,
    log: &'a ServerLog,
    n: u64,
    prefix: String,
}

impl Bench<'_> {
    /// Runs and counts one case: `f(i)` for `i` in `0..n`, one at a time.
    async fn count<F, Fut>(&self, side: &'static str, case: &'static str, f: F) -> Case
    where
        F: Fn(u64) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        // pings of connections given back just before must not fall into the case
        tokio::time::sleep(Duration::from_millis(300)).await;
        let wire_before = self.proxy.map(Proxy::counts);
        let sqlite_before = SqliteSnapshot::take();
        let mark = self.log.mark().await;
        for i in 0..self.n {
            f(i).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let wire = self
            .proxy
            .map(|p| p.counts().since(wire_before.as_ref().unwrap()));
        let ids = self.proxy.map(Proxy::server_ids).unwrap_or_default();
        let server = self.log.read(&mark, &ids, &sqlite_before).await;
        let c = Case {
            store: self.store_name,
            side,
            case,
            messages: self.n,
            wire,
            server,
        };
        print_case(&c);
        c
    }

    fn key(&self, what: &str, i: u64) -> String {
        format!("{}-{what}-{i}", self.prefix)
    }

    async fn cases(&self, out: &mut Vec<Case>) {
        let n = self.n;
        // warm-up: connections opened, statements prepared, the library loaded
        for i in 0..50 {
            self.raw.first(&self.key("warm-raw", i)).await;
            self.raw.duplicate(&self.key("warm-raw", i)).await;
            on_message(&self.key("warm-fw", i)).await.unwrap();
            on_message(&self.key("warm-fw", i)).await.unwrap();
        }
        let runs = BODY_RUNS.load(Ordering::Relaxed);
        out.push(
            self.count("loop", "first delivery", |i| async move {
                self.raw.first(&self.key("raw", i)).await
            })
            .await,
        );
        out.push(
            self.count("loop", "duplicate", |i| async move {
                self.raw.duplicate(&self.key("raw", i)).await
            })
            .await,
        );
        out.push(
            self.count("framework", "first delivery", |i| async move {
                on_message(&self.key("fw", i)).await.unwrap();
            })
            .await,
        );
        out.push(
            self.count("framework", "duplicate", |i| async move {
                on_message(&self.key("fw", i)).await.unwrap();
            })
            .await,
        );
        // every key's body ran once: in the loop's first deliveries and the framework's
        assert_eq!(BODY_RUNS.load(Ordering::Relaxed) - runs, 2 * n);

        if self.store_name == "redis" {
            // the claim and the completion apart, for the server's time of each function
            let keys: Vec<RecordKey> = (0..n)
                .map(|i| RecordKey::new("roundtrips", self.key("apart", i).as_str()).unwrap())
                .collect();
            let tokens = Mutex::new(Vec::new());
            out.push(
                self.count("framework", "claim alone", |i| {
                    let (keys, tokens) = (&keys, &tokens);
                    async move {
                        let req = ClaimRequest {
                            key: &keys[i as usize],
                            lease: Duration::from_secs(60),
                            ttl: Duration::from_secs(7 * 24 * 3600),
                            fingerprint: None,
                            max_attempts: None,
                        };
                        match self.store.claim(&req).await.unwrap() {
                            ClaimOutcome::Acquired { token, .. } => {
                                tokens.lock().unwrap().push(token)
                            }
                            other => panic!("claim of a new key: {other:?}"),
                        }
                    }
                })
                .await,
            );
            let tokens = tokens.into_inner().unwrap();
            out.push(
                self.count("framework", "completion alone", |i| {
                    let (keys, tokens) = (&keys, &tokens);
                    async move {
                        let c = Completion {
                            key: &keys[i as usize],
                            token: tokens[i as usize],
                            output: Some(b"12"),
                            ttl: Duration::from_secs(7 * 24 * 3600),
                        };
                        self.store.complete(&c).await.unwrap();
                    }
                })
                .await,
            );
        }
    }
}

/// `count / n`, with at most two decimals (three below 0.01).
fn per(count: u64, n: u64) -> String {
    let v = count as f64 / n as f64;
    // the few connections a pool opens during a case stay visible
    let s = if v > 0.0 && v < 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2}")
    };
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn breakdown(by_kind: &BTreeMap<String, u64>, n: u64) -> String {
    by_kind
        .iter()
        .map(|(k, c)| format!("{} × {k}", per(*c, n)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_case(c: &Case) {
    println!(
        "{} / {} / {} ({} messages)",
        c.store, c.side, c.case, c.messages
    );
    if let Some(w) = &c.wire {
        println!(
            "  wire: {} round trips per message: {}{}",
            per(w.round_trips, c.messages),
            breakdown(&w.by_kind, c.messages),
            if w.connections > 0 {
                format!(" ({} connections opened during the case)", w.connections)
            } else {
                String::new()
            }
        );
    }
    let total: u64 = c.server.by_kind.values().sum();
    println!(
        "  server: {} per message: {}",
        per(total, c.messages),
        breakdown(&c.server.by_kind, c.messages)
    );
    if !c.server.usec_per_call.is_empty() {
        let us: Vec<String> = c
            .server
            .usec_per_call
            .iter()
            .map(|(k, v)| format!("{k} {v:.2} µs"))
            .collect();
        println!("  usec_per_call: {}", us.join(", "));
    }
    if c.store == "sqlite" {
        println!(
            "  connections given back to the pool (each pinged): {} per message",
            per(c.server.releases, c.messages)
        );
    }
    if let Some(note) = &c.server.note {
        println!("  server counts unavailable: {note}");
    }
}

// ------------------------------------------------------------------ stores

/// Counts one store's cases.
async fn run_store(
    name: &str,
    opts: &Options,
    dir: &std::path::Path,
    out: &mut Vec<Case>,
) -> Result<(), String> {
    let pid = std::process::id();
    let table = format!("rt_fw_{pid}");
    let prefix = format!("rt-{pid}");
    let n = opts.messages;
    match name {
        "redis" => {
            let private = match &opts.redis {
                Some(_) => None,
                None => Some(RedisServer::start()?),
            };
            let url = opts
                .redis
                .clone()
                .unwrap_or_else(|| private.as_ref().unwrap().url());
            let admin = support::Server::redis(&url)
                .reach(async {
                    // a private server needs a moment to listen
                    let client = redis::Client::open(url.as_str())?;
                    let mut last = None;
                    for _ in 0..100 {
                        match ConnectionManager::new(client.clone()).await {
                            Ok(c) => return Ok(c),
                            Err(e) => last = Some(e),
                        }
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                    Err(last.unwrap())
                })
                .await?;
            let proxy = Proxy::start(Protocol::Redis, host_port(&url, 6379))
                .await
                .map_err(|e| e.to_string())?;
            let proxied = through(&url, proxy.addr);
            let store = RedisStore::connect(&proxied)
                .await
                .map_err(|e| e.to_string())?
                .with_prefix(format!("{prefix}:"));
            let raw = Loop::Redis(
                ConnectionManager::new(redis::Client::open(proxied.as_str()).unwrap())
                    .await
                    .map_err(|e| e.to_string())?,
            );
            select(Arc::new(store.clone()));
            let log = ServerLog::Redis(admin.clone());
            let bench = Bench {
                store_name: "redis",
                store: Arc::new(store),
                raw,
                proxy: Some(&proxy),
                log: &log,
                n,
                prefix: format!("{prefix}-raw"),
            };
            bench.cases(out).await;
            if opts.redis.is_some() {
                // a shared server: remove this run's keys
                for pattern in [format!("{prefix}:*"), format!("{prefix}-raw*")] {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(&pattern)
                        .query_async(&mut admin.clone())
                        .await
                        .unwrap_or_default();
                    for chunk in keys.chunks(1000) {
                        let _: Result<i64, _> = redis::cmd("UNLINK")
                            .arg(chunk)
                            .query_async(&mut admin.clone())
                            .await;
                    }
                }
            }
        }
        "mysql" => {
            let url = env_url("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
            let admin = support::Server::mysql(&url)
                .reach(
                    sqlx::mysql::MySqlPoolOptions::new()
                        .max_connections(1)
                        .connect(&url),
                )
                .await?;
            // the general log (every command) and the slow query log with every
            // statement, those inside procedures too, for the run; a session takes
            // `long_query_time` and `log_slow_disabled_statements` when it connects, so
            // they are set before the store opens its pool, and restored after
            let general = opts
                .mysql_log
                .clone()
                .unwrap_or_else(|| dir.join("general.log"));
            let slow = general.with_extension("slow.log");
            let names = [
                "general_log_file",
                "general_log",
                "slow_query_log_file",
                "slow_query_log",
                "long_query_time",
                "log_slow_disabled_statements",
            ];
            let mut old = Vec::new();
            for name in names {
                let (v,): (String,) = sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT CAST(@@GLOBAL.{name} AS CHAR)"
                )))
                .fetch_one(&admin)
                .await
                .map_err(|e| e.to_string())?;
                old.push(v);
            }
            let set = async |values: &[String]| -> Result<(), sqlx::Error> {
                for (name, v) in names.iter().zip(values) {
                    // numbers as numbers (a string is refused for `long_query_time`)
                    let value = if v.parse::<f64>().is_ok() {
                        v.clone()
                    } else {
                        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
                    };
                    sqlx::raw_sql(AssertSqlSafe(format!("SET GLOBAL {name} = {value}")))
                        .execute(&admin)
                        .await?;
                }
                Ok(())
            };
            let on = [
                general.display().to_string(),
                "ON".into(),
                slow.display().to_string(),
                "ON".into(),
                "0".into(),
                String::new(),
            ];
            let log = match set(&on).await {
                Ok(()) => {
                    ServerLog::Files(vec![(general, LogKind::MySql), (slow, LogKind::MySqlSlow)])
                }
                Err(e) => ServerLog::Missing(format!("log settings: {e}")),
            };
            let proxy = Proxy::start(Protocol::MySql, host_port(&url, 3306))
                .await
                .map_err(|e| e.to_string())?;
            let proxied = with_param(&through(&url, proxy.addr), "ssl-mode=DISABLED");
            let connected = MySqlStore::connect_with_table(&proxied, &table).await;
            let counted = match connected {
                Ok(store) => {
                    let raw = Loop::MySql(store.pool().clone(), LoopSql::new("mysql"));
                    raw.setup().await;
                    select(Arc::new(store.clone()));
                    let bench = Bench {
                        store_name: "mysql",
                        store: Arc::new(store.clone()),
                        raw: raw.clone(),
                        proxy: Some(&proxy),
                        log: &log,
                        n,
                        prefix,
                    };
                    bench.cases(out).await;
                    raw.clean_up().await;
                    store.pool().close().await;
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = set(&old).await {
                eprintln!("could not restore the log settings: {e}");
            }
            for stmt in [
                format!("DROP PROCEDURE IF EXISTS {table}_claim_v2"),
                format!("DROP TABLE IF EXISTS {table}"),
            ] {
                let _ = sqlx::query(AssertSqlSafe(stmt)).execute(&admin).await;
            }
            counted?;
        }
        "postgres" => {
            let url = env_url(
                "IDEMPOTENT_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            );
            let admin = support::Server::postgres(&url)
                .reach(
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&url),
                )
                .await?;
            let proxy = Proxy::start(Protocol::Postgres, host_port(&url, 5432))
                .await
                .map_err(|e| e.to_string())?;
            let proxied = with_param(&through(&url, proxy.addr), "sslmode=disable");
            let store = PostgresStore::connect_with_table(&proxied, &table)
                .await
                .map_err(|e| e.to_string())?;
            let raw = Loop::Postgres(store.pool().clone(), LoopSql::new("postgres"));
            raw.setup().await;
            select(Arc::new(store.clone()));
            let path = match &opts.pg_log {
                Some(p) => Some(p.clone()),
                None => {
                    let (file, version): (Option<String>, i32) = sqlx::query_as(
                        "SELECT pg_current_logfile(), current_setting('server_version_num')::int",
                    )
                    .fetch_one(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                    match file {
                        // relative to the data directory
                        Some(f) if !f.starts_with('/') => {
                            let data: (String,) =
                                sqlx::query_as("SELECT current_setting('data_directory')")
                                    .fetch_one(&admin)
                                    .await
                                    .map_err(|e| e.to_string())?;
                            Some(PathBuf::from(data.0).join(f))
                        }
                        Some(f) => Some(f.into()),
                        None => Some(
                            format!(
                                "/var/log/postgresql/postgresql-{}-main.log",
                                version / 10000
                            )
                            .into(),
                        ),
                    }
                }
            };
            let settings = async |on: bool| -> Result<(), sqlx::Error> {
                let stmts: &[&str] = if on {
                    &[
                        "ALTER SYSTEM SET log_statement = 'all'",
                        "ALTER SYSTEM SET log_min_duration_statement = 0",
                    ]
                } else {
                    &[
                        "ALTER SYSTEM RESET log_statement",
                        "ALTER SYSTEM RESET log_min_duration_statement",
                    ]
                };
                for s in stmts {
                    sqlx::raw_sql(AssertSqlSafe(*s)).execute(&admin).await?;
                }
                sqlx::raw_sql("SELECT pg_reload_conf()")
                    .execute(&admin)
                    .await?;
                // every backend reads the new settings at its next command
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            };
            let log = match (path, settings(true).await) {
                (Some(path), Ok(())) if std::fs::File::open(&path).is_ok() => {
                    ServerLog::Files(vec![(path, LogKind::Postgres)])
                }
                (Some(path), Ok(())) => {
                    ServerLog::Missing(format!("cannot read the server's log {}", path.display()))
                }
                (_, Err(e)) => ServerLog::Missing(format!("log settings: {e}")),
                (None, _) => ServerLog::Missing("no server log".into()),
            };
            let bench = Bench {
                store_name: "postgres",
                store: Arc::new(store.clone()),
                raw: raw.clone(),
                proxy: Some(&proxy),
                log: &log,
                n,
                prefix,
            };
            bench.cases(out).await;
            if let Err(e) = settings(false).await {
                eprintln!("could not reset the log settings: {e}");
            }
            raw.clean_up().await;
            let _ = sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                .execute(&admin)
                .await;
        }
        _ => {
            let path = dir.join("roundtrips.db").display().to_string();
            let store = sqlite_store(&path, &table).await;
            let raw = Loop::Sqlite(store.pool().clone(), LoopSql::new("sqlite"));
            raw.setup().await;
            select(Arc::new(store.clone()));
            let log = ServerLog::Sqlite;
            let bench = Bench {
                store_name: "sqlite",
                store: Arc::new(store),
                raw,
                proxy: None,
                log: &log,
                n,
                prefix,
            };
            bench.cases(out).await;
        }
    }
    Ok(())
}

/// Whether a round trip's kind is a pool's ping.
fn is_ping(kind: &str) -> bool {
    kind == "Ping" || kind == "Sync (ping)"
}

/// A case's round trips per message, as a cell (`4 (2 + 2 pings)`), and what the
/// ones that are not pings sent.
fn trips_cell(c: &Case) -> (String, String) {
    let n = c.messages;
    let (total, pings, what) = match &c.wire {
        Some(w) => {
            let pings: u64 = w
                .by_kind
                .iter()
                .filter(|(k, _)| is_ping(k))
                .map(|(_, n)| n)
                .sum();
            let mut rest = w.by_kind.clone();
            rest.retain(|k, _| !is_ping(k));
            (w.round_trips, pings, breakdown(&rest, n))
        }
        // in process: each statement and each ping is a call to a connection's thread
        None => {
            let statements: u64 = c.server.by_kind.values().sum();
            let releases = c.server.releases;
            (
                statements + releases,
                releases,
                "calls to the connections' threads".into(),
            )
        }
    };
    let cell = if pings == 0 {
        per(total, n)
    } else {
        format!(
            "{} ({} + {} pings)",
            per(total, n),
            per(total - pings, n),
            per(pings, n)
        )
    };
    (cell, what)
}

/// A case's statements per message as the server counted them, as a cell, and what
/// they are: the statements the client had run (on MariaDB `Execute` and `Query`, on
/// PostgreSQL `execute` and `statement`; on Redis the commands it sent), then apart
/// those prepared (a `Prepare`, a `parse`), those run inside a procedure or a function
/// (MariaDB's slow log; on Redis the commands a function runs, which the server counts
/// too) and any other command (a connection opened during the case).
fn statements_cell(c: &Case) -> (String, String) {
    let n = c.messages;
    let redis_sent: Vec<String> = match (&c.wire, c.store) {
        (Some(w), "redis") => w
            .by_kind
            .keys()
            .map(|k| k.split_whitespace().next().unwrap_or("").to_owned())
            .collect(),
        _ => Vec::new(),
    };
    let (mut run, mut prepared, mut inside, mut other) = (
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
    );
    for (k, v) in &c.server.by_kind {
        let first = k.split_whitespace().next().unwrap_or("");
        let into = match c.store {
            "redis" if redis_sent.iter().any(|s| s == k) => &mut run,
            "redis" => &mut inside,
            "sqlite" => &mut run,
            _ if matches!(first, "Execute" | "Query" | "execute" | "statement") => &mut run,
            _ if matches!(first, "Prepare" | "parse") => &mut prepared,
            _ if k.starts_with("in CALL:") => &mut inside,
            _ => &mut other,
        };
        into.insert(k.clone(), *v);
    }
    if let Some(note) = &c.server.note {
        return ("—".into(), note.clone());
    }
    let total: u64 = run.values().sum();
    let mut what = breakdown(&run, n);
    for (label, map) in [
        ("inside", &inside),
        ("prepared", &prepared),
        ("other", &other),
    ] {
        if !map.is_empty() {
            what.push_str(&format!("; {label}: {}", breakdown(map, n)));
        }
    }
    (per(total, n), what)
}

/// The table: per store and case, the loop's round trips and statements beside the
/// framework's; then Redis's time per command on the server.
fn print_table(cases: &[Case]) {
    let find = |store: &str, side: &str, case: &str| {
        cases
            .iter()
            .find(|c| c.store == store && c.side == side && c.case == case)
    };
    println!();
    println!(
        "| store | case | loop: round trips | loop: statements | framework: round trips | \
         framework: statements | the loop's | the framework's |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |");
    for store in ALL_STORES {
        for case in ["first delivery", "duplicate"] {
            let (Some(l), Some(f)) = (find(store, "loop", case), find(store, "framework", case))
            else {
                continue;
            };
            let ((lt, lt_what), (ls, ls_what)) = (trips_cell(l), statements_cell(l));
            let ((ft, ft_what), (fs, fs_what)) = (trips_cell(f), statements_cell(f));
            let what = |trips: String, statements: String| {
                if trips == statements || trips.starts_with("calls") {
                    statements
                } else {
                    format!("{trips}; server: {statements}")
                }
            };
            println!(
                "| {store} | {case} | {lt} | {ls} | {ft} | {fs} | {} | {} |",
                what(lt_what, ls_what),
                what(ft_what, fs_what)
            );
        }
    }
    let us = |side: &str, case: &str, command: &str| {
        find("redis", side, case)
            .and_then(|c| c.server.usec_per_call.get(command))
            .map_or("—".to_owned(), |v| format!("{v:.2}"))
    };
    if find("redis", "loop", "first delivery").is_some() {
        println!();
        println!("| Redis command (case) | usec_per_call |");
        println!("| --- | ---: |");
        for (label, side, case, command) in [
            (
                "`SET` (the loop's first deliveries: `SET NX PX`, `SET XX PX`)",
                "loop",
                "first delivery",
                "SET",
            ),
            (
                "`SET` (the loop's duplicates: `SET NX` that fails)",
                "loop",
                "duplicate",
                "SET",
            ),
            ("`GET` (the loop's duplicates)", "loop", "duplicate", "GET"),
            (
                "`FCALL` claim of a new key (claims alone)",
                "framework",
                "claim alone",
                "FCALL",
            ),
            (
                "`FCALL` complete (completions alone)",
                "framework",
                "completion alone",
                "FCALL",
            ),
            (
                "`FCALL` claim of a completed key (the framework's duplicates)",
                "framework",
                "duplicate",
                "FCALL",
            ),
        ] {
            println!("| {label} | {} |", us(side, case, command));
        }
    }
}

fn main() {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("idempotent-roundtrips-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // the database servers write their logs here
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut cases = Vec::new();
    let result = rt.block_on(async {
        for name in &opts.stores {
            run_store(name, &opts, &dir, &mut cases).await?;
        }
        Ok::<(), String>(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        support::fail(e);
    }
    print_table(&cases);
}
