//! [`MySqlStore`]: the dedup table in MySQL 8 or MariaDB 10.11+.

mod batch;
pub(super) mod outbox;
mod scan;
mod statements;
mod tx;

pub(crate) use statements::Statements;

use super::common::{
    self, BindExt, DEFAULT_TABLE, Decision, Plan, RowView, SqlDialect, SqlQuery, SqlStore, StepSql,
    Steps, TableName, sql,
};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::admin::StoreAdmin;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage, ScopeStats};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Record, Release, Store, Token};
use async_trait::async_trait;
use sqlx::Row;
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// A dedup store in MySQL 8 or MariaDB 10.11+, feature `mysql`.
///
/// MySQL has no `RETURNING`, so a claim reads first and writes only when it must:
///
/// 1. `SELECT` the row (a plain consistent read, no lock). A completed key (the
///    duplicate case), a live claim, an exhausted or mismatched key is answered right
///    there, without a lock or a write.
/// 2. Otherwise one conditional write, atomic on the server: an `INSERT` for an absent
///    key, or an `UPDATE … WHERE owner_token = <token read> AND <still claimable>` that
///    takes over a released, lapsed or expired row (compare-and-set on what step 1
///    saw). The new token is `LAST_INSERT_ID(expr)`. If the row changed in between (a
///    duplicate-key error, or the `UPDATE` matched no row), the claim starts over from
///    step 1; no decision is ever taken on data that is not re-checked by the write
///    itself.
///
/// Both steps run on the server in the stored procedure `<table>_claim_v2` that
/// [`connect`](Self::connect) and [`migrate`](Self::migrate) create (each statement in
/// it commits on its own, as if the client had sent it), so **every claim is one round
/// trip**: `CALL <table>_claim_v2(scope, key, lease_us, keep_us, fingerprint,
/// max_attempts)` answers one row. Creating it needs the `CREATE ROUTINE` privilege;
/// it runs with the caller's privileges (`SQL SECURITY INVOKER`), so other users need
/// `EXECUTE` on it besides their table privileges. A store made with
/// [`from_pool`](Self::from_pool) touches no schema: it calls the procedure if it is
/// there and, when it is missing (or not executable), sends the two steps as two
/// statements (a duplicate still one round trip, a first delivery two), looking for
/// the procedure again every 30 seconds.
///
/// Complete, release and renew are one `UPDATE` each (one round trip), compare-and-set
/// on the owner token. Lease and expiry decisions use `UTC_TIMESTAMP(6)` on the server,
/// never the client's clock.
///
/// Batches: `claim_batch` reads every key in one `SELECT … WHERE (scope, message_id)
/// IN (…)` (which answers all duplicates), inserts all absent keys in one multi-row
/// `INSERT` (a concurrent insert of any of them fails it as a whole, and those keys go
/// the single-key way), and takes over released or lapsed keys one at a time.
/// `complete_batch` and `release_batch` are one `UPDATE … JOIN (SELECT ? … UNION ALL
/// …)` each, compare-and-set per row; when it matched fewer rows than items, one more
/// `SELECT` tells which items were applied (for a completion, a row Completed under
/// the item's token, whether by this statement or by an earlier completion whose
/// reply was lost; for a release, a row that is Released under the item's token, so a
/// release repeated by the same owner also reads as applied). Up to 500 keys (and
/// about 4 MiB of outputs) go in one statement.
///
/// Handles are cheap to clone (a pool and a shared set of statements).
///
/// # Table
///
/// [`connect`](Self::connect) and [`migrate`](Self::migrate) create the table if it is
/// missing; to create it by hand (name it as you like and pass the name to
/// [`with_table`](Self::with_table)):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS message_idempotent (
///     scope          VARBINARY(200) NOT NULL,  -- the handler's namespace, as UTF-8 bytes
///     message_id     VARBINARY(130) NOT NULL,  -- the encoded key
///     status         TINYINT        NOT NULL,  -- 0 not yet consumed successfully, 1 consumed
///     retry_times    INT            NOT NULL,  -- attempts claimed so far
///     owner_token    BIGINT         NOT NULL,  -- fencing token of the latest claim
///     lease_until_us BIGINT         NULL,      -- lease deadline while in progress, NULL otherwise
///     expires_at_us  BIGINT         NOT NULL,  -- when the record may be purged
///     fingerprint    VARBINARY(32)  NULL,      -- message fingerprint, if declared
///     output         LONGBLOB       NULL,      -- cached output once consumed
///     PRIMARY KEY (scope, message_id),
///     KEY expires_at_us_idx (expires_at_us)
/// ) ENGINE = InnoDB;
/// ```
///
/// and the claim procedure, whose text is in this crate's source
/// (`claim_procedure` in `sql/mysql/statements.rs`; [`migrate`](Self::migrate) creates it).
///
/// Times are microseconds since the Unix epoch by the database clock
/// (`FROM_UNIXTIME(expires_at_us / 1e6)` shows them as timestamps). The record states
/// map onto the columns as: **In progress** `status = 0` with a lease deadline;
/// **Released** (the last attempt failed, claimable again) `status = 0` with
/// `lease_until_us IS NULL`; **Completed** `status = 1`. A row whose `expires_at_us`
/// has passed counts as absent and is deleted by [`purge_expired`](StoreAdmin::purge_expired).
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    sql: Arc<Statements>,
    claims: common::ClaimGate,
    procedure: Arc<ProcedureState>,
}

