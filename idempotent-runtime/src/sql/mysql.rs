//! [`MySqlStore`]: the dedup table in MySQL 8 or MariaDB 10.11+.

use super::common::{
    self, BindExt, CLAIM_RETRIES, DEFAULT_TABLE, Decision, PURGE_BATCH, Plan, RowView, SqlDatabase,
    TableName, keep_micros, micros, repeated, sql, token_param,
};
use crate::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release, Store, Token,
};
use crate::{RecordKey, StoreError, StoreErrorKind};
use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::mysql::{
    MySql, MySqlArguments, MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions,
};
use sqlx::{Executor, Row, SqlStr};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

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
/// (`claim_procedure` in `sql/mysql.rs`; [`migrate`](Self::migrate) creates it).
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

/// Bytes of cached outputs sent in one batch statement, well below the default
/// `max_allowed_packet` of MariaDB (16 MiB).
const BATCH_BYTES: usize = 4 << 20;

pub(crate) struct Statements {
    table: TableName,
    pub(crate) read: SqlStr,
    pub(crate) insert: SqlStr,
    take_over: SqlStr,
    take_over_expired: SqlStr,
    complete: SqlStr,
    release: SqlStr,
    renew: SqlStr,
    forget: SqlStr,
    purge: SqlStr,
    create: SqlStr,
    /// `CALL <table>_claim_v2(…)`, when the procedure's name fits in an identifier.
    claim_call: Option<SqlStr>,
    /// The `CREATE PROCEDURE` of that procedure.
    claim_procedure: Option<SqlStr>,
}

/// Columns of a row read back (see [`RowView::decode`]).
fn view() -> String {
    format!(
        "CAST(status AS SIGNED), CAST(retry_times AS SIGNED), owner_token, \
         lease_until_us, expires_at_us, fingerprint, output, {NOW_US}"
    )
}

/// Longest identifier MySQL accepts.
const MAX_PROCEDURE_NAME: usize = 64;

/// The claim procedure of `table`: `<table>_claim_v2` in the table's database, quoted;
/// `None` when that name is longer than an identifier may be. The version suffix
/// changes whenever the procedure's parameters or results do, so a store never calls
/// a procedure of another version.
fn claim_procedure_name(table: &TableName) -> Option<String> {
    let name = format!("{}_claim_v2", table.name());
    (name.len() <= MAX_PROCEDURE_NAME).then(|| match table.schema() {
        Some(s) => format!("`{s}`.`{name}`"),
        None => format!("`{name}`"),
    })
}

