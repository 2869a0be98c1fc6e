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
}

impl<DB> BindExt for Query<'_, DB, DB::Arguments>
where
    DB: SqlDatabase,
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
        self.bind_owned(c.key, c.token)
            .bind(c.output)
            .bind(micros(c.ttl))
    }
}

/// A database the SQL stores run on: how the errors its server returns are classified.
pub(crate) trait SqlDatabase: Database {
    /// Whether the `scope` column holds bytes (bound as bytes, compared byte for byte)
    /// rather than text.
    const SCOPE_AS_BYTES: bool = false;

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
    fn err(op: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
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
    DB: SqlDatabase,
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

/// Runs one write on `conn`: the rows it matched. `err` wraps a driver error.
pub(crate) async fn execute<'c, DB, E>(
    conn: E,
    q: Query<'_, DB, DB::Arguments>,
    err: impl FnOnce(sqlx::Error) -> StoreError,
) -> Result<u64, StoreError>
where
    DB: SqlDatabase,
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
