//! [`PostgresStore`]: the dedup table in PostgreSQL.

mod batch;
pub(super) mod outbox;
mod scan;
mod statements;
mod tx;

pub(crate) use statements::Statements;

use super::common::{
    self, BindExt, DEFAULT_TABLE, Decision, RowView, SqlDialect, SqlQuery, SqlStore, StepSql,
    Steps, TableName,
};
use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::admin::StoreAdmin;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage, ScopeStats};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Record, Release, Store, Token};
use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A dedup store in PostgreSQL (12 or later), feature `postgres`.
///
/// Every protocol step is one SQL statement, so it costs one round trip (with the
/// statement prepared once per pooled connection): a claim is a single
/// `INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING` wrapped in a CTE that also
/// returns the existing row when the claim is refused, so the duplicate of a
/// completed key gets its cached output in that same round trip. The CTE reads the row
/// first and attempts the upsert only when that read shows the key claimable, so a
/// duplicate is a plain read that takes no row lock and writes nothing; the upsert's
/// own `WHERE` re-checks every rule on the latest row version, and a claim whose read
/// raced a concurrent claim is simply asked again. Complete, release and
/// renew are `UPDATE`s that compare-and-set on the owner token. Lease and expiry
/// decisions use the database's `clock_timestamp()`, never the client's clock.
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
///     scope          VARCHAR(200) NOT NULL,  -- the handler's namespace
///     message_id     BYTEA        NOT NULL,  -- the encoded key, at most 130 bytes
///     status         SMALLINT     NOT NULL,  -- 0 not yet consumed successfully, 1 consumed
///     retry_times    INTEGER      NOT NULL,  -- attempts claimed so far
///     owner_token    BIGINT       NOT NULL,  -- fencing token of the latest claim
///     lease_until_us BIGINT,                 -- lease deadline while in progress, NULL otherwise
///     expires_at_us  BIGINT       NOT NULL,  -- when the record may be purged
///     fingerprint    BYTEA,                  -- 32-byte message fingerprint, if declared
///     output         BYTEA,                  -- cached output once consumed
///     PRIMARY KEY (scope, message_id)
/// );
/// CREATE INDEX IF NOT EXISTS message_idempotent_expires_at_us_idx
///     ON message_idempotent (expires_at_us);
/// ```
///
/// Times are microseconds since the Unix epoch by the database clock
/// (`to_timestamp(expires_at_us / 1e6)` shows them as timestamps). The record states
/// map onto the columns as: **In progress** `status = 0` with a lease deadline;
/// **Released** (the last attempt failed, claimable again) `status = 0` with
/// `lease_until_us IS NULL`; **Completed** `status = 1`. A row whose `expires_at_us`
/// has passed counts as absent and is deleted by [`purge_expired`](StoreAdmin::purge_expired).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    claims: common::ClaimGate,
}

common::store_accessors!(PostgresStore, PgPool);