/// Whether claims call the claim procedure: they do until a call finds it missing
/// (or not executable); then the two-statement claim is used for
/// [`PROCEDURE_RETRY`], after which the procedure is tried again.
struct ProcedureState {
    since: Instant,
    /// Milliseconds after `since` before which the procedure is not called.
    skip_until_ms: AtomicU64,
}

/// How long claims do without a missing claim procedure before looking again.
const PROCEDURE_RETRY: Duration = Duration::from_secs(30);

impl ProcedureState {
    fn new() -> Arc<Self> {
        Arc::new(ProcedureState {
            since: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn usable(&self) -> bool {
        let skip = self.skip_until_ms.load(AtomicOrdering::Relaxed);
        skip == 0 || self.now_ms() >= skip
    }

    fn missing(&self) {
        let until = self
            .now_ms()
            .saturating_add(PROCEDURE_RETRY.as_millis() as u64);
        self.skip_until_ms
            .store(until.max(1), AtomicOrdering::Relaxed);
    }

    fn present(&self) {
        self.skip_until_ms.store(0, AtomicOrdering::Relaxed);
    }
}

/// Errors that mean the claim procedure cannot be called (does not exist, no
/// `EXECUTE` privilege, another version's parameters).
fn procedure_missing(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|my| matches!(my.number(), 1305 | 1370 | 1318)))
}

common::store_accessors!(MySqlStore, MySqlPool);

impl MySqlStore {
    /// The statements [`migrate`](Self::migrate) runs, for a DBA to review or run by
    /// hand: the `CREATE TABLE` and, when the table's name leaves room for it, the
    /// `CREATE PROCEDURE` of the claim procedure.
    pub fn schema(&self) -> Vec<String> {
        std::iter::once(&self.sql.create)
            .chain(self.sql.claim_procedure.as_ref())
            .map(|s| s.as_str().to_owned())
            .collect()
    }
}

/// The row the claim procedure answers: `Some` outcome, or `None` when the claim must
/// be tried again (the procedure kept losing races, or the row it read is claimable
/// after all).
fn decode_procedure(
    row: &sqlx::mysql::MySqlRow,
    req: &ClaimRequest<'_>,
) -> Result<Option<ClaimOutcome>, StoreError> {
    let get = |i: usize| {
        row.try_get::<Option<i64>, _>(i)
            .map_err(MySql::err("reading a claim"))
    };
    let scope = req.key.scope();
    if get(0)? == Some(1) {
        return common::acquired(get(1)?.unwrap_or(-1), get(2)?.unwrap_or(-1), scope).map(Some);
    }
    if get(3)?.is_none() {
        return Ok(None);
    }
    match RowView::decode(row, 3, scope)?.decide(req) {
        Decision::Answer(outcome) => Ok(Some(outcome)),
        Decision::Claimable { .. } => Ok(None),
    }
}

impl MySqlStore {
    /// Connects to `url` (`mysql://user:password@host:3306/db`, TLS with
    /// `?ssl-mode=required`) with a pool of default size and creates the table
    /// `message_idempotent` if it is missing.
    /// The first connection is opened directly, so a server that refuses it (or a bad
    /// password, an unknown host) is an error at once, with the cause as its source;
    /// the pool's acquire timeout (30 s) applies to later use. The pool does not ping a
    /// connection before each use (sqlx pings it when it comes back to the pool): a
    /// connection that died while idle (a server restart, a killed session) fails the
    /// step that uses it with a retryable [`StoreErrorKind::Unavailable`] error and is
    /// replaced.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Connects to `url` and uses (and creates if missing) the table `table`, which may
    /// be qualified by a database name (`db.table`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        let op = "connecting to MySQL";
        let options = MySqlConnectOptions::from_str(url).map_err(MySql::err(op))?;
        let pool = Self::open_pool(MySqlPoolOptions::new(), options).await?;
        let store = MySqlStore::new(pool, table);
        store.migrate().await?;
        Ok(store)
    }

