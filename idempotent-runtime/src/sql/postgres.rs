//! [`PostgresStore`]: the dedup table in PostgreSQL.

use super::common::{
    self, BindExt, CLAIM_RETRIES, DEFAULT_TABLE, Decision, PURGE_BATCH, RowView, SqlDatabase,
    TableName, keep_micros, max_attempts_param, micros, repeated, sql, token_param,
};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Record, Release, Store, Token};
use crate::{RecordKey, StoreError, StoreErrorKind};
use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::{Row, SqlStr};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The database clock in microseconds since the Unix epoch. `clock_timestamp()` rather
/// than `now()`, which is frozen at the start of the surrounding transaction.
const NOW_US: &str = "floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8";

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
/// has passed counts as absent and is deleted by [`purge_expired`](Store::purge_expired).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    claims: common::ClaimGate,
}

pub(crate) struct Statements {
    table: TableName,
    pub(crate) claim: SqlStr,
    claim_batch: SqlStr,
    pub(crate) complete: SqlStr,
    complete_batch: SqlStr,
    release: SqlStr,
    release_batch: SqlStr,
    renew: SqlStr,
    pub(crate) inspect: SqlStr,
    /// The rows of many keys, each with its scope and message id.
    inspect_batch: SqlStr,
    forget: SqlStr,
    purge: SqlStr,
    create: Vec<SqlStr>,
}

/// Columns of a row read back, with the clock value `n.now_us` (see
/// [`RowView::decode`]).
const VIEW: &str = "c.status::int8, c.retry_times::int8, c.owner_token, \
     c.lease_until_us, c.expires_at_us, c.fingerprint, c.output, n.now_us";

/// The condition under which the row `c` read from the statement's snapshot answers a
/// claim without any write (rules 2, 3, 4 and an exhausted rule 5): live, and
/// mismatched, completed, leased or out of attempts. Only when it does not hold is the
/// upsert attempted, so duplicates are plain reads that take no row lock.
/// A row holding a value this store never writes blocks too: it is returned as
/// read, without any write, and reported as corrupt.
fn blocks(fingerprint: &str, max_attempts: &str) -> String {
    format!(
        "(NOT ({}) OR c.expires_at_us > n.now_us AND (\
            (c.fingerprint IS NOT NULL AND {fingerprint} IS NOT NULL AND c.fingerprint <> {fingerprint}) \
            OR c.status <> 0 \
            OR coalesce(c.lease_until_us > n.now_us, FALSE) \
            OR coalesce(c.retry_times >= {max_attempts}, FALSE)))",
        common::sane("c.", false)
    )
}

/// The conditional upsert at the heart of a claim. Rule 1 (no live row) is the insert
/// or the `expires_at_us <= now` branch; rule 5 (Released, or lease run out, within the
/// attempt budget and with a matching fingerprint) is the other branch; every other row
/// is left alone (and returned by the caller's fallback `SELECT`). `EXCLUDED` is the
/// row the claim would insert, so `EXCLUDED.owner_token` is the clock reading.
/// `budget` is the SQL condition "attempts left" on the existing row `r`.
fn takeover(budget: &str) -> String {
    format!(
        "ON CONFLICT (scope, message_id) DO UPDATE SET \
            status = 0, \
            retry_times = CASE WHEN r.expires_at_us <= EXCLUDED.owner_token THEN 1 ELSE r.retry_times + 1 END, \
            owner_token = GREATEST(r.owner_token + 1, EXCLUDED.owner_token), \
            lease_until_us = EXCLUDED.lease_until_us, \
            expires_at_us = CASE WHEN r.expires_at_us <= EXCLUDED.owner_token THEN EXCLUDED.expires_at_us \
                ELSE GREATEST(r.expires_at_us, EXCLUDED.expires_at_us) END, \
            fingerprint = CASE WHEN r.expires_at_us <= EXCLUDED.owner_token THEN EXCLUDED.fingerprint \
                ELSE COALESCE(r.fingerprint, EXCLUDED.fingerprint) END, \
            output = NULL \
        WHERE ({}) AND (r.expires_at_us <= EXCLUDED.owner_token \
           OR (r.status = 0 \
               AND (r.lease_until_us IS NULL OR r.lease_until_us <= EXCLUDED.owner_token) \
               AND (r.fingerprint IS NULL OR EXCLUDED.fingerprint IS NULL OR r.fingerprint = EXCLUDED.fingerprint) \
               AND ({budget})))",
        common::sane("r.", false)
    )
}