impl PostgresStore {
    /// The statements [`migrate`](Self::migrate) runs, for a DBA to review or run by
    /// hand: the `CREATE TABLE` and its index.
    pub fn schema(&self) -> Vec<String> {
        self.sql
            .create
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:5432/db`, TLS with `?sslmode=require`)
    /// with a pool of default size and creates the table `message_idempotent` if it is
    /// missing.
    /// The first connection is opened directly, so a server that refuses it (or a bad
    /// password, an unknown host) is an error at once, with the cause as its source;
    /// the pool's acquire timeout (30 s) applies to later use. The pool does not ping a
    /// connection before each use (sqlx pings it when it comes back to the pool): a
    /// connection that died while idle (a server restart, a killed session) fails the
    /// step that uses it with a retryable [`StoreErrorKind::Unavailable`](crate::error::StoreErrorKind::Unavailable) error and is
    /// replaced.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Connects to `url` and uses (and creates if missing) the table `table`, which may
    /// be schema-qualified (`schema.table`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        let op = "connecting to PostgreSQL";
        let options = PgConnectOptions::from_str(url).map_err(Postgres::err(op))?;
        let pool = Self::open_pool(PgPoolOptions::new(), options).await?;
        let store = PostgresStore::new(pool, table);
        store.migrate().await?;
        store.prepare().await?;
        Ok(store)
    }

    /// Opens a pool with the settings `pool` on `options` as [`connect`](Self::connect)
    /// opens its own, touching no schema: the first connection is opened directly
    /// (bounded by the pool's acquire timeout), so a refused connection, a bad password
    /// or an unknown host is an error at once, with the driver's error as its source
    /// (kind [`StoreErrorKind::Unavailable`](crate::error::StoreErrorKind::Unavailable) for a server that cannot be reached),
    /// rather than the pool's timeout after it has retried for the whole acquire
    /// timeout. The pool does not ping a connection before each use. For
    /// [`from_pool`](Self::from_pool) with pool settings of one's own.
    pub async fn open_pool(
        pool: PgPoolOptions,
        options: PgConnectOptions,
    ) -> Result<PgPool, StoreError> {
        common::open_pool(pool, options, "connecting to PostgreSQL").await
    }

    fn new(pool: PgPool, table: TableName) -> Self {
        PostgresStore {
            claims: common::ClaimGate::for_pool(&pool),
            pool,
            sql: Arc::new(Statements::new(table)),
        }
    }

    /// Uses the application's pool; the table `message_idempotent` must exist (call
    /// [`migrate`](Self::migrate) or create it by hand). Touches no schema.
    pub fn from_pool(pool: PgPool) -> Self {
        PostgresStore::new(pool, TableName::default_table())
    }

    /// The same pool on another table: letters, digits and `_`, optionally
    /// qualified by one schema (`schema.table`). Quoted in SQL, so case-sensitive.
    /// Touches no schema; a bad name is a [`StoreErrorKind::Rejected`](crate::error::StoreErrorKind::Rejected) error.
    pub fn with_table(self, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        Ok(PostgresStore {
            pool: self.pool,
            sql: Arc::new(Statements::new(table)),
            claims: self.claims,
        })
    }

    /// Creates the table and its expiry index if they are missing. Concurrent calls
    /// from many processes are serialized by an advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let op = "creating the dedup table";
        let mut tx = self.pool.begin().await.map_err(Postgres::err(op))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1)::int8)")
            .bind(self.sql.steps.table.display())
            .execute(&mut *tx)
            .await
            .map_err(Postgres::err(op))?;
        for stmt in &self.sql.create {
            sqlx::query(stmt.clone())
                .execute(&mut *tx)
                .await
                .map_err(Postgres::err(op))?;
        }
        tx.commit().await.map_err(Postgres::err(op))
    }

    /// Prepares the protocol's statements on the connection the pool holds, so the
    /// first claims do not pay for parsing and planning.
    async fn prepare(&self) -> Result<(), StoreError> {
        use sqlx::Executor;
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(Postgres::err("preparing statements"))?;
        for stmt in [
            &self.sql.claim,
            &self.sql.steps.complete,
            &self.sql.steps.release,
            &self.sql.steps.renew,
        ] {
            conn.prepare(stmt.clone())
                .await
                .map_err(Postgres::err("preparing statements"))?;
        }
        Ok(())
    }

    pub(crate) fn decode_claim(
        row: &PgRow,
        at: usize,
        req: &ClaimRequest<'_>,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let acquired: bool = row.try_get(at).map_err(Postgres::err("reading a claim"))?;
        if acquired {
            let token: i64 = row
                .try_get(at + 1)
                .map_err(Postgres::err("reading a claim"))?;
            let attempt: i64 = row
                .try_get(at + 2)
                .map_err(Postgres::err("reading a claim"))?;
            return common::acquired(token, attempt, req.key.scope()).map(Some);
        }
        match RowView::decode(row, at + 3, req.key.scope())?.decide(req) {
            Decision::Answer(outcome) => Ok(Some(outcome)),
            // the row was read from the statement's snapshot, older than the version the
            // upsert saw (a concurrent claim committed in between): ask again
            Decision::Claimable { .. } => Ok(None),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        Postgres::storable(req.key)?;
        let _slot = self.claims.enter().await;
        common::retrying!({
            let row = sqlx::query(self.sql.claim.clone())
                .bind_claim(req)
                .bind(
                    req.max_attempts
                        .map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
                )
                .fetch_all(&self.pool)
                .await
                .map_err(Postgres::err("claim"))?
                .pop();
            // no row: a concurrent claim inserted the key after this statement's snapshot
            match row {
                Some(row) => Self::decode_claim(&row, 0, req)?,
                None => None,
            }
        })
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
impl StoreAdmin for PostgresStore {
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

impl SqlStore for PostgresStore {
    type Db = Postgres;

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn steps(&self) -> &StepSql {
        &self.sql.steps
    }

    fn write<'q>(
        &'q self,
        op: &'static str,
        q: SqlQuery<'q, Postgres>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'q {
        common::execute(&self.pool, q, Postgres::err(op))
    }
}
