//! The outbox table on the SQL databases: the rows a transactional handler writes in its
//! transaction ([`OutboxTransaction`]), and the statements of [`OutboxStore`] the relay
//! and the operator use, written once over the database's [`OutboxDialect`]; each
//! database gives its table, its claim and its purge in its folder (`mysql/outbox.rs`,
//! `postgres/outbox.rs`, `sqlite/outbox.rs`).
//!
//! A row per message:
//!
//! | column | what |
//! | --- | --- |
//! | `id` | the message id (16 bytes of the UUID), primary key |
//! | `seq` | emission order: an auto-increment / identity, so later writes get larger numbers |
//! | `origin_scope`, `origin_key` | the execution that emitted it (scope, encoded key) |
//! | `destination`, `payload`, `headers`, `ordering_key` | the message; `headers` a JSON list of `[name, value]` pairs |
//! | `status` | 0 pending, 1 sent, 2 dead |
//! | `attempts` | failed publishes so far |
//! | `next_attempt_us` | when a pending row is due (its backoff) |
//! | `lease_owner`, `lease_until_us`, `fence` | the relay holding it, until when, and the fencing token of the latest claim |
//! | `last_error` | the error of the last failed publish (at most 2000 bytes) |
//! | `created_us`, `sent_us` | when it was written and marked sent, microseconds since the epoch by the database clock |
//!
//! Text columns are read back as bytes (MySQL keeps them binary, so ordering keys
//! compare byte for byte) and decoded as UTF-8.

use super::base::{SqlDialect, TableName, from_micros, micros, sql};
use super::row::{Columns, corrupt};
use super::steps::SqlQuery;
use crate::error::{StoreError, StoreErrorKind};
use crate::outbox::message::{Outbox, OutgoingMessage};
use crate::outbox::store::{
    ClaimedRow, DestinationStats, OutboxPage, OutboxRow, OutboxStats, Retry, RowLease, RowStatus,
};
use crate::outbox::tx::OutboxTransaction;
use crate::store::{Fence, TxFuture};
use sqlx::{Encode, Executor, IntoArguments, Pool, Type};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Longest destination a row holds, in bytes.
pub(crate) const MAX_DESTINATION_BYTES: usize = 512;
/// Longest ordering key a row holds, in bytes.
pub(crate) const MAX_ORDERING_KEY_BYTES: usize = 255;
/// Longest relay name (`lease_owner`), in bytes.
pub(crate) const MAX_OWNER_BYTES: usize = 100;
/// `last_error` is cut to this many bytes.
const MAX_ERROR_BYTES: usize = 2000;
/// Rows one `INSERT` writes at the most: an execution that emits more takes one
/// statement per this many (the placeholders of one statement stay far below every
/// database's limit).
const INSERT_CHUNK: usize = 1000;
/// Ids one claim or mark names at the most.
const IDS_CHUNK: usize = 500;

const PENDING: i64 = 0;
const SENT: i64 = 1;
const DEAD: i64 = 2;

/// The table's columns, in order.
pub(crate) const COLUMNS: [&str; 17] = [
    "id",
    "seq",
    "origin_scope",
    "origin_key",
    "destination",
    "payload",
    "headers",
    "ordering_key",
    "status",
    "attempts",
    "next_attempt_us",
    "lease_owner",
    "lease_until_us",
    "fence",
    "last_error",
    "created_us",
    "sent_us",
];

/// The table's indexes: the suffix of their names and their columns. Due rows are
/// found by status and due time, a row's predecessors of its ordering key by key and
/// seq, the sent rows to purge by status and sent time.
pub(crate) const INDEXES: [(&str, &str); 3] = [
    ("due_idx", "status, next_attempt_us"),
    ("key_idx", "ordering_key, seq"),
    ("sent_idx", "status, sent_us"),
];

/// What the outbox differs in per database: its column types, its indexes, its claim
/// and its purge.
pub(crate) trait OutboxDialect: SqlDialect {
    /// The types (and keys) of [`COLUMNS`], in their order, separated by `", "`.
    const OUTBOX_TYPES: &'static str;
    /// What follows the column list of the `CREATE TABLE`.
    const OUTBOX_TABLE_OPTIONS: &'static str = "";
    /// The index `suffix` on `columns` of `table`: a clause of the `CREATE TABLE`
    /// (`Ok`), or a statement of its own that creates it if missing (`Err`).
    fn outbox_index(table: &TableName, suffix: &str, columns: &str) -> Result<String, String>;
    /// The statement deleting one batch of sent rows: placeholder 1 the age in
    /// microseconds, 2 the batch size.
    fn outbox_purge(s: &OutboxSql) -> String;
    /// Claims up to `limit` claimable rows (see [`OutboxSql::claimable`]), among `ids`
    /// when it is not empty, oldest first, for `owner` until `lease_us` from now: the
    /// rows' [`OutboxSql::claimed`] columns, with the new fencing token.
    fn outbox_claim<'a>(
        pool: &'a Pool<Self>,
        sql: &'a OutboxSql,
        claim: Claim<'a>,
    ) -> impl Future<Output = Result<Vec<Self::Row>, StoreError>> + Send + 'a;
    /// Marks the rows of `leases` sent (pending, under their lease's fencing token) in
    /// one statement of the database's own: the rows it changed; `None` when the
    /// database has none, and [`SqlOutbox::mark_sent`] writes the generic one (a
    /// condition per lease).
    fn outbox_mark_sent<'a>(
        _conn: &'a mut Self::Connection,
        _sql: &'a OutboxSql,
        _leases: &'a [RowLease],
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send + 'a {
        std::future::ready(Ok(None))
    }
}