/// The claim as a stored procedure, so that every claim is one round trip: the same
/// read and conditional writes as the two-statement claim, run on the server. Each
/// statement in it commits on its own (autocommit), exactly as when the client sends
/// them: the read is a plain consistent read (a duplicate takes no lock and writes
/// nothing), the insert fails on a concurrent insert (error 1062, handled: read again)
/// and the takeovers are compare-and-set on the owner token read, with every rule
/// re-checked by the `UPDATE`'s own `WHERE` on the database clock of that statement.
/// A row holding a value this store never writes (see [`common::sane`]) is answered
/// as read, without any write, and reported as corrupt by the caller.
/// Answers one row: `acquired, token, attempt` then the row as read
/// (see [`RowView::decode`]); `acquired = 0` with no row read means the claim kept
/// losing races.
fn claim_procedure(name: &str, t: &str) -> String {
    format!(
        "CREATE PROCEDURE {name} (\
            IN p_scope VARBINARY(200), \
            IN p_id VARBINARY(130), IN p_lease BIGINT, IN p_keep BIGINT, \
            IN p_fp VARBINARY(32), IN p_max BIGINT) \
         MODIFIES SQL DATA SQL SECURITY INVOKER \
         COMMENT 'idempotent: claims one key of the dedup table (MySqlStore)' \
         BEGIN \
            DECLARE v_acquired, v_new_token, v_new_attempt, v_status, v_attempts, v_token, \
                v_lease, v_expires, v_now BIGINT; \
            DECLARE v_fp VARBINARY(32); \
            DECLARE v_out LONGBLOB; \
            DECLARE v_dup, v_tries INT DEFAULT 0; \
            DECLARE CONTINUE HANDLER FOR 1062 SET v_dup = 1; \
            DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_status = NULL; \
            claim: LOOP \
                SET v_tries = v_tries + 1, v_acquired = 0, v_status = NULL, v_dup = 0; \
                SELECT status, retry_times, owner_token, lease_until_us, expires_at_us, \
                    fingerprint, output, {NOW_US} \
                INTO v_status, v_attempts, v_token, v_lease, v_expires, v_fp, v_out, v_now \
                FROM {t} WHERE scope = p_scope AND message_id = p_id; \
                IF v_status IS NULL THEN \
                    INSERT INTO {t} (scope, message_id, status, retry_times, owner_token, \
                        lease_until_us, expires_at_us, fingerprint, output) \
                    VALUES (p_scope, p_id, 0, 1, LAST_INSERT_ID({NOW_US}), {NOW_US} + p_lease, \
                        {NOW_US} + p_keep, p_fp, NULL); \
                    IF v_dup = 0 THEN \
                        SET v_acquired = 1, v_new_token = LAST_INSERT_ID(), v_new_attempt = 1; \
                        LEAVE claim; \
                    END IF; \
                ELSEIF v_status NOT IN (0, 1) OR v_attempts NOT BETWEEN 0 AND {max_attempts} \
                    OR v_token NOT BETWEEN 0 AND {max_token} \
                    OR v_lease NOT BETWEEN 0 AND {max_time} \
                    OR v_expires NOT BETWEEN 0 AND {max_time} THEN \
                    LEAVE claim; \
                ELSEIF v_expires <= v_now THEN \
                    UPDATE {t} SET status = 0, retry_times = 1, \
                        owner_token = LAST_INSERT_ID(GREATEST(owner_token + 1, {NOW_US})), \
                        lease_until_us = {NOW_US} + p_lease, expires_at_us = {NOW_US} + p_keep, \
                        fingerprint = p_fp, output = NULL \
                    WHERE scope = p_scope AND message_id = p_id AND owner_token = v_token \
                        AND expires_at_us <= {NOW_US}; \
                    IF ROW_COUNT() > 0 THEN \
                        SET v_acquired = 1, v_new_token = LAST_INSERT_ID(), v_new_attempt = 1; \
                        LEAVE claim; \
                    END IF; \
                ELSEIF v_status <> 0 \
                    OR (v_fp IS NOT NULL AND p_fp IS NOT NULL AND v_fp <> p_fp) \
                    OR (v_lease IS NOT NULL AND v_lease > v_now) \
                    OR (p_max IS NOT NULL AND v_attempts >= p_max) THEN \
                    LEAVE claim; \
                ELSE \
                    UPDATE {t} SET status = 0, retry_times = retry_times + 1, \
                        owner_token = LAST_INSERT_ID(GREATEST(owner_token + 1, {NOW_US})), \
                        lease_until_us = {NOW_US} + p_lease, \
                        expires_at_us = GREATEST(expires_at_us, {NOW_US} + p_keep), \
                        fingerprint = COALESCE(fingerprint, p_fp), output = NULL \
                    WHERE scope = p_scope AND message_id = p_id AND owner_token = v_token \
                        AND retry_times = v_attempts AND expires_at_us > {NOW_US} AND status = 0 \
                        AND (lease_until_us IS NULL OR lease_until_us <= {NOW_US}); \
                    IF ROW_COUNT() > 0 THEN \
                        SET v_acquired = 1, v_new_token = LAST_INSERT_ID(), \
                            v_new_attempt = v_attempts + 1; \
                        LEAVE claim; \
                    END IF; \
                END IF; \
                IF v_tries >= {CLAIM_RETRIES} THEN \
                    SET v_status = NULL; \
                    LEAVE claim; \
                END IF; \
            END LOOP; \
            SELECT v_acquired, v_new_token, v_new_attempt, v_status, v_attempts, v_token, \
                v_lease, v_expires, v_fp, v_out, v_now; \
         END",
        max_attempts = common::MAX_ATTEMPTS_VALUE,
        max_token = i64::MAX - 1,
        max_time = common::MAX_TIME,
    )
}

