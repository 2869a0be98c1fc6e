//! [`MySqlStore`]: the dedup table in MySQL 8 or MariaDB 10.11+.

use super::common::{
    self, CLAIM_RETRIES, DEFAULT_TABLE, Decision, PURGE_BATCH, RowView, TableName, keep_micros,
    micros, repeated, token_param,
};
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence, Record, Release, Store, Token};
use crate::{RecordKey, StoreError, StoreErrorKind};
use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::mysql::{MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Row, SqlStr};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The database clock in microseconds since the Unix epoch. `UTC_TIMESTAMP(6)` is read
/// once per statement, so every use within one statement sees the same instant, and it
/// does not depend on the session time zone.
const NOW_US: &str = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";

/// Keys read per statement by `claim_batch`.
const BATCH_READ: usize = 500;

/// A dedup store in MySQL 8 or MariaDB 10.11+, feature `mysql`.
///
/// MySQL has no `RETURNING`, so a claim reads first and writes only when it must:
///
/// 1. `SELECT` the row (a plain consistent read, no lock). A completed key (the
///    duplicate case), a live claim, an exhausted or mismatched key is answered right
///    there: **one round trip**.
/// 2. Otherwise one conditional write, atomic on the server: an `INSERT` for an absent
///    key, or an `UPDATE … WHERE owner_token = <token read> AND <still claimable>` that
///    takes over a released, lapsed or expired row (compare-and-set on what step 1
///    saw). The new token comes back in the OK packet through `LAST_INSERT_ID(expr)`.
///    A first delivery therefore costs **two round trips**. If the row changed in
///    between (a duplicate-key error, or the `UPDATE` matched no row), the claim
///    starts over from step 1; no decision is ever taken on data that is not
///    re-checked by the write itself.
///
/// Complete, release and renew are one `UPDATE` each (one round trip), compare-and-set
/// on the owner token. Lease and expiry decisions use `UTC_TIMESTAMP(6)` on the server,
/// never the client's clock.
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
///     scope          VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
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
/// Times are microseconds since the Unix epoch by the database clock
/// (`FROM_UNIXTIME(expires_at_us / 1e6)` shows them as timestamps). The record states
/// map onto the columns as: **In progress** `status = 0` with a lease deadline;
/// **Released** (the last attempt failed, claimable again) `status = 0` with
/// `lease_until_us IS NULL`; **Completed** `status = 1`. A row whose `expires_at_us`
/// has passed counts as absent and is deleted by [`purge_expired`](Store::purge_expired).
#[derive(Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    sql: Arc<Statements>,
    claims: common::ClaimGate,
}

pub(crate) struct Statements {
    table: TableName,
    pub(crate) read: SqlStr,
    pub(crate) insert: SqlStr,
    pub(crate) take_over: SqlStr,
    pub(crate) take_over_expired: SqlStr,
    pub(crate) complete: SqlStr,
    release: SqlStr,
    renew: SqlStr,
    forget: SqlStr,
    purge: SqlStr,
    create: SqlStr,
}

pub(crate) fn sql(s: String) -> SqlStr {
    // every statement is built from constant text and a validated, quoted table name;
    // all values are bound parameters
    sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(Arc::<str>::from(s)))
}

/// Columns of a row read back (see [`RowView::decode`]).
fn view() -> String {
    format!(
        "CAST(status AS SIGNED), CAST(retry_times AS SIGNED), owner_token, \
         lease_until_us - {NOW_US}, expires_at_us - {NOW_US}, fingerprint, output"
    )
}