/// One claim's request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Claim<'a> {
    pub(crate) owner: &'a str,
    pub(crate) lease_us: i64,
    pub(crate) limit: i64,
    pub(crate) ids: &'a [Uuid],
}

/// A database the outbox runs on: its dialect, with connections that run statements
/// and values it binds and reads. Implemented once, for every such database.
pub(crate) trait OutboxDb: OutboxDialect {
    /// Binds text (as bytes where the columns are binary).
    fn text<'q>(q: SqlQuery<'q, Self>, s: Option<&str>) -> SqlQuery<'q, Self>;
    /// Binds bytes.
    fn bytes<'q>(q: SqlQuery<'q, Self>, b: Vec<u8>) -> SqlQuery<'q, Self>;
    /// Binds an integer.
    fn int<'q>(q: SqlQuery<'q, Self>, i: i64) -> SqlQuery<'q, Self>;
    /// A row's columns.
    fn columns(row: &Self::Row) -> &dyn Columns;
    /// Runs `q` on `conn`: its rows.
    fn rows<'a>(
        conn: &'a mut Self::Connection,
        q: SqlQuery<'a, Self>,
        op: &'static str,
    ) -> impl Future<Output = Result<Vec<Self::Row>, StoreError>> + Send + 'a;
    /// Runs the write `q` on `conn`: the rows it matched.
    fn write<'a>(
        conn: &'a mut Self::Connection,
        q: SqlQuery<'a, Self>,
        op: &'static str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'a;
}

impl<DB> OutboxDb for DB
where
    DB: OutboxDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    DB::Row: Columns,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<Vec<u8>>: Encode<'q, DB> + Type<DB>,
{
    fn text<'q>(q: SqlQuery<'q, DB>, s: Option<&str>) -> SqlQuery<'q, DB> {
        match s {
            Some(s) if DB::SCOPE_AS_BYTES => q.bind(s.as_bytes().to_vec()),
            Some(s) => q.bind(s.to_owned()),
            None if DB::SCOPE_AS_BYTES => q.bind(None::<Vec<u8>>),
            None => q.bind(None::<String>),
        }
    }
    fn bytes<'q>(q: SqlQuery<'q, DB>, b: Vec<u8>) -> SqlQuery<'q, DB> {
        q.bind(b)
    }
    fn int<'q>(q: SqlQuery<'q, DB>, i: i64) -> SqlQuery<'q, DB> {
        q.bind(i)
    }
    fn columns(row: &DB::Row) -> &dyn Columns {
        row
    }
    async fn rows<'a>(
        conn: &'a mut DB::Connection,
        q: SqlQuery<'a, DB>,
        op: &'static str,
    ) -> Result<Vec<DB::Row>, StoreError> {
        q.fetch_all(conn).await.map_err(DB::err(op))
    }
    async fn write<'a>(
        conn: &'a mut DB::Connection,
        q: SqlQuery<'a, DB>,
        op: &'static str,
    ) -> Result<u64, StoreError> {
        let done = q.execute(conn).await.map_err(DB::err(op))?;
        Ok(DB::rows_affected(&done))
    }
}

/// Placeholders numbered in the order they are written, so that binding in that order
/// suits numbered (`$n`, `?n`) and positional (`?`) placeholders alike.
pub(crate) struct Params<DB> {
    n: usize,
    _db: std::marker::PhantomData<DB>,
}

impl<DB: SqlDialect> Params<DB> {
    pub(crate) fn new() -> Self {
        Params {
            n: 0,
            _db: std::marker::PhantomData,
        }
    }

    /// The next placeholder.
    pub(crate) fn next(&mut self) -> String {
        self.n += 1;
        DB::param(self.n)
    }

    /// `n` placeholders, comma-separated.
    pub(crate) fn list(&mut self, n: usize) -> String {
        (0..n).map(|_| self.next()).collect::<Vec<_>>().join(", ")
    }
}

/// The statements of one outbox table that do not depend on how many rows they name.
#[derive(Debug)]
pub(crate) struct OutboxSql {
    pub(crate) table: TableName,
    /// The table, quoted.
    pub(crate) t: String,
    create: Vec<String>,
    purge: String,
    stats: String,
    list: String,
    retry: String,
    fail: String,
}

/// The insert's columns, then the values every new row takes besides the message's.
const INSERT_COLUMNS: &str = "id, origin_scope, origin_key, destination, payload, headers, \
     ordering_key, status, attempts, next_attempt_us, fence, created_us";