impl Statements {
    pub(crate) fn new(table: TableName) -> Self {
        let t = table.quoted('"');
        let owned = format!(
            "scope = $1 AND message_id = $2 AND owner_token = $3 AND status = 0 \
             AND lease_until_us IS NOT NULL AND expires_at_us > n.now_us AND {}",
            common::sane("", false)
        );
        let owned_r = format!(
            "r.scope = b.scope AND r.message_id = b.message_id AND r.owner_token = b.token \
             AND r.status = 0 AND r.lease_until_us IS NOT NULL AND r.expires_at_us > n.now_us \
             AND {}",
            common::sane("r.", false)
        );
        let index = format!("{}_expires_at_us_idx", table.name());
        let mut create = vec![
            sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                 scope VARCHAR(200) NOT NULL, \
                 message_id BYTEA NOT NULL, \
                 status SMALLINT NOT NULL, \
                 retry_times INTEGER NOT NULL, \
                 owner_token BIGINT NOT NULL, \
                 lease_until_us BIGINT, \
                 expires_at_us BIGINT NOT NULL, \
                 fingerprint BYTEA, \
                 output BYTEA, \
                 PRIMARY KEY (scope, message_id))"
            )),
            sql(format!(
                "CREATE INDEX IF NOT EXISTS \"{index}\" ON {t} (expires_at_us)"
            )),
        ];
        create.shrink_to_fit();
        Statements {
            claim: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us), \
                 cur AS MATERIALIZED (\
                    SELECT c.* FROM {t} c WHERE c.scope = $1 AND c.message_id = $2), \
                 up AS (\
                    INSERT INTO {t} AS r (scope, message_id, status, retry_times, owner_token, \
                        lease_until_us, expires_at_us, fingerprint, output) \
                    SELECT $1, $2, 0, 1, n.now_us, n.now_us + $3, n.now_us + $4, $5, NULL FROM n \
                    WHERE NOT EXISTS (SELECT 1 FROM cur c WHERE {}) \
                    {} \
                    RETURNING r.owner_token, r.retry_times::int8 AS retry_times) \
                 SELECT TRUE, up.owner_token, up.retry_times, \
                    NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::bytea, NULL::bytea, \
                    NULL::int8 \
                 FROM up \
                 UNION ALL \
                 SELECT FALSE, NULL::int8, NULL::int8, {VIEW} \
                 FROM cur c, n WHERE NOT EXISTS (SELECT 1 FROM up)",
                blocks("$5::bytea", "$6::int4"),
                takeover("$6::int4 IS NULL OR r.retry_times < $6::int4")
            )),
            claim_batch: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us), \
                 req AS (SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::int8[], $5::bytea[], $6::int4[]) \
                    AS q(scope, message_id, lease_us, keep_us, fingerprint, max_attempts)), \
                 cur AS MATERIALIZED (\
                    SELECT c.*, q.fingerprint AS req_fingerprint, q.max_attempts AS req_max_attempts \
                    FROM {t} c JOIN req q ON c.scope = q.scope AND c.message_id = q.message_id), \
                 up AS (\
                    INSERT INTO {t} AS r (scope, message_id, status, retry_times, owner_token, \
                        lease_until_us, expires_at_us, fingerprint, output) \
                    SELECT q.scope, q.message_id, 0, 1, n.now_us, n.now_us + q.lease_us, \
                        n.now_us + q.keep_us, q.fingerprint, NULL FROM req q, n \
                    WHERE NOT EXISTS (SELECT 1 FROM cur c \
                        WHERE c.scope = q.scope AND c.message_id = q.message_id AND {}) \
                    AND NOT EXISTS (SELECT 1 FROM cur c WHERE NOT ({})) \
                    {} \
                    RETURNING r.scope, r.message_id, r.owner_token, r.retry_times::int8 AS retry_times) \
                 SELECT up.scope, up.message_id, TRUE, up.owner_token, up.retry_times, \
                    NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::bytea, NULL::bytea, \
                    NULL::int8 \
                 FROM up \
                 UNION ALL \
                 SELECT c.scope, c.message_id, FALSE, NULL::int8, NULL::int8, {VIEW} \
                 FROM cur c, n \
                 WHERE NOT EXISTS (SELECT 1 FROM up WHERE up.scope = c.scope AND up.message_id = c.message_id)",
                blocks("c.req_fingerprint", "c.req_max_attempts"),
                // a corrupt row fails the whole batch: nothing is claimed
                common::sane("c.", false),
                takeover(
                    "COALESCE(r.retry_times < (SELECT q.max_attempts FROM req q \
                     WHERE q.scope = r.scope AND q.message_id = r.message_id), TRUE)"
                )
            )),
            complete: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 UPDATE {t} SET status = 1, output = $4, lease_until_us = NULL, \
                    expires_at_us = n.now_us + $5 \
                 FROM n WHERE {owned}"
            )),
            // the rows it completed, then the others as read (the statement's snapshot):
            // a completion not applied is Held when its record is Completed by its own
            // claim, and a corrupt row is an error, all in one round trip
            complete_batch: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us), \
                 b AS (SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::bytea[], $5::int8[]) \
                    AS b(scope, message_id, token, output, ttl_us)), \
                 up AS (\
                    UPDATE {t} AS r SET status = 1, output = b.output, lease_until_us = NULL, \
                        expires_at_us = n.now_us + b.ttl_us \
                    FROM n, b WHERE {owned_r} \
                    RETURNING r.scope, r.message_id, r.owner_token) \
                 SELECT up.scope, up.message_id, up.owner_token, TRUE, \
                    NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::bytea, NULL::bytea, \
                    NULL::int8 \
                 FROM up \
                 UNION ALL \
                 SELECT c.scope, c.message_id, c.owner_token, FALSE, {VIEW} \
                 FROM {t} c, n \
                 WHERE (c.scope, c.message_id) IN (SELECT b.scope, b.message_id FROM b) \
                    AND NOT EXISTS (SELECT 1 FROM up \
                        WHERE up.scope = c.scope AND up.message_id = c.message_id)"
            )),
            release: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 UPDATE {t} SET lease_until_us = NULL FROM n WHERE {owned}"
            )),
            release_batch: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 UPDATE {t} AS r SET lease_until_us = NULL \
                 FROM n, unnest($1::text[], $2::bytea[], $3::int8[]) AS b(scope, message_id, token) \
                 WHERE {owned_r} \
                 RETURNING r.scope, r.message_id, r.owner_token"
            )),
            renew: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 UPDATE {t} SET lease_until_us = n.now_us + $4, \
                    expires_at_us = GREATEST(expires_at_us, n.now_us + $4) \
                 FROM n WHERE {owned}"
            )),
            inspect: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 SELECT {VIEW} FROM {t} c, n WHERE c.scope = $1 AND c.message_id = $2"
            )),
            inspect_batch: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 SELECT c.scope, c.message_id, {VIEW} \
                 FROM {t} c JOIN unnest($1::text[], $2::bytea[]) AS b(scope, message_id) \
                    ON c.scope = b.scope AND c.message_id = b.message_id, n"
            )),
            forget: sql(format!(
                "DELETE FROM {t} WHERE scope = $1 AND message_id = $2"
            )),
            purge: sql(format!(
                "WITH n AS MATERIALIZED (SELECT {NOW_US} AS now_us) \
                 DELETE FROM {t} WHERE (scope, message_id) IN (\
                    SELECT scope, message_id FROM {t}, n WHERE expires_at_us <= n.now_us \
                    LIMIT $1 FOR UPDATE SKIP LOCKED)"
            )),
            create,
            table,
        }
    }
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

