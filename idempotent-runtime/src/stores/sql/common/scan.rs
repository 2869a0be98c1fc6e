//! Scans, statistics and operator changes of the SQL stores: keyset pagination on the
//! primary key `(scope, message_id)` (never `OFFSET`, so every page costs the same),
//! counts grouped in the database, and the operator changes as one `UPDATE` each.
//!
//! The scope is read back as bytes and decoded leniently, whatever the column's type
//! (text or binary).
//!
//! Each database's [`Dialect`] is in its own folder (`mysql/scan.rs`,
//! `postgres/scan.rs`, `sqlite/scan.rs`).

use super::base::{SqlDatabase, TableName, from_micros};
use super::row::sane;
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::scan::{
    AdminOutcome, ScanCursor, ScanFilter, ScanItem, ScanPage, ScopeStats, state_rank,
};
use crate::store::admin::StoreAdmin;
use crate::store::{RecordState, Token};
use sqlx::{Encode, Executor, IntoArguments, Pool, Row, Type};
use std::collections::BTreeMap;

/// What differs between the databases in the statements of this module.
pub(crate) trait Dialect: SqlDatabase {
    /// The database clock in microseconds since the Unix epoch.
    const NOW_US: &'static str;
    /// The identifier quote.
    const QUOTE: char;
    /// The larger of two values.
    const GREATEST: &'static str;
    /// Whether the keyset condition is written as a row comparison
    /// (`(a, b) > (x, y)`, which PostgreSQL and SQLite turn into one index range);
    /// otherwise as `a > x OR (a = x AND b > y)` (which MySQL ranges over).
    const ROW_VALUES: bool;
    /// Whether the columns take values of any type (SQLite), for [`sane`].
    const ANY_TYPE: bool = false;
    /// The `n`-th placeholder (from 1).
    fn param(n: usize) -> String;
    /// The scope column as bytes.
    fn scope_bytes(col: &str) -> String;
    /// The length in bytes of a binary column.
    fn byte_len(col: &str) -> String;
    /// An integer expression as a 64-bit integer.
    fn int8(expr: &str) -> String;
}

/// A bound value of a statement built at run time.
enum Param {
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
}

/// A statement's text and its parameters, built together so placeholders and binds
/// stay in step.
struct Stmt<DB> {
    text: String,
    params: Vec<Param>,
    _db: std::marker::PhantomData<DB>,
}

impl<DB: Dialect> Stmt<DB> {
    fn new() -> Self {
        Stmt {
            text: String::new(),
            params: Vec::new(),
            _db: std::marker::PhantomData,
        }
    }

    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    fn bind(&mut self, p: Param) -> &mut Self {
        let placeholder = self.placeholder(p);
        self.text.push_str(&placeholder);
        self
    }

    /// Registers `p` and returns its placeholder, for text written later (in order).
    fn placeholder(&mut self, p: Param) -> String {
        self.params.push(p);
        DB::param(self.params.len())
    }
}

/// The `FROM` clause every statement reads: the table as `c`, the clock as `n.now_us`
/// (read once per statement).
fn from<DB: Dialect>(table: &str) -> String {
    format!(" FROM {table} c, (SELECT {} AS now_us) n", DB::NOW_US)
}

fn quoted<DB: Dialect>(table: &str) -> Result<String, StoreError> {
    Ok(TableName::parse(table)?.quoted(DB::QUOTE))
}

/// `stmt` as a query with its parameters bound.
fn query<DB>(stmt: Stmt<DB>) -> sqlx::query::Query<'static, DB, DB::Arguments>
where
    DB: Dialect,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    let mut q = sqlx::query::<DB>(super::base::sql(stmt.text));
    for p in stmt.params {
        q = match p {
            Param::Text(s) => q.bind(s),
            Param::Bytes(b) => q.bind(b),
            Param::Int(i) => q.bind(i),
        };
    }
    q
}