impl OutboxSql {
    pub(crate) fn new<D: OutboxDialect>(table: TableName) -> Self {
        let t = table.quoted(D::QUOTE);
        let now = D::now();
        let mut p = Params::<D>::new();
        let fail = D::update(
            &t,
            &format!(
                "attempts = attempts + 1, last_error = {}, lease_owner = NULL, \
                 lease_until_us = NULL, next_attempt_us = {now} + {}, status = {}",
                p.next(),
                p.next(),
                p.next()
            ),
            &format!(
                "id = {} AND fence = {} AND status = {PENDING}",
                p.next(),
                p.next()
            ),
        );
        let retry = D::update(
            &t,
            &format!(
                "status = {PENDING}, attempts = 0, next_attempt_us = {now}, lease_owner = NULL, \
                 lease_until_us = NULL"
            ),
            &format!("id = {} AND status = {DEAD}", D::param(1)),
        );
        let stats = D::select(
            &format!(
                "{}, {}, {}, {}, {}, {}",
                D::scope_bytes("destination"),
                D::int8(&format!(
                    "SUM(CASE WHEN status = {PENDING} THEN 1 ELSE 0 END)"
                )),
                D::int8(&format!("SUM(CASE WHEN status = {DEAD} THEN 1 ELSE 0 END)")),
                D::int8(&format!("SUM(CASE WHEN status = {SENT} THEN 1 ELSE 0 END)")),
                D::int8(&format!(
                    "MIN(CASE WHEN status = {PENDING} THEN created_us END)"
                )),
                D::int8(&format!("MAX({now})")),
            ),
            &t,
            "1 = 1 GROUP BY destination ORDER BY destination",
        );
        let list = D::select(
            &Self::listed::<D>("o."),
            &format!("{t} o"),
            &format!(
                "o.status = {} AND o.seq > {} ORDER BY o.seq LIMIT {}",
                D::param(1),
                D::param(2),
                D::param(3)
            ),
        );
        let mut sql = OutboxSql {
            create: Self::create::<D>(&table),
            purge: String::new(),
            stats,
            list,
            retry,
            fail,
            t,
            table,
        };
        sql.purge = D::outbox_purge(&sql);
        sql
    }

    /// The statements creating the table and its indexes if missing.
    fn create<D: OutboxDialect>(table: &TableName) -> Vec<String> {
        let mut columns: Vec<String> = COLUMNS
            .iter()
            .zip(D::OUTBOX_TYPES.split(", "))
            .map(|(c, ty)| format!("{c} {ty}"))
            .collect();
        let mut separate = Vec::new();
        for (suffix, on) in INDEXES {
            match D::outbox_index(table, suffix, on) {
                Ok(clause) => columns.push(clause),
                Err(stmt) => separate.push(stmt),
            }
        }
        let mut create = vec![format!(
            "CREATE TABLE IF NOT EXISTS {} ({}){}",
            table.quoted(D::QUOTE),
            columns.join(", "),
            D::OUTBOX_TABLE_OPTIONS
        )];
        create.extend(separate);
        create
    }

    /// The statements that create the table and its indexes.
    pub(crate) fn schema(&self) -> &[String] {
        &self.create
    }

    /// The condition "the row `o` (a prefix such as `o.`) is claimable": pending, due,
    /// not under a live lease, and no earlier row of its ordering key pending.
    pub(crate) fn claimable<D: SqlDialect>(&self, o: &str) -> String {
        let (t, now) = (&self.t, D::now());
        format!(
            "{o}status = {PENDING} AND {o}next_attempt_us <= {now} \
             AND ({o}lease_until_us IS NULL OR {o}lease_until_us <= {now}) \
             AND ({o}ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM {t} e \
                WHERE e.ordering_key = {o}ordering_key AND e.seq < {o}seq \
                AND e.status = {PENDING}))"
        )
    }

    /// The columns of a claimed row `r` (a prefix): id, seq, fence, attempts,
    /// destination, payload, headers, ordering key. `fence` is the fencing token's
    /// expression (`fence`, or `fence + 1` where it is read before the claim's write).
    pub(crate) fn claimed<D: SqlDialect>(r: &str, fence: &str) -> String {
        format!(
            "{r}id, {}, {}, {}, {}, {r}payload, {}, {}",
            D::int8(&format!("{r}seq")),
            D::int8(&format!("{r}{fence}")),
            D::int8(&format!("{r}attempts")),
            D::scope_bytes(&format!("{r}destination")),
            D::scope_bytes(&format!("{r}headers")),
            D::scope_bytes(&format!("{r}ordering_key")),
        )
    }

    /// The columns the operator sees: [`claimed`](Self::claimed), then origin scope and
    /// key, status, last error, created, next attempt, lease owner and deadline, and
    /// the clock.
    fn listed<D: SqlDialect>(r: &str) -> String {
        format!(
            "{}, {}, {r}origin_key, {}, {}, {r}created_us, {r}next_attempt_us, {}, \
             {r}lease_until_us, {}",
            Self::claimed::<D>(r, "fence"),
            D::scope_bytes(&format!("{r}origin_scope")),
            D::int8(&format!("{r}status")),
            D::scope_bytes(&format!("{r}last_error")),
            D::scope_bytes(&format!("{r}lease_owner")),
            D::now()
        )
    }

    /// The condition "the row is one of `n` ids", its placeholders from `p`.
    pub(crate) fn ids_in<D: SqlDialect>(o: &str, n: usize, p: &mut Params<D>) -> String {
        format!("{o}id IN ({})", p.list(n))
    }

    /// The claimable rows of a claim with `ids` ids (all of them when there are
    /// none): `{claimable}` and, with ids, ` AND o.id IN (…)`, its placeholders from
    /// `p`.
    pub(crate) fn claimable_among<D: SqlDialect>(&self, ids: usize, p: &mut Params<D>) -> String {
        let mut cond = self.claimable::<D>("o.");
        if ids > 0 {
            cond.push_str(" AND ");
            cond.push_str(&Self::ids_in("o.", ids, p));
        }
        cond
    }
}