impl Statements {
    pub(crate) fn new(table: TableName) -> Self {
        let t = table.quoted('`');
        let view = view();
        let owned = format!(
            "scope = ? AND message_id = ? AND owner_token = ? AND status = 0 \
             AND lease_until_us IS NOT NULL AND expires_at_us > {NOW_US}"
        );
        Statements {
            read: sql(format!(
                "SELECT {view} FROM {t} WHERE scope = ? AND message_id = ?"
            )),
            insert: sql(format!(
                "INSERT INTO {t} (scope, message_id, status, retry_times, owner_token, \
                    lease_until_us, expires_at_us, fingerprint, output) \
                 VALUES (?, ?, 0, 1, LAST_INSERT_ID({NOW_US}), {NOW_US} + ?, {NOW_US} + ?, ?, NULL)"
            )),
            // assignments run left to right and see earlier ones, so none of them reads a
            // column assigned before it
            take_over: sql(format!(
                "UPDATE {t} SET status = 0, retry_times = retry_times + 1, \
                    owner_token = LAST_INSERT_ID(GREATEST(owner_token + 1, {NOW_US})), \
                    lease_until_us = {NOW_US} + ?, \
                    expires_at_us = GREATEST(expires_at_us, {NOW_US} + ?), \
                    fingerprint = COALESCE(fingerprint, ?), output = NULL \
                 WHERE scope = ? AND message_id = ? AND owner_token = ? AND retry_times = ? \
                    AND expires_at_us > {NOW_US} AND status = 0 \
                    AND (lease_until_us IS NULL OR lease_until_us <= {NOW_US})"
            )),
            take_over_expired: sql(format!(
                "UPDATE {t} SET status = 0, retry_times = 1, \
                    owner_token = LAST_INSERT_ID(GREATEST(owner_token + 1, {NOW_US})), \
                    lease_until_us = {NOW_US} + ?, expires_at_us = {NOW_US} + ?, \
                    fingerprint = ?, output = NULL \
                 WHERE scope = ? AND message_id = ? AND owner_token = ? \
                    AND expires_at_us <= {NOW_US}"
            )),
            complete: sql(format!(
                "UPDATE {t} SET status = 1, output = ?, lease_until_us = NULL, \
                    expires_at_us = {NOW_US} + ? \
                 WHERE {owned}"
            )),
            release: sql(format!(
                "UPDATE {t} SET lease_until_us = NULL WHERE {owned}"
            )),
            renew: sql(format!(
                "UPDATE {t} SET lease_until_us = {NOW_US} + ?, \
                    expires_at_us = GREATEST(expires_at_us, {NOW_US} + ?) \
                 WHERE {owned}"
            )),
            forget: sql(format!(
                "DELETE FROM {t} WHERE scope = ? AND message_id = ?"
            )),
            purge: sql(format!(
                "DELETE FROM {t} WHERE expires_at_us <= {NOW_US} ORDER BY expires_at_us LIMIT ?"
            )),
            create: sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                 scope VARCHAR(200) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, \
                 message_id VARBINARY(130) NOT NULL, \
                 status TINYINT NOT NULL, \
                 retry_times INT NOT NULL, \
                 owner_token BIGINT NOT NULL, \
                 lease_until_us BIGINT NULL, \
                 expires_at_us BIGINT NOT NULL, \
                 fingerprint VARBINARY(32) NULL, \
                 output LONGBLOB NULL, \
                 PRIMARY KEY (scope, message_id), \
                 KEY expires_at_us_idx (expires_at_us)) ENGINE = InnoDB"
            )),
            table,
        }
    }

    fn read_many(&self, n: usize) -> SqlStr {
        let t = self.table.quoted('`');
        let mut tuples = "(?, ?), ".repeat(n);
        tuples.truncate(tuples.len().saturating_sub(2));
        sql(format!(
            "SELECT scope, message_id, {} FROM {t} WHERE (scope, message_id) IN ({tuples})",
            view()
        ))
    }
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.sql.table)
            .field("pool", &self.pool)
            .finish()
    }
}

pub(crate) fn classify(e: &dyn DatabaseError) -> StoreErrorKind {
    if let Some(my) = e.try_downcast_ref::<MySqlDatabaseError>() {
        match my.number() {
            // no such table / column, access denied, syntax, unknown database
            1044 | 1045 | 1049 | 1054 | 1064 | 1142 | 1143 | 1146 => {
                return StoreErrorKind::Rejected;
            }
            // lock wait timeout, deadlock: a retry may succeed
            1205 | 1213 => return StoreErrorKind::Other,
            // too many connections, shutdown, killed, interrupted, read-only during failover
            1040 | 1053 | 1317 | 1290 | 1792 | 1836 | 1927 | 2006 | 2013 => {
                return StoreErrorKind::Unavailable;
            }
            // value too long, out of range, incorrect value
            1264 | 1366 | 1406 => return StoreErrorKind::Corrupt,
            _ => {}
        }
    }
    match e.code() {
        Some(code) => common::classify_sqlstate(&code),
        None => StoreErrorKind::Other,
    }
}

