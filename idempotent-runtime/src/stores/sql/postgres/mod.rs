//! [`PostgresStore`]: the dedup table in PostgreSQL.

mod batch;
pub(super) mod outbox;
mod scan;
mod statements;
mod tx;

pub(crate) use statements::Statements;

use super::common::{self, BindExt, DEFAULT_TABLE, Decision, RowView, SqlDialect};
use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
use std::sync::Arc;

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
/// has passed counts as absent and is deleted by [`purge_expired`](crate::store::admin::StoreAdmin::purge_expired).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    claims: common::ClaimGate,
}

common::methods::sql_store!(PostgresStore, Postgres, PgPool,
    open_pool = (PgPoolOptions, PgConnectOptions, "connecting to PostgreSQL"),
    from_pool = {
        /// Uses the application's pool; the table `message_idempotent` must exist (call
        /// [`migrate`](Self::migrate) or create it by hand). Touches no schema.
    },
    with_table = {
        /// The same pool on another table: letters, digits and `_`, optionally
        /// qualified by one schema (`schema.table`). Quoted in SQL, so case-sensitive.
        /// Touches no schema; a bad name is a [`StoreErrorKind::Rejected`](crate::error::StoreErrorKind::Rejected) error.
    },
);

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
        let op = "connecting to PostgreSQL";
        let (pool, table) = common::connect_url::<Postgres>(url, table, op).await?;
        let store = Self::open(pool, table).await?;
        store.prepare().await?;
        Ok(store)
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

    /// The statements [`migrate`](Self::migrate) runs, for a DBA to review or run by
    /// hand: the `CREATE TABLE` and its index.
    pub fn schema(&self) -> Vec<String> {
        common::schema(&self.sql.create)
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

impl PostgresStore {
    /// One claim, once in the gate: the claim statement until it answers.
    async fn claim_unguarded(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
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
}