/// Checks `s` for a column of `max` bytes.
fn check_text(what: &str, s: &str, max: usize) -> Result<(), StoreError> {
    let bad = |why: String| {
        Err(StoreError::new(
            StoreErrorKind::Rejected,
            format!("outbox: {what} {why}"),
        ))
    };
    if s.len() > max {
        return bad(format!(
            "is {} bytes long, longer than the {max} bytes the outbox table holds",
            s.len()
        ));
    }
    if s.contains('\0') {
        return bad(format!("{s:?} contains a NUL character"));
    }
    Ok(())
}

/// Checks a message before it is written.
fn check_message(m: &OutgoingMessage) -> Result<(), StoreError> {
    check_text("the destination", m.destination(), MAX_DESTINATION_BYTES)?;
    if let Some(k) = m.ordering_key() {
        check_text("the ordering key", k, MAX_ORDERING_KEY_BYTES)?;
    }
    Ok(())
}

/// The headers as the table holds them: a JSON list of `[name, value]` pairs.
fn encode_headers(headers: &[(String, String)]) -> String {
    serde_json::to_string(headers).unwrap_or_else(|_| "[]".to_owned())
}

/// `error` cut to [`MAX_ERROR_BYTES`] at a character boundary.
fn cut_error(error: &str) -> &str {
    let mut end = error.len().min(MAX_ERROR_BYTES);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Writes the messages of `outbox` in the transaction `conn`: one multi-row `INSERT`
/// per [`INSERT_CHUNK`] messages (one statement for any execution that emits fewer).
async fn enqueue<DB: OutboxDb>(
    conn: &mut DB::Connection,
    table: &str,
    outbox: &Outbox,
) -> Result<(), StoreError> {
    let table = TableName::parse(table)?;
    outbox
        .check()
        .map_err(|e| StoreError::new(StoreErrorKind::Rejected, e.to_string()))?;
    if outbox.is_empty() {
        return Ok(());
    }
    let origin = outbox.origin().ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Rejected,
            "outbox: the messages have no origin (Outbox::bind was not called)",
        )
    })?;
    for m in outbox.messages() {
        check_message(m)?;
    }
    let t = table.quoted(DB::QUOTE);
    for chunk in outbox.messages().chunks(INSERT_CHUNK) {
        let mut p = Params::<DB>::new();
        let mut text = format!("INSERT INTO {t} ({INSERT_COLUMNS}) VALUES ");
        for (i, _) in chunk.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(
                text,
                "{sep}({}, {PENDING}, 0, {now}, 0, {now})",
                p.list(7),
                now = DB::NOW_US
            );
        }
        let mut q = sqlx::query::<DB>(sql(text));
        for m in chunk {
            q = DB::bytes(q, m.id().as_bytes().to_vec());
            q = DB::text(q, Some(origin.scope()));
            q = DB::bytes(q, origin.key().to_vec());
            q = DB::text(q, Some(m.destination()));
            q = DB::bytes(q, m.payload().to_vec());
            q = DB::text(q, Some(&encode_headers(m.headers())));
            q = DB::text(q, m.ordering_key());
        }
        DB::write(conn, q, "writing outbox messages").await?;
    }
    Ok(())
}

impl<DB> OutboxTransaction for sqlx::Transaction<'_, DB>
where
    DB: OutboxDb,
{
    fn enqueue_in_tx<'a>(&'a mut self, table: &'a str, outbox: &'a Outbox) -> TxFuture<'a, ()> {
        Box::pin(enqueue::<DB>(&mut **self, table, outbox))
    }
}

/// Claims with one statement (PostgreSQL, SQLite): `text` takes the owner as
/// placeholder 1, the lease in microseconds as 2, the limit as 3 and the ids from 4.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) async fn claim_in_one_statement<DB: OutboxDb>(
    pool: &Pool<DB>,
    text: String,
    claim: Claim<'_>,
) -> Result<Vec<DB::Row>, StoreError> {
    let op = "claiming outbox rows";
    let mut conn = pool.acquire().await.map_err(DB::err(op))?;
    let mut q = sqlx::query::<DB>(sql(text));
    q = DB::text(q, Some(claim.owner));
    q = DB::int(q, claim.lease_us);
    q = DB::int(q, claim.limit);
    for id in claim.ids {
        q = DB::bytes(q, id.as_bytes().to_vec());
    }
    DB::rows(&mut conn, q, op).await
}

/// Reads an id.
fn uuid(b: Vec<u8>) -> Result<Uuid, StoreError> {
    Uuid::from_slice(&b).map_err(|_| corrupt(format!("outbox: an id of {} bytes", b.len())))
}

/// Reads a text column read back as bytes.
fn text(b: Option<Vec<u8>>, what: &str) -> Result<Option<String>, StoreError> {
    b.map(|b| {
        String::from_utf8(b).map_err(|_| corrupt(format!("outbox: a {what} that is not UTF-8")))
    })
    .transpose()
}

fn required<T>(v: Option<T>, what: &str) -> Result<T, StoreError> {
    v.ok_or_else(|| corrupt(format!("outbox: a row without {what}")))
}

fn count(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| corrupt(format!("outbox: {what} {v} is out of range")))
}