/// Runs `stmt` and returns its rows.
async fn fetch<DB>(pool: &Pool<DB>, op: &str, stmt: Stmt<DB>) -> Result<Vec<DB::Row>, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    query(stmt).fetch_all(pool).await.map_err(DB::err(op))
}

/// Runs `stmt` and returns the rows it changed.
async fn execute<DB>(pool: &Pool<DB>, op: &str, stmt: Stmt<DB>) -> Result<u64, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    let done = query(stmt).execute(pool).await.map_err(DB::err(op))?;
    Ok(DB::rows_affected(&done))
}

/// The keyset cursor: the length of the scope (4 bytes, big-endian), the scope, the
/// `message_id` of the last row of the page.
fn encode_cursor(scope: &[u8], id: &[u8]) -> ScanCursor {
    let mut c = Vec::with_capacity(4 + scope.len() + id.len());
    c.extend_from_slice(&(scope.len() as u32).to_be_bytes());
    c.extend_from_slice(scope);
    c.extend_from_slice(id);
    ScanCursor::new(c)
}

fn decode_cursor(c: &ScanCursor) -> Result<(String, Vec<u8>), StoreError> {
    let bad = || {
        StoreError::new(
            StoreErrorKind::Rejected,
            "the scan cursor was not made by an SQL store scan",
        )
    };
    let b = c.as_bytes();
    let n = u32::from_be_bytes(b.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let scope = b.get(4..4 + n).ok_or_else(bad)?;
    let id = b.get(4 + n..).ok_or_else(bad)?;
    Ok((String::from_utf8_lossy(scope).into_owned(), id.to_vec()))
}

/// The conditions of `filter` on the row `c` (after `WHERE` and the expiry check).
fn conditions<DB: Dialect>(s: &mut Stmt<DB>, filter: &ScanFilter) {
    if let Some(scope) = &filter.scope {
        let bounded = RecordKey::from_encoded(scope, b"").scope().to_owned();
        s.push(" AND c.scope = ").bind(Param::Text(bounded));
    }
    match filter.state {
        Some(RecordState::Completed) => s.push(" AND c.status = 1"),
        Some(RecordState::InProgress) => {
            s.push(" AND c.status = 0 AND c.lease_until_us IS NOT NULL")
        }
        Some(RecordState::Released) => s.push(" AND c.status = 0 AND c.lease_until_us IS NULL"),
        None => s,
    };
    if let Some(n) = filter.min_attempts {
        s.push(" AND c.retry_times >= ")
            .bind(Param::Int(i64::from(n)));
    }
    if filter.lease_expired {
        s.push(
            " AND c.status = 0 AND c.lease_until_us IS NOT NULL AND c.lease_until_us <= n.now_us",
        );
    }
    if let Some(age) = filter.older_than {
        s.push(" AND c.owner_token <= n.now_us - ")
            .bind(Param::Int(super::base::micros(age)));
    }
}

/// One page of a scan of `table`.
pub(crate) async fn scan<DB>(
    pool: &Pool<DB>,
    table: &str,
    filter: &ScanFilter,
    cursor: Option<&ScanCursor>,
    limit: usize,
) -> Result<ScanPage, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let limit = limit.clamp(1, 100_000);
    let t = quoted::<DB>(table)?;
    let mut s = Stmt::<DB>::new();
    s.push(&format!(
        "SELECT {}, c.message_id, {}, {}, c.owner_token, \
         c.lease_until_us - n.now_us, c.expires_at_us - n.now_us, n.now_us - c.owner_token, {}",
        DB::scope_bytes("c.scope"),
        DB::int8("c.status"),
        DB::int8("c.retry_times"),
        DB::byte_len("c.output"),
    ));
    s.push(&from::<DB>(&t));
    // rows holding values the store never writes (see `sane`) are left out: the
    // arithmetic on them could overflow, and every step on them reports them as corrupt
    s.push(&format!(
        " WHERE {} AND c.expires_at_us > n.now_us",
        sane("c.", DB::ANY_TYPE)
    ));
    if let Some(c) = cursor {
        let (scope, id) = decode_cursor(c)?;
        if DB::ROW_VALUES {
            s.push(" AND (c.scope, c.message_id) > (")
                .bind(Param::Text(scope))
                .push(", ")
                .bind(Param::Bytes(id))
                .push(")");
        } else {
            s.push(" AND (c.scope > ")
                .bind(Param::Text(scope.clone()))
                .push(" OR (c.scope = ")
                .bind(Param::Text(scope))
                .push(" AND c.message_id > ")
                .bind(Param::Bytes(id))
                .push("))");
        }
    }
    conditions(&mut s, filter);
    s.push(&format!(" ORDER BY c.scope, c.message_id LIMIT {limit}"));
    let rows = fetch(pool, "scan", s).await?;
    let full = rows.len() == limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
    for row in &rows {
        let scope: Vec<u8> = row.try_get(0).map_err(decode_error)?;
        let id: Vec<u8> = row.try_get(1).map_err(decode_error)?;
        let status: i64 = row.try_get(2).map_err(decode_error)?;
        let attempts: i64 = row.try_get(3).map_err(decode_error)?;
        let token: i64 = row.try_get(4).map_err(decode_error)?;
        let lease_left: Option<i64> = row.try_get(5).map_err(decode_error)?;
        let expires_left: i64 = row.try_get(6).map_err(decode_error)?;
        let age: i64 = row.try_get(7).map_err(decode_error)?;
        let output: Option<i64> = row.try_get(8).map_err(decode_error)?;
        let state = match (status, lease_left) {
            (1, _) => RecordState::Completed,
            (0, Some(_)) => RecordState::InProgress,
            (0, None) => RecordState::Released,
            (s, _) => {
                return Err(StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!(
                        "scan: a row has status {s}, neither 0 (not yet consumed) nor 1 (consumed)"
                    ),
                ));
            }
        };
        let key = RecordKey::from_encoded(&String::from_utf8_lossy(&scope), &id);
        let mut item = ScanItem::new(
            key,
            state,
            u32::try_from(attempts).unwrap_or(0),
            Token(u64::try_from(token).unwrap_or(0)),
        );
        item.lease_remaining = lease_left
            .filter(|&l| l > 0 && state == RecordState::InProgress)
            .map(from_micros);
        item.expires_in = Some(from_micros(expires_left));
        item.claimed_ago = from_micros(age);
        item.output_size = output.and_then(|n| u64::try_from(n).ok());
        if full {
            last = Some((scope, id));
        }
        items.push(item);
    }
    let next = match last {
        Some((scope, id)) if full => Some(encode_cursor(&scope, &id)),
        _ => None,
    };
    Ok(ScanPage::new(items, next))
}