/// `n` placeholder rows of `cols` columns as a derived table `b` with the columns
/// named `names` (`SELECT ? AS a, ? AS b UNION ALL SELECT ?, ? …`).
fn derived(n: usize, names: &[&str]) -> String {
    let first: Vec<String> = names.iter().map(|c| format!("? AS {c}")).collect();
    let mut s = format!("(SELECT {}", first.join(", "));
    let rest = vec!["?"; names.len()].join(", ");
    for _ in 1..n {
        s.push_str(" UNION ALL SELECT ");
        s.push_str(&rest);
    }
    s.push_str(") AS b");
    s
}

impl Statements {
    pub(crate) fn new(table: TableName) -> Self {
        let t = table.quoted('`');
        let view = view();
        let procedure = claim_procedure_name(&table);
        let owned = format!(
            "scope = ? AND message_id = ? AND owner_token = ? AND status = 0 \
             AND lease_until_us IS NOT NULL AND expires_at_us > {NOW_US} AND {}",
            common::sane("", false)
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
            claim_call: procedure
                .as_ref()
                .map(|p| sql(format!("CALL {p}(?, ?, ?, ?, ?, ?)"))),
            claim_procedure: procedure.map(|p| sql(claim_procedure(&p, &t))),
            create: sql(format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                 scope VARBINARY(200) NOT NULL, \
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

    /// Makes a claim's conditional write for `plan` on `conn`: answers, inserts an
    /// absent key or takes over the row read, compare-and-set on what was read.
    /// `Ok(None)`: the row changed since the read (a concurrent insert of the key, or
    /// no row matched the take-over); read again. `err` wraps a driver error.
    pub(crate) async fn write_claim<'c>(
        &self,
        conn: impl Executor<'c, Database = MySql>,
        req: &ClaimRequest<'_>,
        plan: Plan,
        err: impl FnOnce(sqlx::Error) -> StoreError,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let take_over = |stmt: &SqlStr, token: i64| {
            sqlx::query(stmt.clone())
                .bind(micros(req.lease))
                .bind(keep_micros(req))
                .bind(req.fingerprint)
                .bind_key(req.key)
                .bind(token)
        };
        let (q, attempt) = match plan {
            Plan::Answer(outcome) => return Ok(Some(outcome)),
            Plan::Insert => (sqlx::query(self.insert.clone()).bind_claim(req), 1),
            Plan::TakeOverExpired { token } => (take_over(&self.take_over_expired, token), 1),
            Plan::TakeOver { token, attempts } => (
                take_over(&self.take_over, token).bind(attempts),
                u32::try_from(attempts.saturating_add(1)).unwrap_or(u32::MAX),
            ),
        };
        match q.execute(conn).await {
            Ok(done) if done.rows_affected() > 0 => Ok(Some(ClaimOutcome::Acquired {
                token: Token(done.last_insert_id()),
                attempt,
            })),
            Ok(_) => Ok(None),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// The completion `c`: `output, ttl_us` come before the record it owns.
    pub(crate) fn complete_query(&self, c: &Completion<'_>) -> MySqlQuery<'static> {
        sqlx::query(self.complete.clone())
            .bind(c.output)
            .bind(micros(c.ttl))
            .bind_owned(c.key, c.token)
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

    /// Inserts `n` absent keys in one statement; a duplicate key fails it as a whole.
    /// Every row gets the same token, the statement's clock reading, returned in the
    /// OK packet.
    fn insert_many(&self, n: usize) -> SqlStr {
        let t = self.table.quoted('`');
        let mut rows = format!(
            "(?, ?, 0, 1, LAST_INSERT_ID({NOW_US}), {NOW_US} + ?, {NOW_US} + ?, ?, NULL), "
        )
        .repeat(n);
        rows.truncate(rows.len().saturating_sub(2));
        sql(format!(
            "INSERT INTO {t} (scope, message_id, status, retry_times, owner_token, \
                lease_until_us, expires_at_us, fingerprint, output) VALUES {rows}"
        ))
    }

    /// Completes `n` distinct keys in one statement, compare-and-set on each token.
    fn complete_many(&self, n: usize) -> SqlStr {
        let t = self.table.quoted('`');
        sql(format!(
            "UPDATE {t} AS r JOIN {} ON r.scope = b.scope AND r.message_id = b.message_id \
                AND r.owner_token = b.token \
             SET r.status = 1, r.output = b.output, r.lease_until_us = NULL, \
                r.expires_at_us = {NOW_US} + b.ttl_us \
             WHERE r.status = 0 AND r.lease_until_us IS NOT NULL AND r.expires_at_us > {NOW_US} \
                AND {}",
            derived(n, &["scope", "message_id", "token", "output", "ttl_us"]),
            common::sane("r.", false)
        ))
    }

    /// Releases `n` distinct keys in one statement, compare-and-set on each token.
    fn release_many(&self, n: usize) -> SqlStr {
        let t = self.table.quoted('`');
        sql(format!(
            "UPDATE {t} AS r JOIN {} ON r.scope = b.scope AND r.message_id = b.message_id \
                AND r.owner_token = b.token \
             SET r.lease_until_us = NULL \
             WHERE r.status = 0 AND r.lease_until_us IS NOT NULL AND r.expires_at_us > {NOW_US} \
                AND {}",
            derived(n, &["scope", "message_id", "token"]),
            common::sane("r.", false)
        ))
    }
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

impl SqlDatabase for MySql {
    fn classify(e: &dyn DatabaseError) -> StoreErrorKind {
        if let Some(my) = e.try_downcast_ref::<MySqlDatabaseError>() {
            match my.number() {
                // no such table / column, access denied, syntax, unknown database
                1044 | 1045 | 1049 | 1054 | 1064 | 1142 | 1143 | 1146 => {
                    return StoreErrorKind::Rejected;
                }
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

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        // the connection sets CLIENT_FOUND_ROWS: rows matched, not rows changed
        done.rows_affected()
    }

    const SCOPE_AS_BYTES: bool = true;

    fn conflict(e: &dyn DatabaseError) -> bool {
        // 1213 deadlock, 1205 lock wait timeout, 1020 record changed since the
        // snapshot (MariaDB's snapshot isolation), 3572 NOWAIT lock not granted
        e.try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|my| matches!(my.number(), 1213 | 1205 | 1020 | 3572))
            || e.code().as_deref() == Some("40001")
    }
}

pub(crate) type MySqlQuery<'q> = sqlx::query::Query<'q, MySql, MySqlArguments>;

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
    /// the pool's acquire timeout (30 s) applies to later use.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Connects to `url` and uses (and creates if missing) the table `table`, which may
    /// be qualified by a database name (`db.table`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        let op = "connecting to MySQL";
        let options = MySqlConnectOptions::from_str(url).map_err(MySql::err(op))?;
        let pool = common::open_pool(MySqlPoolOptions::new(), options, op).await?;
        let store = MySqlStore::new(pool, table);
        store.migrate().await?;
        Ok(store)
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
        .bind(self.sql.table.schema())
        .bind(self.sql.table.name())
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
        .bind(self.sql.table.schema())
        .bind(self.sql.table.name())
        .fetch_optional(&mut *conn)
        .await
        .map_err(MySql::err(op))?;
        if scope_type.is_some_and(|t| !t.eq_ignore_ascii_case("varbinary")) {
            let t = self.sql.table.quoted('`');
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
            .bind_key(key)
            .fetch_all(&self.pool)
            .await
            .map_err(MySql::err("reading a record"))?
            .pop();
        row.map(|r| RowView::decode(&r, 0, key.scope())).transpose()
    }

    /// The fence of a compare-and-set write on `key` that matched `rows` rows: when it
    /// matched none, the row is read to tell a corrupt record (an error) from one
    /// another claim owns; `completed` is what a completion that finds the record
    /// Completed by its own claim answers.
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
        let q = self.sql.complete_query(c);
        let rows = common::execute(&self.pool, q, MySql::err("complete")).await?;
        self.fence_of(rows, c.key, Some(c.token)).await
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        let q = sqlx::query(self.sql.release.clone()).bind_owned(r.key, r.token);
        let rows = common::execute(&self.pool, q, MySql::err("release")).await?;
        self.fence_of(rows, r.key, None).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        let q = sqlx::query(self.sql.renew.clone())
            .bind(micros(lease))
            .bind(micros(lease))
            .bind_owned(key, token);
        let rows = common::execute(&self.pool, q, MySql::err("renew")).await?;
        self.fence_of(rows, key, None).await
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        Ok(self.read(key).await?.and_then(RowView::into_record))
    }

    async fn forget(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let q = sqlx::query(self.sql.forget.clone()).bind_key(key);
        Ok(common::execute(&self.pool, q, MySql::err("forget")).await? > 0)
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
            common::execute(&self.pool, q, MySql::err("purge_expired"))
        })
        .await
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
                q = q.bind_key(reqs[i].key);
            }
            let rows = q
                .fetch_all(&self.pool)
                .await
                .map_err(MySql::err("claim_batch"))?;
            for row in &rows {
                let key = row_key(row)?;
                let view = RowView::decode(row, 2, key.scope())?;
                seen.insert(key, view);
            }
        }
        // the keys no row was read for are inserted together: one statement per chunk,
        // which a concurrent insert of any of them fails as a whole (nothing is
        // written; those keys then go the single-key way)
        let mut inserted: HashMap<usize, Token> = HashMap::new();
        let absent: Vec<usize> = distinct
            .iter()
            .copied()
            .filter(|&i| !seen.contains_key(reqs[i].key))
            .collect();
        for chunk in absent.chunks(BATCH_READ) {
            let mut q = sqlx::query(self.sql.insert_many(chunk.len()));
            for &i in chunk {
                q = q.bind_claim(&reqs[i]);
            }
            match q.execute(&self.pool).await {
                Ok(done) => {
                    for &i in chunk {
                        inserted.insert(i, Token(done.last_insert_id()));
                    }
                }
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {}
                Err(e) => return Err(MySql::err("claim_batch")(e)),
            }
        }
        let mut out: Vec<ClaimOutcome> = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            let f = first[req.key.as_bytes()];
            let outcome = if f != i {
                repeated(&out[f], req)
            } else if let Some(&token) = inserted.get(&i) {
                ClaimOutcome::Acquired { token, attempt: 1 }
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

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        let mut out = vec![Fence::Lost; items.len()];
        let (distinct, repeats) = distinct_keys(items.iter().map(|c| c.key));
        for chunk in chunks_by_bytes(&distinct, |&i| items[i].output.map_or(0, <[u8]>::len)) {
            let mut q = sqlx::query(self.sql.complete_many(chunk.len()));
            for &i in chunk {
                q = q.bind_completion(&items[i]);
            }
            let done = q
                .execute(&self.pool)
                .await
                .map_err(MySql::err("complete_batch"))?;
            if done.rows_affected() == chunk.len() as u64 {
                chunk.iter().for_each(|&i| out[i] = Fence::Held);
            } else {
                // some were not owned any more: the rows Completed by the item's own
                // claim were completed by this statement or by an earlier completion
                // whose reply was lost; any other row is Lost (or, if it is corrupt,
                // an error)
                let rows = self.states(chunk.iter().map(|&i| items[i].key)).await?;
                for &i in chunk {
                    let c = &items[i];
                    if rows.get(c.key).is_some_and(|r| r.completed_by(c.token)) {
                        out[i] = Fence::Held;
                    }
                }
            }
        }
        // a key repeated in the batch: what a completion right after the first would get
        for i in repeats {
            out[i] = self.complete(&items[i]).await?;
        }
        Ok(out)
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        let mut out = vec![Fence::Lost; items.len()];
        let (distinct, repeats) = distinct_keys(items.iter().map(|r| r.key));
        for chunk in distinct.chunks(BATCH_READ) {
            let mut q = sqlx::query(self.sql.release_many(chunk.len()));
            for &i in chunk {
                q = q.bind_owned(items[i].key, items[i].token);
            }
            let done = q
                .execute(&self.pool)
                .await
                .map_err(MySql::err("release_batch"))?;
            if done.rows_affected() == chunk.len() as u64 {
                chunk.iter().for_each(|&i| out[i] = Fence::Held);
            } else {
                // some were not owned any more: a released row still carries its
                // owner's token (a release repeated by the same owner reads as Held);
                // a corrupt row is an error
                let rows = self.states(chunk.iter().map(|&i| items[i].key)).await?;
                for &i in chunk {
                    let r = &items[i];
                    if let Some(s) = rows.get(r.key)
                        && s.state == RecordState::Released
                        && s.token == token_param(r.token)
                        && s.expires_left > 0
                    {
                        out[i] = Fence::Held;
                    }
                }
            }
        }
        for i in repeats {
            out[i] = self.release(&items[i]).await?;
        }
        Ok(out)
    }
}

impl MySqlStore {
    /// Reads back the rows of `keys` after a batch step that did not apply to all of
    /// them.
    async fn states<'k>(
        &self,
        keys: impl ExactSizeIterator<Item = &'k RecordKey>,
    ) -> Result<HashMap<RecordKey, RowView>, StoreError> {
        let mut q = sqlx::query(self.sql.read_many(keys.len()));
        for k in keys {
            q = q.bind_key(k);
        }
        let rows = q
            .fetch_all(&self.pool)
            .await
            .map_err(MySql::err("reading a batch"))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in &rows {
            let key = row_key(row)?;
            let view = RowView::decode(row, 2, key.scope())?;
            out.insert(key, view);
        }
        Ok(out)
    }
}

/// The record key of a row whose first two columns are `scope, message_id`.
fn row_key(row: &sqlx::mysql::MySqlRow) -> Result<RecordKey, StoreError> {
    let scope: Vec<u8> = row.try_get(0).map_err(MySql::err("reading a batch"))?;
    let id: Vec<u8> = row.try_get(1).map_err(MySql::err("reading a batch"))?;
    let scope = String::from_utf8(scope).map_err(|e| {
        StoreError::with_source(StoreErrorKind::Corrupt, "a record's scope is not UTF-8", e)
    })?;
    Ok(RecordKey::from_encoded(&scope, &id))
}

/// Splits item indexes into the first occurrence of each key and the later ones.
fn distinct_keys<'k>(keys: impl Iterator<Item = &'k RecordKey>) -> (Vec<usize>, Vec<usize>) {
    let mut seen: HashMap<&[u8], ()> = HashMap::new();
    let (mut distinct, mut repeats) = (Vec::new(), Vec::new());
    for (i, k) in keys.enumerate() {
        if seen.insert(k.as_bytes(), ()).is_none() {
            distinct.push(i);
        } else {
            repeats.push(i);
        }
    }
    (distinct, repeats)
}

/// Chunks of at most [`BATCH_READ`] items and about [`BATCH_BYTES`] of outputs each.
fn chunks_by_bytes<'a>(
    items: &'a [usize],
    bytes: impl Fn(&usize) -> usize + 'a,
) -> impl Iterator<Item = &'a [usize]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut n = 0;
        let mut total = 0;
        while n < rest.len() && n < BATCH_READ && (n == 0 || total + bytes(&rest[n]) <= BATCH_BYTES)
        {
            total += bytes(&rest[n]);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}
