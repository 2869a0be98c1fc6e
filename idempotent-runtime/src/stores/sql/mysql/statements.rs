//! The SQL of [`MySqlStore`](super::MySqlStore): the table, the claim procedure and every
//! statement of the protocol, built once per table.

use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest, Token};
use crate::stores::sql::common::{
    self, BindExt, CLAIM_RETRIES, Plan, PlanSql, SqlDialect, StepSql, TableName, keep_micros,
    micros, sql,
};
use sqlx::mysql::{MySql, MySqlArguments};
use sqlx::{Executor, SqlStr};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// The database clock, as every statement reads it.
const NOW_US: &str = MySql::NOW_US;

/// The statements of one table, built once: every value in them is a bound parameter.
pub(crate) struct Statements {
    /// The statements of the steps every store shares.
    pub(crate) steps: StepSql,
    /// The conditional writes of the two-statement claim.
    pub(crate) plans: PlanSql,
    pub(crate) create: SqlStr,
    /// `CALL <table>_claim_v2(…)`, when the procedure's name fits in an identifier.
    pub(crate) claim_call: Option<SqlStr>,
    /// The `CREATE PROCEDURE` of that procedure.
    pub(crate) claim_procedure: Option<SqlStr>,
    /// Whether claims call that procedure.
    pub(crate) procedure: ProcedureState,
}

/// Whether claims call the claim procedure: they do until a call finds it missing
/// (or not executable); then the two-statement claim is used for
/// [`PROCEDURE_RETRY`], after which the procedure is tried again.
pub(crate) struct ProcedureState {
    since: Instant,
    /// Milliseconds after `since` before which the procedure is not called.
    skip_until_ms: AtomicU64,
}

/// How long claims do without a missing claim procedure before looking again.
const PROCEDURE_RETRY: Duration = Duration::from_secs(30);

impl ProcedureState {
    fn new() -> Self {
        ProcedureState {
            since: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn usable(&self) -> bool {
        let skip = self.skip_until_ms.load(AtomicOrdering::Relaxed);
        skip == 0 || self.now_ms() >= skip
    }

    pub(crate) fn missing(&self) {
        let until = self
            .now_ms()
            .saturating_add(PROCEDURE_RETRY.as_millis() as u64);
        self.skip_until_ms
            .store(until.max(1), AtomicOrdering::Relaxed);
    }

    pub(crate) fn present(&self) {
        self.skip_until_ms.store(0, AtomicOrdering::Relaxed);
    }
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
/// (see [`RowView::decode`](crate::stores::sql::common::RowView::decode)); `acquired = 0` with no row read means the claim kept
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
        let t = table.quoted(MySql::QUOTE);
        let procedure = claim_procedure_name(&table);
        let plans = PlanSql {
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
        };
        Statements {
            plans,
            claim_call: procedure
                .as_ref()
                .map(|p| sql(format!("CALL {p}(?, ?, ?, ?, ?, ?)"))),
            claim_procedure: procedure.map(|p| sql(claim_procedure(&p, &t))),
            procedure: ProcedureState::new(),
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
            steps: StepSql::new::<MySql>(table),
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
            Plan::Insert => (sqlx::query(self.plans.insert.clone()).bind_claim(req), 1),
            Plan::TakeOverExpired { token } => (take_over(&self.plans.take_over_expired, token), 1),
            Plan::TakeOver { token, attempts } => (
                take_over(&self.plans.take_over, token).bind(attempts),
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

    pub(crate) fn read_many(&self, n: usize) -> SqlStr {
        let t = self.steps.table.quoted(MySql::QUOTE);
        let mut tuples = "(?, ?), ".repeat(n);
        tuples.truncate(tuples.len().saturating_sub(2));
        sql(format!(
            "SELECT scope, message_id, {} FROM {t} WHERE (scope, message_id) IN ({tuples})",
            MySql::view("")
        ))
    }

    /// Inserts `n` absent keys in one statement; a duplicate key fails it as a whole.
    /// Every row gets the same token, the statement's clock reading, returned in the
    /// OK packet.
    pub(crate) fn insert_many(&self, n: usize) -> SqlStr {
        let t = self.steps.table.quoted(MySql::QUOTE);
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

    /// Completes (`completes`), or releases, `n` distinct keys in one statement,
    /// compare-and-set on each token.
    pub(crate) fn owned_many(&self, completes: bool, n: usize) -> SqlStr {
        if completes {
            self.complete_many(n)
        } else {
            self.release_many(n)
        }
    }

    /// Completes `n` distinct keys in one statement, compare-and-set on each token.
    fn complete_many(&self, n: usize) -> SqlStr {
        let t = self.steps.table.quoted(MySql::QUOTE);
        sql(format!(
            "UPDATE {t} AS r JOIN {} ON r.scope = b.scope AND r.message_id = b.message_id \
                AND r.owner_token = b.token \
             SET r.status = 1, r.output = b.output, r.lease_until_us = NULL, \
                r.expires_at_us = {NOW_US} + b.ttl_us \
             WHERE {}",
            derived(n, &["scope", "message_id", "token", "output", "ttl_us"]),
            MySql::held("r.")
        ))
    }

    /// Releases `n` distinct keys in one statement, compare-and-set on each token.
    fn release_many(&self, n: usize) -> SqlStr {
        let t = self.steps.table.quoted(MySql::QUOTE);
        sql(format!(
            "UPDATE {t} AS r JOIN {} ON r.scope = b.scope AND r.message_id = b.message_id \
                AND r.owner_token = b.token \
             SET r.lease_until_us = NULL \
             WHERE {}",
            derived(n, &["scope", "message_id", "token"]),
            MySql::held("r.")
        ))
    }
}

pub(crate) type MySqlQuery<'q> = sqlx::query::Query<'q, MySql, MySqlArguments>;