fn err(op: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| common::sql_error(op, e, classify)
}

fn fence(rows: u64) -> Fence {
    // the connection sets CLIENT_FOUND_ROWS: rows matched, not rows changed
    if rows > 0 { Fence::Held } else { Fence::Lost }
}

impl MySqlStore {
    /// Connects to `url` (`mysql://user:password@host:3306/db`, TLS with
    /// `?ssl-mode=required`) with a pool of default size and creates the table
    /// `message_idempotent` if it is missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Connects to `url` and uses (and creates if missing) the table `table`, which may
    /// be qualified by a database name (`db.table`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        let pool = MySqlPoolOptions::new()
            .connect(url)
            .await
            .map_err(err("connecting to MySQL"))?;
        let store = MySqlStore::new(pool, table);
        store.migrate().await?;
        Ok(store)
    }

    fn new(pool: MySqlPool, table: TableName) -> Self {
        MySqlStore {
            claims: common::ClaimGate::for_pool_size(pool.options().get_max_connections()),
            pool,
            sql: Arc::new(Statements::new(table)),
        }
    }

    /// Uses the application's pool; the table `message_idempotent` must exist (call
    /// [`migrate`](Self::migrate) or create it by hand). Touches no schema.
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
        })
    }

    /// Creates the table (with its expiry index) if it is missing.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(self.sql.create.clone())
            .execute(&self.pool)
            .await
            .map_err(err("creating the dedup table"))?;
        Ok(())
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The table name, as given.
    pub fn table(&self) -> String {
        self.sql.table.display()
    }

    /// Spawns a task that deletes expired records every `every`
    /// (see [`purge_expired`](Store::purge_expired)); abort the returned handle to stop
    /// it. Fails outside a Tokio runtime.
    pub fn spawn_sweeper(
        &self,
        every: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        common::spawn_sweeper(self.clone(), every)
    }

    async fn claim_unguarded(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..CLAIM_RETRIES {
            let seen = self.read(req.key).await?;
            if let Some(outcome) = self.act(req, seen).await? {
                return Ok(outcome);
            }
        }
        Err(common::contended())
    }

    async fn read(&self, key: &RecordKey) -> Result<Option<RowView>, StoreError> {
        let row = sqlx::query(self.sql.read.clone())
            .bind(key.scope())
            .bind(key.key())
            .fetch_all(&self.pool)
            .await
            .map_err(err("reading a record"))?
            .pop();
        row.map(|r| RowView::decode(&r, 0)).transpose()
    }

    /// Acts on what a read saw: answers, or tries the one conditional write.
    /// `Ok(None)`: the row changed since the read; read again.
    async fn act(
        &self,
        req: &ClaimRequest<'_>,
        seen: Option<RowView>,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let Some(seen) = seen else {
            let done = sqlx::query(self.sql.insert.clone())
                .bind(req.key.scope())
                .bind(req.key.key())
                .bind(micros(req.lease))
                .bind(keep_micros(req))
                .bind(req.fingerprint)
                .execute(&self.pool)
                .await;
            return match done {
                Ok(done) => Ok(Some(ClaimOutcome::Acquired {
                    token: Token(done.last_insert_id()),
                    attempt: 1,
                })),
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Ok(None),
                Err(e) => Err(err("claim")(e)),
            };
        };
        let seen_token = seen.token;
        let seen_attempts = seen.attempts;
        let (done, attempt) = match seen.decide(req)? {
            Decision::Answer(outcome) => return Ok(Some(outcome)),
            Decision::Claimable { expired: true } => {
                let done = sqlx::query(self.sql.take_over_expired.clone())
                    .bind(micros(req.lease))
                    .bind(keep_micros(req))
                    .bind(req.fingerprint)
                    .bind(req.key.scope())
                    .bind(req.key.key())
                    .bind(seen_token)
                    .execute(&self.pool)
                    .await;
                (done, 1)
            }
            Decision::Claimable { expired: false } => {
                let done = sqlx::query(self.sql.take_over.clone())
                    .bind(micros(req.lease))
                    .bind(keep_micros(req))
                    .bind(req.fingerprint)
                    .bind(req.key.scope())
                    .bind(req.key.key())
                    .bind(seen_token)
                    .bind(seen_attempts)
                    .execute(&self.pool)
                    .await;
                (done, common::attempts(seen_attempts)?.saturating_add(1))
            }
        };
        let done = done.map_err(err("claim"))?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(Some(ClaimOutcome::Acquired {
            token: Token(done.last_insert_id()),
            attempt,
        }))
    }
}