/// Decodes the [`OutboxSql::claimed`] columns.
fn decode_claimed(row: &dyn Columns) -> Result<ClaimedRow, StoreError> {
    let col = |e: sqlx::Error| {
        StoreError::with_source(StoreErrorKind::Corrupt, "outbox: reading a row", e)
    };
    let id = uuid(row.bytes(0).map_err(col)?)?;
    let seq = row.int(1).map_err(col)?;
    let fence = row.int(2).map_err(col)?;
    let attempts = count(row.int(3).map_err(col)?, "attempts")?;
    let destination = required(
        text(row.opt_bytes(4).map_err(col)?, "destination")?,
        "destination",
    )?;
    let payload = row.opt_bytes(5).map_err(col)?.unwrap_or_default();
    let headers = text(row.opt_bytes(6).map_err(col)?, "headers")?.unwrap_or_default();
    let headers: Vec<(String, String)> = if headers.is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&headers)
            .map_err(|e| corrupt(format!("outbox: the headers of {id} are not a list: {e}")))?
    };
    let ordering_key = text(row.opt_bytes(7).map_err(col)?, "ordering key")?;
    let mut message = OutgoingMessage::new(id, destination, payload);
    for (name, value) in headers {
        message = message.with_header(name, value);
    }
    if let Some(k) = ordering_key {
        message = message.with_ordering_key(k);
    }
    let fence = u64::try_from(fence)
        .map_err(|_| corrupt(format!("outbox: fence {fence} is out of range")))?;
    Ok(ClaimedRow {
        message,
        lease: RowLease { id, fence },
        seq,
        attempts,
    })
}

/// Decodes the [`OutboxSql::listed`] columns.
fn decode_listed(row: &dyn Columns) -> Result<OutboxRow, StoreError> {
    let col = |e: sqlx::Error| {
        StoreError::with_source(StoreErrorKind::Corrupt, "outbox: reading a row", e)
    };
    let claimed = decode_claimed(row)?;
    let origin_scope = required(
        text(row.opt_bytes(8).map_err(col)?, "origin scope")?,
        "origin scope",
    )?;
    let origin_key = row.opt_bytes(9).map_err(col)?.unwrap_or_default();
    let status = match row.int(10).map_err(col)? {
        PENDING => RowStatus::Pending,
        SENT => RowStatus::Sent,
        DEAD => RowStatus::Dead,
        s => return Err(corrupt(format!("outbox: status {s} is not 0, 1 or 2"))),
    };
    let last_error = text(row.opt_bytes(11).map_err(col)?, "last error")?;
    let created = row.int(12).map_err(col)?;
    let next = row.int(13).map_err(col)?;
    let owner = text(row.opt_bytes(14).map_err(col)?, "lease owner")?;
    let lease_until = row.opt_int(15).map_err(col)?;
    let now = row.int(16).map_err(col)?;
    let leased_by = match lease_until {
        Some(until) if until > now && status == RowStatus::Pending => owner,
        _ => None,
    };
    Ok(OutboxRow {
        message: claimed.message,
        seq: claimed.seq,
        origin_scope,
        origin_key,
        status,
        attempts: claimed.attempts,
        last_error,
        age: from_micros(now - created),
        due_in: if status == RowStatus::Pending {
            from_micros(next - now)
        } else {
            Duration::ZERO
        },
        leased_by,
    })
}

/// An outbox table on a pool: [`OutboxStore`](crate::outbox::store::OutboxStore)'s
/// steps, written once; each database's public handle wraps it.
#[derive(Debug)]
pub(crate) struct SqlOutbox<DB: sqlx::Database> {
    pub(crate) pool: Pool<DB>,
    pub(crate) sql: Arc<OutboxSql>,
}

impl<DB: sqlx::Database> Clone for SqlOutbox<DB> {
    fn clone(&self) -> Self {
        SqlOutbox {
            pool: self.pool.clone(),
            sql: self.sql.clone(),
        }
    }
}

impl<DB: OutboxDb> SqlOutbox<DB> {
    /// The outbox table `table` (validated) on `pool`.
    pub(crate) fn new(pool: Pool<DB>, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        Ok(SqlOutbox {
            pool,
            sql: Arc::new(OutboxSql::new::<DB>(table)),
        })
    }

    async fn conn(&self, op: &str) -> Result<sqlx::pool::PoolConnection<DB>, StoreError> {
        self.pool.acquire().await.map_err(DB::err(op))
    }