/// The statistics of `table`, counted by the database.
pub(crate) async fn stats<DB>(
    pool: &Pool<DB>,
    table: &str,
    scope: Option<&str>,
    poisoned_at: Option<u32>,
) -> Result<Vec<ScopeStats>, StoreError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let t = quoted::<DB>(table)?;
    let stuck = "c.status = 0 AND c.lease_until_us IS NOT NULL AND c.lease_until_us <= n.now_us";
    let mut s = Stmt::<DB>::new();
    s.push(&format!(
        "SELECT {}, {}, {}, {}, {}, {}, ",
        DB::scope_bytes("c.scope"),
        DB::int8("c.status"),
        DB::int8("CASE WHEN c.lease_until_us IS NULL THEN 1 ELSE 0 END"),
        DB::int8("COUNT(*)"),
        DB::int8("MAX(n.now_us - c.owner_token)"),
        DB::int8(&format!("SUM(CASE WHEN {stuck} THEN 1 ELSE 0 END)")),
    ));
    let at = s.placeholder(Param::Int(poisoned_at.map_or(i64::MAX, i64::from)));
    s.push(&DB::int8(&format!(
        "SUM(CASE WHEN c.status = 0 AND (c.lease_until_us IS NULL OR c.lease_until_us <= n.now_us) \
         AND c.retry_times >= {at} THEN 1 ELSE 0 END)"
    )));
    s.push(&from::<DB>(&t));
    // rows holding values the store never writes (see `sane`) are left out: the
    // arithmetic on them could overflow, and every step on them reports them as corrupt
    s.push(&format!(
        " WHERE {} AND c.expires_at_us > n.now_us",
        sane("c.", DB::ANY_TYPE)
    ));
    if let Some(scope) = scope {
        let bounded = RecordKey::from_encoded(scope, b"").scope().to_owned();
        s.push(" AND c.scope = ").bind(Param::Text(bounded));
    }
    s.push(" GROUP BY 1, 2, 3");
    let rows = fetch(pool, "stats", s).await?;
    let mut by: BTreeMap<(String, u8), ScopeStats> = BTreeMap::new();
    for row in &rows {
        let scope: Vec<u8> = row.try_get(0).map_err(decode_error)?;
        let status: i64 = row.try_get(1).map_err(decode_error)?;
        let released: i64 = row.try_get(2).map_err(decode_error)?;
        let count: i64 = row.try_get(3).map_err(decode_error)?;
        let oldest: Option<i64> = row.try_get(4).map_err(decode_error)?;
        let past: Option<i64> = row.try_get(5).map_err(decode_error)?;
        let poisoned: Option<i64> = row.try_get(6).map_err(decode_error)?;
        let state = match (status, released) {
            (1, _) => RecordState::Completed,
            (_, 0) => RecordState::InProgress,
            _ => RecordState::Released,
        };
        let scope = String::from_utf8_lossy(&scope).into_owned();
        let e = by
            .entry((scope.clone(), state_rank(state)))
            .or_insert_with(|| ScopeStats::new(scope, state));
        e.count += u64::try_from(count).unwrap_or(0);
        if let Some(o) = oldest {
            let o = from_micros(o);
            e.oldest_claim = Some(e.oldest_claim.map_or(o, |x| x.max(o)));
        }
        e.past_lease += past.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        if poisoned_at.is_some() {
            e.poisoned += poisoned.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        }
    }
    Ok(by.into_values().collect())
}

