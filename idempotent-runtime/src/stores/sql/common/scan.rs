//! Scans, statistics and operator changes of the SQL stores: keyset pagination on the
//! primary key `(scope, message_id)` (never `OFFSET`, so every page costs the same),
//! counts grouped in the database, and the operator changes as one `UPDATE` each.
//!
//! The scope is read back as bytes and decoded leniently, whatever the column's type
//! (text or binary).
//!
//! The statements are built here, over the database's
//! [`SqlDialect`], and their rows read here; [`steps`](super::steps) runs them.

use super::base::{SqlDialect, TableName, from_micros, sane};
use super::row::Columns;
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::scan::{ScanCursor, ScanFilter, ScanItem, ScanPage, ScopeStats, state_rank};
use crate::store::{RecordState, Token};
use std::collections::BTreeMap;

/// A bound value of a statement built at run time.
pub(crate) enum Param {
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
}

/// A statement's text and its parameters, built together so placeholders and binds
/// stay in step.
pub(crate) struct Stmt<DB> {
    pub(crate) text: String,
    pub(crate) params: Vec<Param>,
    _db: std::marker::PhantomData<DB>,
}

impl<DB: SqlDialect> Stmt<DB> {
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
fn from<DB: SqlDialect>(table: &str) -> String {
    format!(" FROM {table} c, (SELECT {} AS now_us) n", DB::NOW_US)
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
fn conditions<DB: SqlDialect>(s: &mut Stmt<DB>, filter: &ScanFilter) {
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

/// The statement of one page of a scan of `table`, and the page's size.
pub(crate) fn scan_stmt<DB: SqlDialect>(
    table: &TableName,
    filter: &ScanFilter,
    cursor: Option<&ScanCursor>,
    limit: usize,
) -> Result<(Stmt<DB>, usize), StoreError> {
    let limit = limit.clamp(1, 100_000);
    let t = table.quoted(DB::QUOTE);
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
    Ok((s, limit))
}

/// The page the rows of a [`scan_stmt`] of `limit` rows make.
pub(crate) fn scan_page(rows: &[impl Columns], limit: usize) -> Result<ScanPage, StoreError> {
    let full = rows.len() == limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
    for row in rows {
        let [scope, id] = [0, 1].map(|i| row.bytes(i).map_err(decode_error));
        let (scope, id) = (scope?, id?);
        let [status, attempts, token, expires_left, age] = ints(row, [2, 3, 4, 6, 7])?;
        let [lease_left, output] = opt_ints(row, [5, 8])?;
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

/// The statement counting the statistics of `table`.
pub(crate) fn stats_stmt<DB: SqlDialect>(
    table: &TableName,
    scope: Option<&str>,
    poisoned_at: Option<u32>,
) -> Stmt<DB> {
    let t = table.quoted(DB::QUOTE);
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
    s
}

/// The statistics the rows of a [`stats_stmt`] count.
pub(crate) fn stats_of(
    rows: &[impl Columns],
    poisoned_at: Option<u32>,
) -> Result<Vec<ScopeStats>, StoreError> {
    let mut by: BTreeMap<(String, u8), ScopeStats> = BTreeMap::new();
    for row in rows {
        let scope = row.bytes(0).map_err(decode_error)?;
        let [status, released, count] = ints(row, [1, 2, 3])?;
        let [oldest, past, poisoned] = opt_ints(row, [4, 5, 6])?;
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
/// bump the token past the last one and the clock. The statement; the change is
/// applied when it matched a row.
pub(crate) fn admin_stmt<DB: SqlDialect>(
    table: &TableName,
    key: &RecordKey,
    reset: bool,
) -> Stmt<DB> {
    let t = table.quoted(DB::QUOTE);
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
    s
}

/// The integer columns `at` of a scanned row, none of them `NULL`.
fn ints<const N: usize>(row: &impl Columns, at: [usize; N]) -> Result<[i64; N], StoreError> {
    let mut out = [0; N];
    for (o, i) in out.iter_mut().zip(at) {
        *o = row.int(i).map_err(decode_error)?;
    }
    Ok(out)
}

/// The integer columns `at` of a scanned row, `NULL` as `None`.
fn opt_ints<const N: usize>(
    row: &impl Columns,
    at: [usize; N],
) -> Result<[Option<i64>; N], StoreError> {
    let mut out = [None; N];
    for (o, i) in out.iter_mut().zip(at) {
        *o = row.opt_int(i).map_err(decode_error)?;
    }
    Ok(out)
}

pub(crate) fn decode_error(e: sqlx::Error) -> StoreError {
    StoreError::with_source(StoreErrorKind::Corrupt, "a scanned row does not decode", e)
}