    /// Creates the table and its indexes if missing.
    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        let op = "creating the outbox table";
        let mut conn = self.conn(op).await?;
        for stmt in self.sql.schema() {
            DB::write(&mut conn, sqlx::query::<DB>(sql(stmt.clone())), op).await?;
        }
        Ok(())
    }

    async fn claim(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
        ids: &[Uuid],
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        check_text("the relay name", owner, MAX_OWNER_BYTES)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let claim = Claim {
            owner,
            lease_us: micros(lease).max(1),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            ids,
        };
        let rows = DB::outbox_claim(&self.pool, &self.sql, claim).await?;
        let mut claimed = rows
            .iter()
            .map(|r| decode_claimed(DB::columns(r)))
            .collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|r| r.seq);
        Ok(claimed)
    }

    pub(crate) async fn claim_due(
        &self,
        owner: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        self.claim(owner, limit, lease, &[]).await
    }

    pub(crate) async fn claim_ids(
        &self,
        owner: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let mut claimed = Vec::new();
        for chunk in ids.chunks(IDS_CHUNK) {
            claimed.extend(self.claim(owner, chunk.len(), lease, chunk).await?);
        }
        claimed.sort_by_key(|r| r.seq);
        Ok(claimed)
    }

    pub(crate) async fn mark_sent(&self, leases: &[RowLease]) -> Result<Vec<Fence>, StoreError> {
        let op = "marking outbox rows sent";
        let mut fences = Vec::with_capacity(leases.len());
        let mut conn = self.conn(op).await?;
        for chunk in leases.chunks(IDS_CHUNK) {
            let rows = match DB::outbox_mark_sent(&mut conn, &self.sql, chunk).await? {
                Some(rows) => rows,
                None => self.mark_sent_generic(&mut conn, chunk, op).await?,
            };
            if rows == chunk.len() as u64 {
                fences.extend(chunk.iter().map(|_| Fence::Held));
                continue;
            }
            // some were fenced out, or marked before (a reply lost): a row sent under
            // the lease's own token was marked by this claim
            let seen = self.read_fences(&mut conn, chunk, op).await?;
            fences.extend(chunk.iter().map(|l| {
                if seen.contains(&(l.id, fence_param(l.fence), SENT)) {
                    Fence::Held
                } else {
                    Fence::Lost
                }
            }));
        }
        Ok(fences)
    }

    /// Marks the rows of `chunk` sent with one condition per lease: the rows changed.
    async fn mark_sent_generic(
        &self,
        conn: &mut DB::Connection,
        chunk: &[RowLease],
        op: &'static str,
    ) -> Result<u64, StoreError> {
        let mut p = Params::<DB>::new();
        let pairs = (0..chunk.len())
            .map(|_| format!("(id = {} AND fence = {})", p.next(), p.next()))
            .collect::<Vec<_>>()
            .join(" OR ");
        let text = DB::update(
            &self.sql.t,
            &format!(
                "status = {SENT}, sent_us = {}, lease_owner = NULL, lease_until_us = NULL",
                DB::now()
            ),
            &format!("status = {PENDING} AND ({pairs})"),
        );
        let mut q = sqlx::query::<DB>(sql(text));
        for l in chunk {
            q = DB::bytes(q, l.id.as_bytes().to_vec());
            q = DB::int(q, fence_param(l.fence));
        }
        DB::write(conn, q, op).await
    }

    /// The `(id, fence, status)` of the rows of `leases`.
    async fn read_fences(
        &self,
        conn: &mut DB::Connection,
        leases: &[RowLease],
        op: &'static str,
    ) -> Result<Vec<(Uuid, i64, i64)>, StoreError> {
        let mut p = Params::<DB>::new();
        let text = format!(
            "SELECT id, {}, {} FROM {} o WHERE {}",
            DB::int8("o.fence"),
            DB::int8("o.status"),
            self.sql.t,
            OutboxSql::ids_in("o.", leases.len(), &mut p)
        );
        let mut q = sqlx::query::<DB>(sql(text));
        for l in leases {
            q = DB::bytes(q, l.id.as_bytes().to_vec());
        }
        let col = DB::err(op);
        DB::rows(conn, q, op)
            .await?
            .iter()
            .map(|r| {
                let r = DB::columns(r);
                Ok((
                    uuid(r.bytes(0).map_err(&col)?)?,
                    r.int(1).map_err(&col)?,
                    r.int(2).map_err(&col)?,
                ))
            })
            .collect()
    }

    pub(crate) async fn mark_failed(
        &self,
        lease: &RowLease,
        error: &str,
        retry: Retry,
    ) -> Result<Fence, StoreError> {
        let op = "marking an outbox row failed";
        let (delay, status) = match retry {
            Retry::After(d) => (micros(d), PENDING),
            Retry::Dead => (0, DEAD),
        };
        let mut conn = self.conn(op).await?;
        let mut q = sqlx::query::<DB>(sql(self.sql.fail.clone()));
        q = DB::text(q, Some(cut_error(error)));
        q = DB::int(q, delay);
        q = DB::int(q, status);
        q = DB::bytes(q, lease.id.as_bytes().to_vec());
        q = DB::int(q, fence_param(lease.fence));
        if DB::write(&mut conn, q, op).await? > 0 {
            return Ok(Fence::Held);
        }
        // a dead mark repeated by its claim (its reply lost) finds the row dead under
        // its own token
        let seen = self.read_fences(&mut conn, &[*lease], op).await?;
        let repeated = status == DEAD && seen.contains(&(lease.id, fence_param(lease.fence), DEAD));
        Ok(if repeated { Fence::Held } else { Fence::Lost })
    }

    pub(crate) async fn purge_sent(
        &self,
        older_than: Duration,
        batch: usize,
    ) -> Result<u64, StoreError> {
        let op = "purging sent outbox rows";
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let mut conn = self.conn(op).await?;
        let mut total = 0;
        loop {
            let mut q = sqlx::query::<DB>(sql(self.sql.purge.clone()));
            q = DB::int(q, micros(older_than));
            q = DB::int(q, batch);
            let rows = DB::write(&mut conn, q, op).await?;
            total += rows;
            if rows < batch as u64 {
                return Ok(total);
            }
        }
    }

    pub(crate) async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let op = "reading outbox statistics";
        let mut conn = self.conn(op).await?;
        let q = sqlx::query::<DB>(sql(self.sql.stats.clone()));
        let col = DB::err(op);
        let mut destinations = Vec::new();
        for r in DB::rows(&mut conn, q, op).await? {
            let r = DB::columns(&r);
            let n = |i: usize| -> Result<u64, StoreError> {
                let v = r.opt_int(i).map_err(&col)?.unwrap_or(0);
                u64::try_from(v).map_err(|_| corrupt(format!("outbox: a count of {v}")))
            };
            let oldest = r.opt_int(4).map_err(&col)?;
            let now = r.int(5).map_err(&col)?;
            destinations.push(DestinationStats {
                destination: required(
                    text(r.opt_bytes(0).map_err(&col)?, "destination")?,
                    "destination",
                )?,
                pending: n(1)?,
                dead: n(2)?,
                sent: n(3)?,
                oldest_pending: oldest.map(|c| from_micros(now - c)),
            });
        }
        Ok(OutboxStats { destinations })
    }

    pub(crate) async fn list(
        &self,
        status: RowStatus,
        after: Option<i64>,
        limit: usize,
    ) -> Result<OutboxPage, StoreError> {
        let op = "listing outbox rows";
        let code = match status {
            RowStatus::Pending => PENDING,
            RowStatus::Sent => SENT,
            RowStatus::Dead => DEAD,
        };
        let limit = limit.clamp(1, 10_000);
        let mut conn = self.conn(op).await?;
        let mut q = sqlx::query::<DB>(sql(self.sql.list.clone()));
        q = DB::int(q, code);
        q = DB::int(q, after.unwrap_or(i64::MIN));
        q = DB::int(q, limit as i64 + 1);
        let mut rows = DB::rows(&mut conn, q, op)
            .await?
            .iter()
            .map(|r| decode_listed(DB::columns(r)))
            .collect::<Result<Vec<_>, _>>()?;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|r| r.seq)
        } else {
            None
        };
        Ok(OutboxPage { rows, next })
    }

    /// The row `id`, as [`list`](Self::list) shows it: `None` when there is none.
    pub(crate) async fn row(&self, id: Uuid) -> Result<Option<OutboxRow>, StoreError> {
        let op = "reading an outbox row";
        let text = DB::select(
            &OutboxSql::listed::<DB>("o."),
            &format!("{} o", self.sql.t),
            &format!("o.id = {}", DB::param(1)),
        );
        let mut conn = self.conn(op).await?;
        let q = DB::bytes(sqlx::query::<DB>(sql(text)), id.as_bytes().to_vec());
        let rows = DB::rows(&mut conn, q, op).await?;
        rows.first()
            .map(|r| decode_listed(DB::columns(r)))
            .transpose()
    }

    /// How many sent rows [`purge_sent`](Self::purge_sent) with `older_than` would
    /// delete now.
    pub(crate) async fn count_sent(&self, older_than: Duration) -> Result<u64, StoreError> {
        let op = "counting sent outbox rows";
        let text = DB::select(
            &DB::int8("COUNT(*)"),
            &format!("{} o", self.sql.t),
            &format!(
                "o.status = {SENT} AND o.sent_us <= {} - {}",
                DB::now(),
                DB::param(1)
            ),
        );
        let mut conn = self.conn(op).await?;
        let q = DB::int(sqlx::query::<DB>(sql(text)), micros(older_than));
        let rows = DB::rows(&mut conn, q, op).await?;
        let n = match rows.first() {
            Some(r) => DB::columns(r).int(0).map_err(DB::err(op))?,
            None => 0,
        };
        u64::try_from(n).map_err(|_| corrupt(format!("outbox: a count of {n}")))
    }

    pub(crate) async fn retry_dead(&self, id: Uuid) -> Result<bool, StoreError> {
        let op = "retrying a dead outbox row";
        let mut conn = self.conn(op).await?;
        let q = sqlx::query::<DB>(sql(self.sql.retry.clone()));
        let q = DB::bytes(q, id.as_bytes().to_vec());
        Ok(DB::write(&mut conn, q, op).await? > 0)
    }
}