    /// Opens a pool with the settings `pool` on `options` as [`connect`](Self::connect)
    /// opens its own, touching no schema: the first connection is opened directly
    /// (bounded by the pool's acquire timeout), so a refused connection, a bad password
    /// or an unknown host is an error at once, with the driver's error as its source
    /// (kind [`StoreErrorKind::Unavailable`] for a server that cannot be reached),
    /// rather than the pool's timeout after it has retried for the whole acquire
    /// timeout. The pool does not ping a connection before each use. For
    /// [`from_pool`](Self::from_pool) with pool settings of one's own.
    pub async fn open_pool(
        pool: MySqlPoolOptions,
        options: MySqlConnectOptions,
    ) -> Result<MySqlPool, StoreError> {
        common::open_pool(pool, options, "connecting to MySQL").await
    }

    fn new(pool: MySqlPool, table: TableName) -> Self {
        MySqlStore {
            claims: common::ClaimGate::for_pool(&pool),
            pool,
            sql: Arc::new(Statements::new(table)),
            procedure: ProcedureState::new(),
        }
    }

    /// Uses the application's pool; the table `message_idempotent` must exist (call
    /// [`migrate`](Self::migrate) or create it by hand). Touches no schema: a table
    /// created by an earlier version keeps its `VARCHAR` scope column, under which
    /// scopes differing only by trailing spaces share records, until
    /// [`migrate`](Self::migrate) runs.
    pub fn from_pool(pool: MySqlPool) -> Self {
        MySqlStore::new(pool, TableName::default_table())
    }

    /// The same pool on another table: letters, digits and `_`, optionally
    /// qualified by one database name (`db.table`). Touches no schema; a bad name is a
    /// [`StoreErrorKind::Rejected`] error.
    pub fn with_table(self, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        Ok(MySqlStore {
            pool: self.pool,
            sql: Arc::new(Statements::new(table)),
            claims: self.claims,
            procedure: ProcedureState::new(),
        })
    }