impl SqlDatabase for Postgres {
    fn classify(e: &dyn DatabaseError) -> StoreErrorKind {
        match e.code() {
            // transaction rollback (serialization failure, deadlock, …): a retry may succeed
            Some(code) if code.starts_with("40") => StoreErrorKind::Conflict,
            Some(code) => common::classify_sqlstate(&code),
            None => StoreErrorKind::Other,
        }
    }

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // serialization failure, deadlock, lock not available (lock_timeout, NOWAIT)
        matches!(e.code().as_deref(), Some("40001" | "40P01" | "55P03"))
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Binds the `scope`, `message_id` and `owner_token` arrays of a batch step.
fn bind_owned_arrays<'k>(
    q: PgQuery<'_>,
    items: impl Iterator<Item = (&'k RecordKey, Token)> + Clone,
) -> PgQuery<'_> {
    q.bind(items.clone().map(|(k, _)| k.scope()).collect::<Vec<_>>())
        .bind(items.clone().map(|(k, _)| k.key()).collect::<Vec<_>>())
        .bind(items.map(|(_, t)| token_param(t)).collect::<Vec<_>>())
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:5432/db`, TLS with `?sslmode=require`)
    /// with a pool of default size and creates the table `message_idempotent` if it is
    /// missing.
    /// The first connection is opened directly, so a server that refuses it (or a bad
    /// password, an unknown host) is an error at once, with the cause as its source;
    /// the pool's acquire timeout (30 s) applies to later use.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Connects to `url` and uses (and creates if missing) the table `table`, which may
    /// be schema-qualified (`schema.table`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        let op = "connecting to PostgreSQL";
        let options = PgConnectOptions::from_str(url).map_err(Postgres::err(op))?;
        let pool = common::open_pool(PgPoolOptions::new(), options, op).await?;
        let store = PostgresStore::new(pool, table);
        store.migrate().await?;
        store.prepare().await?;
        Ok(store)
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
    /// Touches no schema; a bad name is a [`StoreErrorKind::Rejected`] error.
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
            .bind(self.sql.table.display())
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
            &self.sql.complete,
            &self.sql.release,
            &self.sql.renew,
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
        storable(req.key)?;
        let _slot = self.claims.enter().await;
        for _ in 0..CLAIM_RETRIES {
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
            if let Some(row) = row
                && let Some(outcome) = Self::decode_claim(&row, 0, req)?
            {
                return Ok(outcome);
            }
        }
        Err(common::contended())
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        storable(c.key)?;
        let q = sqlx::query(self.sql.complete.clone()).bind_completion(c);
        let rows = common::execute(&self.pool, q, Postgres::err("complete")).await?;
        self.fence_of(rows, c.key, Some(c.token)).await
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        storable(r.key)?;
        let q = sqlx::query(self.sql.release.clone()).bind_owned(r.key, r.token);
        let rows = common::execute(&self.pool, q, Postgres::err("release")).await?;
        self.fence_of(rows, r.key, None).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        storable(key)?;
        let q = sqlx::query(self.sql.renew.clone())
            .bind_owned(key, token)
            .bind(micros(lease));
        let rows = common::execute(&self.pool, q, Postgres::err("renew")).await?;
        self.fence_of(rows, key, None).await
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        storable(key)?;
        Ok(self.read(key).await?.and_then(RowView::into_record))
    }

    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        storable(key)?;
        let q = sqlx::query(self.sql.forget.clone()).bind_key(key);
        Ok(common::execute(&self.pool, q, Postgres::err("forget")).await? > 0)
    }

    /// Keyset pagination on `(scope, message_id)` with the filter in the `WHERE`
    /// clause.
    async fn scan(
        &self,
        filter: &crate::ScanFilter,
        cursor: Option<&crate::ScanCursor>,
        limit: usize,
    ) -> Result<crate::ScanPage, StoreError> {
        super::scan::scan(&self.pool, &self.table(), filter, cursor, limit).await
    }

    /// One `GROUP BY` statement.
    async fn stats(
        &self,
        scope: Option<&str>,
        poisoned_at: Option<u32>,
    ) -> Result<Vec<crate::ScopeStats>, StoreError> {
        super::scan::stats(&self.pool, &self.table(), scope, poisoned_at).await
    }

    async fn force_release(&self, key: &RecordKey) -> Result<crate::AdminOutcome, StoreError> {
        super::scan::admin(self, &self.pool, &self.table(), key, false).await
    }

    async fn reset_attempts(&self, key: &RecordKey) -> Result<crate::AdminOutcome, StoreError> {
        super::scan::admin(self, &self.pool, &self.table(), key, true).await
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        common::purge_in_batches(|| {
            let q = sqlx::query(self.sql.purge.clone()).bind(PURGE_BATCH);
            common::execute(&self.pool, q, Postgres::err("purge_expired"))
        })
        .await
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        // one statement for the distinct keys; a key repeated within the batch is
        // answered as a second claim of it would be (it cannot be upserted twice in one
        // statement), and a key whose row changed under the statement is asked again
        reqs.iter().try_for_each(|r| storable(r.key))?;
        let _slot = self.claims.enter().await;
        let mut out: Vec<Option<ClaimOutcome>> = vec![None; reqs.len()];
        let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            first.entry(r.key.as_bytes()).or_insert(i);
        }
        let mut pending: Vec<usize> = (0..reqs.len())
            .filter(|&i| first[reqs[i].key.as_bytes()] == i)
            .collect();
        for _ in 0..CLAIM_RETRIES {
            if pending.is_empty() {
                break;
            }
            let rows = sqlx::query(self.sql.claim_batch.clone())
                .bind(
                    pending
                        .iter()
                        .map(|&i| reqs[i].key.scope())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    pending
                        .iter()
                        .map(|&i| reqs[i].key.key())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    pending
                        .iter()
                        .map(|&i| micros(reqs[i].lease))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    pending
                        .iter()
                        .map(|&i| keep_micros(&reqs[i]))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    pending
                        .iter()
                        .map(|&i| reqs[i].fingerprint)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    pending
                        .iter()
                        .map(|&i| {
                            max_attempts_param(&reqs[i])
                                .map(|m| i32::try_from(m).unwrap_or(i32::MAX))
                        })
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&self.pool)
                .await
                .map_err(Postgres::err("claim_batch"))?;
            for row in &rows {
                let scope: String = row.try_get(0).map_err(Postgres::err("claim_batch"))?;
                let id: Vec<u8> = row.try_get(1).map_err(Postgres::err("claim_batch"))?;
                let key = RecordKey::from_encoded(&scope, &id);
                let Some(&i) = first.get(key.as_bytes()) else {
                    return Err(common::corrupt(
                        "claim_batch returned a key it was not asked for".into(),
                    ));
                };
                out[i] = Self::decode_claim(row, 2, &reqs[i])?;
            }
            pending.retain(|&i| out[i].is_none());
        }
        if !pending.is_empty() {
            return Err(common::contended());
        }
        let mut result = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let f = first[r.key.as_bytes()];
            let outcome = if f == i {
                out[i].take().ok_or_else(common::contended)?
            } else {
                repeated(&result[f], r)
            };
            result.push(outcome);
        }
        Ok(result)
    }

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        items.iter().try_for_each(|c| storable(c.key))?;
        let owned = items.iter().map(|c| (c.key, c.token));
        let rows = bind_owned_arrays(sqlx::query(self.sql.complete_batch.clone()), owned.clone())
            .bind(items.iter().map(|c| c.output).collect::<Vec<_>>())
            .bind(items.iter().map(|c| micros(c.ttl)).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await
            .map_err(Postgres::err("complete_batch"))?;
        // the rows not applied, as read: Held when the record is Completed by the
        // item's own claim (an earlier completion whose reply was lost); a corrupt
        // row is an error
        let mut applied = Vec::with_capacity(rows.len());
        let mut seen = HashMap::new();
        for row in rows {
            if row.try_get(3).map_err(Postgres::err("complete_batch"))? {
                applied.push(row);
            } else {
                let key = returned_key(&row)?;
                let view = RowView::decode(&row, 4, key.scope())?;
                seen.insert(key, view);
            }
        }
        let mut out = fences(&applied, owned, true)?;
        for (i, c) in items.iter().enumerate() {
            if out[i] == Fence::Lost && seen.get(c.key).is_some_and(|r| r.completed_by(c.token)) {
                out[i] = Fence::Held;
            }
        }
        Ok(out)
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        items.iter().try_for_each(|r| storable(r.key))?;
        let owned = items.iter().map(|r| (r.key, r.token));
        let rows = bind_owned_arrays(sqlx::query(self.sql.release_batch.clone()), owned.clone())
            .fetch_all(&self.pool)
            .await
            .map_err(Postgres::err("release_batch"))?;
        let out = fences(&rows, owned, false)?;
        if out.contains(&Fence::Lost) {
            // a corrupt row is an error, not a lost claim
            let lost = (0..items.len()).filter(|&i| out[i] == Fence::Lost);
            self.read_many(lost.map(|i| items[i].key)).await?;
        }
        Ok(out)
    }
}

/// Checks that PostgreSQL can store the scope of `key`: its text columns cannot hold
/// a NUL character, so a scope with one is a request the database cannot store
/// ([`StoreErrorKind::Rejected`]).
pub(crate) fn storable(key: &RecordKey) -> Result<(), StoreError> {
    if key.scope().contains('\0') {
        return Err(StoreError::new(
            StoreErrorKind::Rejected,
            format!(
                "the scope {:?} contains a NUL character, which PostgreSQL cannot store in \
                 a text column; use a scope without NUL",
                key.scope()
            ),
        ));
    }
    Ok(())
}

impl PostgresStore {
    /// The row of `key`, checked; `None` when there is none.
    async fn read(&self, key: &RecordKey) -> Result<Option<RowView>, StoreError> {
        let row = sqlx::query(self.sql.inspect.clone())
            .bind_key(key)
            .fetch_all(&self.pool)
            .await
            .map_err(Postgres::err("inspect"))?
            .pop();
        row.map(|r| RowView::decode(&r, 0, key.scope())).transpose()
    }

    /// The rows of `keys`, checked.
    async fn read_many<'k>(
        &self,
        keys: impl Iterator<Item = &'k RecordKey> + Clone,
    ) -> Result<HashMap<RecordKey, RowView>, StoreError> {
        let rows = sqlx::query(self.sql.inspect_batch.clone())
            .bind(keys.clone().map(|k| k.scope()).collect::<Vec<_>>())
            .bind(keys.map(|k| k.key()).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await
            .map_err(Postgres::err("reading a batch"))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in &rows {
            let scope: String = row.try_get(0).map_err(Postgres::err("reading a batch"))?;
            let id: Vec<u8> = row.try_get(1).map_err(Postgres::err("reading a batch"))?;
            let view = RowView::decode(row, 2, &scope)?;
            out.insert(RecordKey::from_encoded(&scope, &id), view);
        }
        Ok(out)
    }

    /// The fence of a compare-and-set write on `key` that matched `rows` rows: when it
    /// matched none, the row is read to tell a corrupt record (an error) from one
    /// another claim owns; a completion (`completed_by`) that finds the record
    /// Completed by its own claim is [`Fence::Held`].
    async fn fence_of(
        &self,
        rows: u64,
        key: &RecordKey,
        completed_by: Option<Token>,
    ) -> Result<Fence, StoreError> {
        if rows > 0 {
            return Ok(Fence::Held);
        }
        let seen = self.read(key).await?;
        Ok(match completed_by {
            Some(token) => common::completion_fence(seen, token),
            None => Fence::Lost,
        })
    }
}

/// The record key of a returned row whose first two columns are `scope, message_id`.
fn returned_key(row: &PgRow) -> Result<RecordKey, StoreError> {
    let scope: String = row.try_get(0).map_err(Postgres::err("reading a batch"))?;
    let id: Vec<u8> = row.try_get(1).map_err(Postgres::err("reading a batch"))?;
    Ok(RecordKey::from_encoded(&scope, &id))
}

/// Maps the rows an `UPDATE … RETURNING scope, message_id, owner_token` changed back
/// onto the items, in order. Each (key, token) was applied once: a repeat in the same
/// batch is [`Fence::Held`] when `repeat_held` (a completion repeated by its own claim
/// finds its record Completed), else [`Fence::Lost`] (a release repeated).
fn fences<'a>(
    rows: &[PgRow],
    items: impl Iterator<Item = (&'a RecordKey, Token)>,
    repeat_held: bool,
) -> Result<Vec<Fence>, StoreError> {
    let mut held: HashMap<(RecordKey, i64), bool> = HashMap::with_capacity(rows.len());
    for row in rows {
        let token: i64 = row.try_get(2).map_err(Postgres::err("reading a batch"))?;
        held.insert((returned_key(row)?, token), false);
    }
    Ok(items
        .map(
            |(key, token)| match held.get_mut(&(key.clone(), token_param(token))) {
                Some(used) if !*used || repeat_held => {
                    *used = true;
                    Fence::Held
                }
                _ => Fence::Lost,
            },
        )
        .collect())
}