/// A fencing token as a `BIGINT` parameter; one beyond it fences nothing.
pub(crate) fn fence_param(fence: u64) -> i64 {
    i64::try_from(fence).unwrap_or(-1)
}

/// A database's public outbox handle (`$handle`, on `$db`) wrapping [`SqlOutbox`], its
/// [`OutboxStore`](crate::outbox::store::OutboxStore) implementation, and `$store`'s
/// `outbox` method that makes it.
macro_rules! outbox_handle {
    ($(#[$doc:meta])* $handle:ident, $db:ty, $store:ty) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $handle {
            inner: $crate::stores::sql::common::outbox::SqlOutbox<$db>,
        }

        impl $handle {
            /// The outbox table `table` (letters, digits and `_`, optionally qualified
            /// by one schema) on `pool`. Touches no schema: call
            /// [`migrate`](Self::migrate), or create the table by hand
            /// ([`schema`](Self::schema)). A bad name is a
            /// [`StoreErrorKind::Rejected`](crate::error::StoreErrorKind::Rejected) error.
            pub fn new(pool: sqlx::Pool<$db>, table: &str) -> Result<Self, $crate::error::StoreError> {
                Ok($handle {
                    inner: $crate::stores::sql::common::outbox::SqlOutbox::new(pool, table)?,
                })
            }

            /// Creates the table and its indexes if they are missing.
            pub async fn migrate(&self) -> Result<(), $crate::error::StoreError> {
                self.inner.migrate().await
            }

            /// The statements [`migrate`](Self::migrate) runs, for a DBA to review or
            /// run by hand.
            pub fn schema(&self) -> Vec<String> {
                self.inner.sql.schema().to_vec()
            }

            /// The table name, as given.
            pub fn table(&self) -> String {
                self.inner.sql.table.display()
            }

            /// The row `id`, as [`list`](crate::outbox::OutboxStore::list) shows it
            /// (`None` when the table has no such row), for the operator.
            pub async fn row(
                &self,
                id: uuid::Uuid,
            ) -> Result<Option<$crate::outbox::store::OutboxRow>, $crate::error::StoreError> {
                self.inner.row(id).await
            }

            /// How many sent rows
            /// [`purge_sent`](crate::outbox::OutboxStore::purge_sent) with `older_than`
            /// would delete now (its dry run).
            pub async fn count_sent(
                &self,
                older_than: std::time::Duration,
            ) -> Result<u64, $crate::error::StoreError> {
                self.inner.count_sent(older_than).await
            }
        }

        impl $store {
            /// The outbox table `table` (use
            /// [`DEFAULT_OUTBOX_TABLE`](crate::outbox::DEFAULT_OUTBOX_TABLE) unless you
            /// name it otherwise) on this store's pool, created if it is missing: what
            /// a [`Relay`](crate::outbox::Relay) publishes from and the operator
            /// inspects. Handlers write to it with
            /// `#[idempotent(tx = "tx", outbox = "outbox")]`.
            pub async fn outbox(&self, table: &str) -> Result<$handle, $crate::error::StoreError> {
                let outbox = $handle::new(self.pool.clone(), table)?;
                outbox.migrate().await?;
                Ok(outbox)
            }
        }

        #[async_trait::async_trait]
        impl $crate::outbox::store::OutboxStore for $handle {
            async fn claim_due(
                &self,
                owner: &str,
                limit: usize,
                lease: std::time::Duration,
            ) -> Result<Vec<$crate::outbox::store::ClaimedRow>, $crate::error::StoreError> {
                self.inner.claim_due(owner, limit, lease).await
            }

            async fn claim_ids(
                &self,
                owner: &str,
                ids: &[uuid::Uuid],
                lease: std::time::Duration,
            ) -> Result<Vec<$crate::outbox::store::ClaimedRow>, $crate::error::StoreError> {
                self.inner.claim_ids(owner, ids, lease).await
            }

            async fn mark_sent(
                &self,
                leases: &[$crate::outbox::store::RowLease],
            ) -> Result<Vec<$crate::store::Fence>, $crate::error::StoreError> {
                self.inner.mark_sent(leases).await
            }

            async fn mark_failed(
                &self,
                lease: &$crate::outbox::store::RowLease,
                error: &str,
                retry: $crate::outbox::store::Retry,
            ) -> Result<$crate::store::Fence, $crate::error::StoreError> {
                self.inner.mark_failed(lease, error, retry).await
            }

            async fn purge_sent(
                &self,
                older_than: std::time::Duration,
                batch: usize,
            ) -> Result<u64, $crate::error::StoreError> {
                self.inner.purge_sent(older_than, batch).await
            }

            async fn stats(&self) -> Result<$crate::outbox::store::OutboxStats, $crate::error::StoreError> {
                self.inner.stats().await
            }

            async fn list(
                &self,
                status: $crate::outbox::store::RowStatus,
                after: Option<i64>,
                limit: usize,
            ) -> Result<$crate::outbox::store::OutboxPage, $crate::error::StoreError> {
                self.inner.list(status, after, limit).await
            }

            async fn retry_dead(&self, id: uuid::Uuid) -> Result<bool, $crate::error::StoreError> {
                self.inner.retry_dead(id).await
            }
        }
    };
}
pub(crate) use outbox_handle;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every database gives a type to each column.
    #[test]
    fn every_column_has_a_type() {
        fn check<D: OutboxDialect>() {
            assert_eq!(D::OUTBOX_TYPES.split(", ").count(), COLUMNS.len());
        }
        #[cfg(feature = "mysql")]
        check::<sqlx::MySql>();
        #[cfg(feature = "postgres")]
        check::<sqlx::Postgres>();
        #[cfg(feature = "sqlite")]
        check::<sqlx::Sqlite>();
    }

    #[test]
    fn errors_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = cut_error(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES);
        assert_eq!(cut.len() % 2, 0);
        assert_eq!(cut_error("short"), "short");
    }

    #[test]
    fn bad_text_is_refused_with_a_reason() {
        let long = "d".repeat(MAX_DESTINATION_BYTES + 1);
        let e = check_message(&OutgoingMessage::new(Uuid::nil(), long, Vec::new())).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Rejected);
        assert!(e.to_string().contains("513 bytes"), "{e}");
        let e = check_message(
            &OutgoingMessage::new(Uuid::nil(), "d", Vec::new()).with_ordering_key("a\0b"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
        assert!(check_message(&OutgoingMessage::new(Uuid::nil(), "d", Vec::new())).is_ok());
    }

    #[test]
    fn headers_round_trip_as_a_json_list() {
        let h = vec![
            ("a".to_owned(), "1".to_owned()),
            ("a".to_owned(), "\"2\"".to_owned()),
        ];
        let back: Vec<(String, String)> = serde_json::from_str(&encode_headers(&h)).unwrap();
        assert_eq!(back, h);
    }
}
