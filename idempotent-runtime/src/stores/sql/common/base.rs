//! What every SQL store's statements build on: table names, statement text, binding
//! the protocol's values, time arithmetic, opening a pool, running a write and error
//! classification.

use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::{ClaimRequest, Completion, Token};
use sqlx::error::DatabaseError;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Database, Encode, Executor, IntoArguments, SqlStr, Type};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The table every SQL store uses unless told otherwise, after the classic
/// `message_idempotent` table of hand-written consumers.
pub const DEFAULT_TABLE: &str = idempotent_shared::DEFAULT_TABLE;

/// Durations are clamped to this many microseconds (about 31 700 years) so that
/// `now + duration` never overflows a `BIGINT`.
pub(crate) const MAX_MICROS: i64 = 1_000_000_000_000_000_000;

/// How many times a claim re-reads a row that changed under it before giving up.
pub(crate) const CLAIM_RETRIES: usize = 32;

/// Rows one `purge_expired` statement deletes; the purge loops until a batch comes
/// back short, so no statement holds locks on more than this many rows.
pub(crate) const PURGE_BATCH: i64 = 1000;

/// A validated table name: letters, digits and `_`, optionally qualified by one schema
/// (`schema.table`), each part starting with a letter or `_`
/// ([`idempotent_shared::parse_table_name`]).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TableName {
    schema: Option<String>,
    name: String,
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl TableName {
    /// Parses and validates `name`; a bad name is a [`StoreErrorKind::Rejected`] error.
    pub(crate) fn parse(name: &str) -> Result<Self, StoreError> {
        let parsed = idempotent_shared::parse_table_name(name)
            .map_err(|e| StoreError::new(StoreErrorKind::Rejected, e.to_string()))?;
        Ok(TableName {
            schema: parsed.schema.map(str::to_owned),
            name: parsed.table.to_owned(),
        })
    }

    /// [`DEFAULT_TABLE`].
    pub(crate) fn default_table() -> Self {
        TableName {
            schema: None,
            name: DEFAULT_TABLE.to_owned(),
        }
    }

    /// The name as given (`schema.table` or `table`).
    pub(crate) fn display(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The schema part, if any.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table part.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted with `q` (`"` or `` ` ``); the parts were validated to contain
    /// neither quote character, so quoting is plain concatenation.
    pub(crate) fn quoted(&self, q: char) -> String {
        match &self.schema {
            Some(s) => format!("{q}{s}{q}.{q}{}{q}", self.name),
            None => format!("{q}{}{q}", self.name),
        }
    }
}

/// A statement's text as `sqlx` takes it. Every statement is built from constant text and
/// a validated, quoted table name; all values are bound parameters.
pub(crate) fn sql(s: String) -> SqlStr {
    sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(Arc::<str>::from(s)))
}

/// Binds the protocol's values, in the order every store's statements take them.
pub(crate) trait BindExt: Sized {
    /// `scope, message_id`.
    fn bind_key(self, key: &RecordKey) -> Self;
    /// `scope, message_id, owner_token`: the record a claim owns.
    fn bind_owned(self, key: &RecordKey, token: Token) -> Self;
    /// `scope, message_id, lease_us, keep_us, fingerprint`: a claim.
    fn bind_claim(self, req: &ClaimRequest<'_>) -> Self;
    /// `scope, message_id, owner_token, output, ttl_us`: a completion.
    fn bind_completion(self, c: &Completion<'_>) -> Self;
    /// `output, ttl_us`: what a completion writes.
    fn bind_output(self, c: &Completion<'_>) -> Self;
    /// One `BIGINT`.
    fn bind_int(self, v: i64) -> Self;
}

impl<DB> BindExt for Query<'_, DB, DB::Arguments>
where
    DB: SqlDialect,
    for<'a> &'a str: Encode<'a, DB> + Type<DB>,
    for<'a> &'a [u8]: Encode<'a, DB> + Type<DB>,
    for<'a> Option<&'a [u8]>: Encode<'a, DB> + Type<DB>,
    for<'a> i64: Encode<'a, DB> + Type<DB>,
{
    fn bind_key(self, key: &RecordKey) -> Self {
        let q = if DB::SCOPE_AS_BYTES {
            self.bind(key.scope().as_bytes())
        } else {
            self.bind(key.scope())
        };
        q.bind(key.key())
    }

    fn bind_owned(self, key: &RecordKey, token: Token) -> Self {
        self.bind_key(key).bind(token_param(token))
    }

    fn bind_claim(self, req: &ClaimRequest<'_>) -> Self {
        self.bind_key(req.key)
            .bind(micros(req.lease))
            .bind(keep_micros(req))
            .bind(req.fingerprint)
    }

    fn bind_completion(self, c: &Completion<'_>) -> Self {
        self.bind_owned(c.key, c.token).bind_output(c)
    }

    fn bind_output(self, c: &Completion<'_>) -> Self {
        self.bind(c.output).bind(micros(c.ttl))
    }

    fn bind_int(self, v: i64) -> Self {
        self.bind(v)
    }
}

/// What differs between the databases the SQL stores run on, and nothing else: the
/// clock, quoting and placeholders, the few functions whose names differ, how the
/// errors the server returns are classified, and what each statement built from
/// these pieces (the ownership clause, the record's columns, the steps' statements)
/// looks like. Implemented once per database, in its folder (`mysql/scan.rs`,
/// `postgres/scan.rs`, `sqlite/scan.rs`); every rule the stores share is written once
/// over it.
pub(crate) trait SqlDialect: Database<Arguments: IntoArguments<Self>> {
    /// The database clock in microseconds since the Unix epoch, read once per
    /// statement.
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
    /// Whether placeholders are numbered (`$n`, `?n`: bound in the order of their
    /// numbers, wherever they stand in the text) rather than positional (`?`: bound in
    /// the order they stand in the text).
    const NUMBERED: bool = true;
    /// Whether the `scope` column holds bytes (bound as bytes, compared byte for byte)
    /// rather than text.
    const SCOPE_AS_BYTES: bool = false;

    /// The scope column `{}` as bytes.
    const SCOPE_BYTES: &'static str;
    /// The length in bytes of the binary column `{}`.
    const BYTE_LEN: &'static str;
    /// The integer expression `{}` as a 64-bit integer.
    const INT8: &'static str;

    /// The `n`-th placeholder (from 1).
    fn param(n: usize) -> String;
    /// The scope column `col` as bytes ([`SCOPE_BYTES`](Self::SCOPE_BYTES)).
    fn scope_bytes(col: &str) -> String {
        Self::SCOPE_BYTES.replace("{}", col)
    }
    /// The length in bytes of the binary column `col` ([`BYTE_LEN`](Self::BYTE_LEN)).
    fn byte_len(col: &str) -> String {
        Self::BYTE_LEN.replace("{}", col)
    }
    /// The integer expression `expr` as a 64-bit integer ([`INT8`](Self::INT8)).
    fn int8(expr: &str) -> String {
        Self::INT8.replace("{}", expr)
    }

    /// How a statement built by [`update`](Self::update) or [`select`](Self::select)
    /// names its clock reading: [`NOW_US`](Self::NOW_US) itself, unless the database
    /// reads it once per statement only when told to.
    fn now() -> &'static str {
        Self::NOW_US
    }
    /// `UPDATE table SET set WHERE cond`, reading the clock as [`now`](Self::now).
    fn update(table: &str, set: &str, cond: &str) -> String {
        format!("UPDATE {table} SET {set} WHERE {cond}")
    }
    /// `SELECT cols FROM from WHERE cond`, reading the clock as [`now`](Self::now).
    fn select(cols: &str, from: &str, cond: &str) -> String {
        format!("SELECT {cols} FROM {from} WHERE {cond}")
    }
    /// The statement deleting up to one batch (the placeholder `?1`/`$1`) of expired
    /// records of `table` (quoted).
    fn purge(table: &str) -> String;

    /// The ownership clause: the row `r` (a prefix such as `r.`, or empty) is a live
    /// claim in progress holding only values this store writes. The statements of
    /// complete, release and renew (and their batch forms) touch no other row; the key
    /// and the owner token are matched beside it.
    fn held(r: &str) -> String {
        format!(
            "{r}status = 0 AND {r}lease_until_us IS NOT NULL AND {r}expires_at_us > {} AND {}",
            Self::now(),
            sane(r, Self::ANY_TYPE)
        )
    }
    /// The ownership clause of one key: the key and the owner token are the
    /// placeholders 1, 2 and 3, and the row is [`held`](Self::held).
    fn owned() -> String {
        format!(
            "scope = {} AND message_id = {} AND owner_token = {} AND {}",
            Self::param(1),
            Self::param(2),
            Self::param(3),
            Self::held("")
        )
    }
    /// The columns of the row `r` as [`RowView::decode`](super::row::RowView::decode)
    /// reads them, the clock last.
    fn view(r: &str) -> String {
        format!(
            "{}, {}, {r}owner_token, {r}lease_until_us, {r}expires_at_us, {r}fingerprint, \
             {r}output, {}",
            Self::int8(&format!("{r}status")),
            Self::int8(&format!("{r}retry_times")),
            Self::now()
        )
    }

    /// Checks that the database can store the scope of `key` (before any step on it).
    fn storable(_key: &RecordKey) -> Result<(), StoreError> {
        Ok(())
    }

    /// The kind of an error the server returned.
    fn classify(e: &dyn DatabaseError) -> StoreErrorKind;

    /// The rows a statement matched.
    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// Whether an error the server returned is a conflict with a concurrent
    /// transaction (deadlock, serialization failure, lock wait timeout): the statement
    /// (in transactional mode, the whole transaction) was rolled back and a retry may
    /// succeed.
    fn conflict(e: &dyn DatabaseError) -> bool;

    /// Wraps a driver error of the operation `op`, classifying it: conflicts are
    /// [`StoreErrorKind::Conflict`], other errors the server returned are classified
    /// by [`classify`](Self::classify).
    fn err(op: &str) -> impl Fn(sqlx::Error) -> StoreError + Send + Sync + '_ {
        move |e| {
            let conflicted = matches!(&e, sqlx::Error::Database(d) if Self::conflict(d.as_ref()));
            if conflicted {
                sql_error(op, e, |_| StoreErrorKind::Conflict)
            } else {
                sql_error(op, e, Self::classify)
            }
        }
    }
}

/// Largest `retry_times` a valid row holds: one more attempt must still fit the
/// column (`INT`).
pub(crate) const MAX_ATTEMPTS_VALUE: i64 = i32::MAX as i64 - 1;

/// Largest time a valid row holds: far beyond any clock reading plus [`MAX_MICROS`],
/// and small enough that subtracting a clock reading or adding a duration of up to
/// [`MAX_MICROS`] fits a `BIGINT`.
pub(crate) const MAX_TIME: i64 = 4 * MAX_MICROS;

/// The SQL condition "the row `r` holds only values this store writes": a status of 0
/// or 1, an attempt count, token, lease deadline and expiry within range (so that one
/// more attempt, the next token and every time computed from them fit a `BIGINT`), and
/// on SQLite, whose columns take any type, integers in the integer columns and bytes
/// (or text) in the fingerprint and output. Claims and the compare-and-set writes
/// touch only such rows; any other row is reported as [`StoreErrorKind::Corrupt`] by
/// [`RowView::decode`](super::row::RowView::decode), which applies the same rules.
pub(crate) fn sane(r: &str, sqlite: bool) -> String {
    let mut s = format!(
        "{r}status IN (0, 1) AND {r}retry_times BETWEEN 0 AND {MAX_ATTEMPTS_VALUE} \
         AND {r}owner_token BETWEEN 0 AND {max_token} \
         AND ({r}lease_until_us IS NULL OR {r}lease_until_us BETWEEN 0 AND {MAX_TIME}) \
         AND {r}expires_at_us BETWEEN 0 AND {MAX_TIME}",
        max_token = i64::MAX - 1,
    );
    if sqlite {
        s.push_str(&format!(
            " AND typeof({r}status) = 'integer' AND typeof({r}retry_times) = 'integer' \
             AND typeof({r}owner_token) = 'integer' AND typeof({r}expires_at_us) = 'integer' \
             AND typeof({r}lease_until_us) IN ('integer', 'null') \
             AND typeof({r}fingerprint) IN ('blob', 'text', 'null') \
             AND typeof({r}output) IN ('blob', 'text', 'null')"
        ));
    }
    s
}

/// Opens a pool with `pool` on `options`, failing fast: the first connection is
/// opened directly (bounded by the pool's acquire timeout), so a refused connection, a
/// bad password or an unknown host is reported at once, as its own error (kind
/// [`StoreErrorKind::Unavailable`] for a server that cannot be reached), instead of
/// after the pool's acquire timeout. The pool keeps its acquire timeout for later use.
///
/// The pool does not ping a connection before handing it out: sqlx already pings every
/// connection when it comes back to the pool (and closes it if that fails), and closes
/// connections idle for 10 minutes, so an idle connection is one that answered a moment
/// before. One that died since (a server restart, a killed session) fails the step that
/// uses it with an [`StoreErrorKind::Unavailable`] error, which the protocol handles as
/// any outage (a claim fails closed, a completion is retried), and the pool replaces it.
/// A ping on acquire would cost every step a second round trip to spare that.
pub(crate) async fn open_pool<DB>(
    pool: sqlx::pool::PoolOptions<DB>,
    options: <DB::Connection as sqlx::Connection>::Options,
    op: &str,
) -> Result<sqlx::Pool<DB>, StoreError>
where
    DB: SqlDialect,
{
    use sqlx::Connection;
    let limit = pool.get_acquire_timeout();
    let first = tokio::time::timeout(limit, DB::Connection::connect_with(&options))
        .await
        .map_err(|_| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                format!("{op}: the database did not accept a connection within {limit:?}"),
            )
        })?
        .map_err(DB::err(op))?;
    // the pool opens its own connections; this one only proved the server answers
    let _ = first.close().await;
    pool.test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(DB::err(op))
}

/// The text of the statements `stmts`, as a store's `schema` shows them.
pub(crate) fn schema<'s>(stmts: impl IntoIterator<Item = &'s SqlStr>) -> Vec<String> {
    stmts.into_iter().map(|s| s.as_str().to_owned()).collect()
}

/// What a server store's `connect_with_table` opens: the table `table`, validated
/// first, and a pool of default settings on `url`, opened as [`open_pool`] opens it;
/// `op` names the connection in errors.
#[cfg_attr(not(any(feature = "mysql", feature = "postgres")), allow(dead_code))]
pub(crate) async fn connect_url<DB: SqlDialect>(
    url: &str,
    table: &str,
    op: &str,
) -> Result<(sqlx::Pool<DB>, TableName), StoreError> {
    let table = TableName::parse(table)?;
    let options = url
        .parse::<<DB::Connection as sqlx::Connection>::Options>()
        .map_err(DB::err(op))?;
    Ok((
        open_pool(sqlx::pool::PoolOptions::new(), options, op).await?,
        table,
    ))
}

/// Runs one write on `conn`: the rows it matched. `err` wraps a driver error.
pub(crate) async fn execute<'c, DB, E>(
    conn: E,
    q: Query<'_, DB, DB::Arguments>,
    err: impl FnOnce(sqlx::Error) -> StoreError,
) -> Result<u64, StoreError>
where
    DB: SqlDialect,
    DB::Arguments: IntoArguments<DB>,
    E: Executor<'c, Database = DB>,
{
    let done = q.execute(conn).await.map_err(err)?;
    Ok(DB::rows_affected(&done))
}

/// Deletes expired records in batches of [`PURGE_BATCH`] until a batch comes back
/// short; `batch` deletes one batch and answers how many rows it deleted.
pub(crate) async fn purge_in_batches<F, Fut>(mut batch: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let rows = batch().await?;
        total += rows;
        if rows < PURGE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// A duration in microseconds, clamped to [`MAX_MICROS`].
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).map_or(MAX_MICROS, |m| m.min(MAX_MICROS))
}

/// How long a record is kept while not Completed: the ttl, and at least the lease.
pub(crate) fn keep_micros(req: &ClaimRequest<'_>) -> i64 {
    micros(req.ttl).max(micros(req.lease))
}

/// A positive number of microseconds as a duration.
pub(crate) fn from_micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// A token as a `BIGINT` parameter. Tokens the stores issue are microseconds since the
/// epoch, far below `i64::MAX`; a larger one cannot own any record.
pub(crate) fn token_param(t: Token) -> i64 {
    i64::try_from(t.0).unwrap_or(-1)
}

/// The `max_attempts` of a request as a `BIGINT` parameter.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn max_attempts_param(req: &ClaimRequest<'_>) -> Option<i64> {
    req.max_attempts.map(i64::from)
}

/// Wraps a driver error, classifying it; `database` classifies errors the server
/// returned (each database has its own codes).
pub(crate) fn sql_error(
    op: &str,
    e: sqlx::Error,
    database: fn(&dyn DatabaseError) -> StoreErrorKind,
) -> StoreError {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => StoreErrorKind::Unavailable,
        sqlx::Error::Configuration(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreErrorKind::Rejected,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::RowNotFound => {
            StoreErrorKind::Corrupt
        }
        sqlx::Error::Database(d) => database(d.as_ref()),
        _ => StoreErrorKind::Other,
    };
    let what = match kind {
        StoreErrorKind::Unavailable => "the database is unavailable",
        StoreErrorKind::Rejected => "the database rejected the request",
        StoreErrorKind::Corrupt => "the database returned data this store does not understand",
        StoreErrorKind::Conflict => {
            "the statement conflicted with a concurrent transaction (deadlock, serialization \
             failure or lock wait timeout); retry it (in transactional mode, roll the \
             transaction back first)"
        }
        _ => "the database failed",
    };
    let message = match &e {
        sqlx::Error::Database(d) => format!("{op}: {what}: {}", d.message()),
        e => format!("{op}: {what}: {e}"),
    };
    StoreError::with_source(kind, message, e)
}

/// Classifies an SQLSTATE (PostgreSQL, and MySQL errors without a more precise number).
#[cfg_attr(not(any(feature = "mysql", feature = "postgres")), allow(dead_code))]
pub(crate) fn classify_sqlstate(state: &str) -> StoreErrorKind {
    match state.get(..2).unwrap_or_default() {
        // connection exception, insufficient resources, operator intervention
        "08" | "53" | "57" | "HY" => StoreErrorKind::Unavailable,
        // syntax error or access rule violation, invalid authorization, feature not supported
        "42" | "28" | "0A" | "3D" | "3F" => StoreErrorKind::Rejected,
        // data exception, integrity constraint violation
        "22" | "23" => StoreErrorKind::Corrupt,
        _ => StoreErrorKind::Other,
    }
}

/// Limits how many claims run at once on a pool, keeping a quarter of its connections
/// (at least one, when it has more than one) for complete, release and renew. Under a
/// storm of claims and polling duplicates, the steps that end a claim then never queue
/// behind new claims, so an overloaded database does not let leases lapse (and bodies
/// run twice) merely because completions waited for a connection.
#[derive(Clone, Debug)]
pub(crate) struct ClaimGate(std::sync::Arc<tokio::sync::Semaphore>);

impl ClaimGate {
    /// The gate of a pool.
    pub(crate) fn for_pool<DB: Database>(pool: &sqlx::Pool<DB>) -> Self {
        Self::for_pool_size(pool.options().get_max_connections())
    }

    fn for_pool_size(max_connections: u32) -> Self {
        let max = max_connections.max(1) as usize;
        let reserve = if max > 1 { (max / 4).max(1) } else { 0 };
        ClaimGate(std::sync::Arc::new(tokio::sync::Semaphore::new(
            max - reserve,
        )))
    }

    /// Waits for a claim slot.
    pub(crate) async fn enter(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // the semaphore is never closed; without a permit the claim still runs
        self.0.acquire().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule itself is tested in `idempotent-shared`; here, what the stores build on it.
    #[test]
    fn table_names_are_validated() {
        assert_eq!(TableName::parse("dedup").unwrap().quoted('"'), "\"dedup\"");
        assert_eq!(
            TableName::parse("app.dedup_2").unwrap().quoted('`'),
            "`app`.`dedup_2`"
        );
        assert_eq!(
            TableName::parse("app.dedup_2").unwrap().schema(),
            Some("app")
        );
        assert_eq!(TableName::parse("app.dedup_2").unwrap().name(), "dedup_2");
        assert_eq!(TableName::parse("_x").unwrap().display(), "_x");
        assert_eq!(
            TableName::parse(DEFAULT_TABLE).unwrap(),
            TableName::default_table()
        );
        for bad in ["a.b.c", "a;drop table x", "a`b"] {
            let e = TableName::parse(bad).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Rejected, "{bad:?}");
            assert!(
                e.to_string()
                    .contains(&format!("invalid table name {bad:?}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn durations_are_clamped() {
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert_eq!(micros(Duration::MAX), MAX_MICROS);
        assert_eq!(from_micros(-5), Duration::ZERO);
        assert_eq!(token_param(Token(u64::MAX)), -1);
    }
}