/// An operator change of one record: `release` (In progress → Released, attempts
/// kept) or `reset` (Released or past its lease → Released with zero attempts). Both
/// bump the token past the last one and the clock.
pub(crate) async fn admin<DB, S>(
    store: &S,
    pool: &Pool<DB>,
    table: &str,
    key: &RecordKey,
    reset: bool,
) -> Result<AdminOutcome, StoreError>
where
    S: StoreAdmin + ?Sized,
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    let t = quoted::<DB>(table)?;
    let now = DB::NOW_US;
    let greatest = DB::GREATEST;
    // MySQL assigns left to right with the new values: the token first
    let mut s = Stmt::<DB>::new();
    s.push(&format!(
        "UPDATE {t} SET owner_token = {greatest}(owner_token + 1, {now}), "
    ));
    if reset {
        s.push("retry_times = 0, ");
    }
    s.push("lease_until_us = NULL WHERE scope = ")
        .bind(Param::Text(key.scope().to_owned()))
        .push(" AND message_id = ")
        .bind(Param::Bytes(key.key().to_vec()))
        .push(&format!(" AND status = 0 AND expires_at_us > {now}"));
    if reset {
        s.push(&format!(
            " AND (lease_until_us IS NULL OR lease_until_us <= {now})"
        ));
    } else {
        s.push(" AND lease_until_us IS NOT NULL");
    }
    let op = if reset { "reset attempts" } else { "release" };
    if execute(pool, op, s).await? > 0 {
        return Ok(AdminOutcome::Applied);
    }
    Ok(match store.inspect(key).await? {
        Some(r) => AdminOutcome::Unchanged { state: r.state },
        None => AdminOutcome::NotFound,
    })
}

fn decode_error(e: sqlx::Error) -> StoreError {
    StoreError::with_source(StoreErrorKind::Corrupt, "a scanned row does not decode", e)
}