#[async_trait]
impl Store for MySqlStore {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        let _slot = self.claims.enter().await;
        self.claim_unguarded(req).await
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        let done = sqlx::query(self.sql.complete.clone())
            .bind(c.output)
            .bind(micros(c.ttl))
            .bind(c.key.scope())
            .bind(c.key.key())
            .bind(token_param(c.token))
            .execute(&self.pool)
            .await
            .map_err(err("complete"))?;
        Ok(fence(done.rows_affected()))
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        let done = sqlx::query(self.sql.release.clone())
            .bind(r.key.scope())
            .bind(r.key.key())
            .bind(token_param(r.token))
            .execute(&self.pool)
            .await
            .map_err(err("release"))?;
        Ok(fence(done.rows_affected()))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let done = sqlx::query(self.sql.renew.clone())
            .bind(micros(lease))
            .bind(micros(lease))
            .bind(key.scope())
            .bind(key.key())
            .bind(token_param(token))
            .execute(&self.pool)
            .await
            .map_err(err("renew"))?;
        Ok(fence(done.rows_affected()))
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        match self.read(key).await? {
            Some(row) => row.into_record(),
            None => Ok(None),
        }
    }

    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql.forget.clone())
            .bind(key.scope())
            .bind(key.key())
            .execute(&self.pool)
            .await
            .map_err(err("forget"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let done = sqlx::query(self.sql.purge.clone())
                .bind(PURGE_BATCH)
                .execute(&self.pool)
                .await
                .map_err(err("purge_expired"))?;
            total += done.rows_affected();
            if done.rows_affected() < PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        // one read for up to BATCH_READ distinct keys answers every duplicate, live claim
        // and poisoned key; only the keys that must be written cost a round trip each
        let _slot = self.claims.enter().await;
        let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            first.entry(r.key.as_bytes()).or_insert(i);
        }
        let distinct: Vec<usize> = (0..reqs.len())
            .filter(|&i| first[reqs[i].key.as_bytes()] == i)
            .collect();
        let mut seen: HashMap<RecordKey, RowView> = HashMap::new();
        for chunk in distinct.chunks(BATCH_READ) {
            let mut q = sqlx::query(self.sql.read_many(chunk.len()));
            for &i in chunk {
                q = q.bind(reqs[i].key.scope()).bind(reqs[i].key.key());
            }
            let rows = q.fetch_all(&self.pool).await.map_err(err("claim_batch"))?;
            for row in &rows {
                let scope: String = row.try_get(0).map_err(err("claim_batch"))?;
                let id: Vec<u8> = row.try_get(1).map_err(err("claim_batch"))?;
                seen.insert(
                    RecordKey::from_encoded(&scope, &id),
                    RowView::decode(row, 2)?,
                );
            }
        }
        let mut out: Vec<ClaimOutcome> = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            let f = first[req.key.as_bytes()];
            let outcome = if f != i {
                repeated(&out[f], req)
            } else {
                match self.act(req, seen.remove(req.key)).await? {
                    Some(outcome) => outcome,
                    None => self.claim_unguarded(req).await?,
                }
            };
            out.push(outcome);
        }
        Ok(out)
    }
}