    /// Creates the table (with its expiry index) and the claim procedure
    /// `<table>_claim_v2` if they are missing. Creating the procedure needs the
    /// `CREATE ROUTINE` privilege on the database (its creator may then execute it;
    /// other users need `EXECUTE`). Without the procedure (or when the name would
    /// be longer than 64 characters, for a table name longer than 55), claims still
    /// work, in two round trips instead of one.
    ///
    /// A table created by an earlier version is brought up to date: a `scope` column
    /// of type `VARCHAR` (whose collation ignores trailing spaces, so that scopes
    /// differing only by them shared records) becomes `VARBINARY(200)` with one
    /// `ALTER TABLE` (which rebuilds the table), and the claim procedure of this
    /// version is created beside the one of earlier versions (`<table>_claim_v1`,
    /// which processes of an earlier version still call during a rolling upgrade;
    /// drop it by hand once none runs). Concurrent calls from many processes are
    /// serialized by a named lock (`GET_LOCK`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let op = "migrating the dedup table";
        let mut conn = self.pool.acquire().await.map_err(MySql::err(op))?;
        // the named lock belongs to the session: closing it (on every path) frees it
        conn.close_on_drop();
        let locked: Option<i64> = sqlx::query_scalar(
            "SELECT GET_LOCK(CONCAT('idempotent:', \
                LEFT(SHA2(CONCAT(COALESCE(?, DATABASE()), '.', ?), 256), 40)), 60)",
        )
        .bind(self.sql.steps.table.schema())
        .bind(self.sql.steps.table.name())
        .fetch_one(&mut *conn)
        .await
        .map_err(MySql::err(op))?;
        if locked != Some(1) {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                format!("{op}: another process held the migration lock for 60 s"),
            ));
        }
        sqlx::query(self.sql.create.clone())
            .execute(&mut *conn)
            .await
            .map_err(MySql::err("creating the dedup table"))?;
        let scope_type: Option<String> = sqlx::query_scalar(
            "SELECT CAST(DATA_TYPE AS CHAR) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
                AND COLUMN_NAME = 'scope'",
        )
        .bind(self.sql.steps.table.schema())
        .bind(self.sql.steps.table.name())
        .fetch_optional(&mut *conn)
        .await
        .map_err(MySql::err(op))?;
        if scope_type.is_some_and(|t| !t.eq_ignore_ascii_case("varbinary")) {
            let t = self.sql.steps.table.quoted(MySql::QUOTE);
            sqlx::query(sql(format!(
                "ALTER TABLE {t} MODIFY scope VARBINARY(200) NOT NULL"
            )))
            .execute(&mut *conn)
            .await
            .map_err(MySql::err("changing the scope column to VARBINARY"))?;
        }
        if let Some(create) = &self.sql.claim_procedure {
            // sent as text: CREATE PROCEDURE cannot be a prepared statement
            match sqlx::raw_sql(create.clone()).execute(&mut *conn).await {
                Ok(_) => {}
                // already there (created by hand or by another process)
                Err(sqlx::Error::Database(d))
                    if d.try_downcast_ref::<MySqlDatabaseError>()
                        .is_some_and(|my| my.number() == 1304) => {}
                Err(e) => return Err(MySql::err("creating the claim procedure")(e)),
            }
            self.procedure.present();
        }
        Ok(())
    }

    async fn claim_unguarded(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        if let Some(call) = &self.sql.claim_call
            && self.procedure.usable()
        {
            let row = sqlx::query(call.clone())
                .bind_claim(req)
                .bind(req.max_attempts.map(i64::from))
                .fetch_all(&self.pool)
                .await;
            match row {
                Ok(mut rows) => {
                    if let Some(row) = rows.pop()
                        && let Some(outcome) = decode_procedure(&row, req)?
                    {
                        return Ok(outcome);
                    }
                    // the procedure kept losing races: go on with the statements
                }
                Err(e) if procedure_missing(&e) => {
                    tracing::debug!(error = %e, "claim procedure unavailable; claiming in two statements");
                    self.procedure.missing();
                }
                Err(e) => return Err(MySql::err("claim")(e)),
            }
        }
        common::retrying!({
            let seen = Steps::read(self, req.key).await?;
            self.act(req, seen).await?
        })
    }

    /// Acts on what a read saw: answers, or tries the one conditional write.
    /// `Ok(None)`: the row changed since the read; read again.
    async fn act(
        &self,
        req: &ClaimRequest<'_>,
        seen: Option<RowView>,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let plan = Plan::of(req, seen);
        self.sql
            .write_claim(&self.pool, req, plan, MySql::err("claim"))
            .await
    }
}

#[async_trait]
impl Store for MySqlStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let _slot = self.claims.enter().await;
        self.claim_unguarded(req).await
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        Steps::complete(self, c).await
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        Steps::release(self, r).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        Steps::renew(self, key, token, lease).await
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        self.claim_many(reqs).await
    }

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.complete_many(items).await
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.release_many(items).await
    }

    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        Some(self)
    }
}

#[async_trait]
impl StoreAdmin for MySqlStore {
    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        Steps::inspect(self, key).await
    }

    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        Steps::forget(self, key).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        Steps::purge_expired(self).await
    }

    async fn scan(
        &self,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        Steps::scan(self, filter, cursor, limit).await
    }

    async fn stats(
        &self,
        scope: Option<&str>,
        poisoned_at: Option<u32>,
    ) -> Result<Vec<ScopeStats>, StoreError> {
        Steps::stats(self, scope, poisoned_at).await
    }

    async fn force_release(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        Steps::admin(self, key, false).await
    }

    async fn reset_attempts(&self, key: &RecordKey) -> Result<AdminOutcome, StoreError> {
        Steps::admin(self, key, true).await
    }
}

impl SqlStore for MySqlStore {
    type Db = MySql;

    fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    fn steps(&self) -> &StepSql {
        &self.sql.steps
    }

    fn write<'q>(
        &'q self,
        op: &'static str,
        q: SqlQuery<'q, MySql>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'q {
        common::execute(&self.pool, q, MySql::err(op))
    }
}
