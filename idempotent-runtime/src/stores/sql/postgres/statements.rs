//! The SQL of [`PostgresStore`](super::PostgresStore): the table and every statement of
//! the protocol, built once per table.

use crate::stores::sql::common::{self, SqlDialect, StepSql, TableName, sql};
use sqlx::{Postgres, SqlStr};

/// The prefix that reads the clock once for a statement, as `n.now_us`.
pub(super) fn with_clock() -> String {
    format!(
        "WITH n AS MATERIALIZED (SELECT {} AS now_us)",
        Postgres::NOW_US
    )
}

/// The statements of one table, built once: every value in them is a bound parameter.
pub(crate) struct Statements {
    /// The statements of the steps every store shares.
    pub(crate) steps: StepSql,
    pub(crate) claim: SqlStr,
    /// The statements of the batch steps, each over arrays of keys.
    pub(crate) batch: BatchSql,
    pub(crate) create: Vec<SqlStr>,
}

/// The statements of the batch steps, each over arrays of keys.
pub(crate) struct BatchSql {
    pub(crate) claim: SqlStr,
    pub(crate) complete: SqlStr,
    pub(crate) release: SqlStr,
    /// The rows of many keys, each with its scope and message id.
    pub(crate) inspect: SqlStr,
}

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
        let t = table.quoted(Postgres::QUOTE);
        let n = with_clock();
        let owned_r = format!(
            "r.scope = b.scope AND r.message_id = b.message_id AND r.owner_token = b.token \
             AND {}",
            Postgres::held("r.")
        );
        let view = Postgres::view("c.");
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
                "{n}, \
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
                 SELECT FALSE, NULL::int8, NULL::int8, {view} \
                 FROM cur c, n WHERE NOT EXISTS (SELECT 1 FROM up)",
                blocks("$5::bytea", "$6::int4"),
                takeover("$6::int4 IS NULL OR r.retry_times < $6::int4")
            )),
            batch: BatchSql {
                claim: sql(format!(
                    "{n}, \
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
                 SELECT c.scope, c.message_id, FALSE, NULL::int8, NULL::int8, {view} \
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
                // the rows it completed, then the others as read (the statement's snapshot):
                // a completion not applied is Held when its record is Completed by its own
                // claim, and a corrupt row is an error, all in one round trip
                complete: sql(format!(
                    "{n}, \
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
                 SELECT c.scope, c.message_id, c.owner_token, FALSE, {view} \
                 FROM {t} c, n \
                 WHERE (c.scope, c.message_id) IN (SELECT b.scope, b.message_id FROM b) \
                    AND NOT EXISTS (SELECT 1 FROM up \
                        WHERE up.scope = c.scope AND up.message_id = c.message_id)"
                )),
                release: sql(format!(
                    "{n} \
                 UPDATE {t} AS r SET lease_until_us = NULL \
                 FROM n, unnest($1::text[], $2::bytea[], $3::int8[]) AS b(scope, message_id, token) \
                 WHERE {owned_r} \
                 RETURNING r.scope, r.message_id, r.owner_token, TRUE"
                )),
                inspect: sql(format!(
                    "{n} \
                 SELECT c.scope, c.message_id, {view} \
                 FROM {t} c JOIN unnest($1::text[], $2::bytea[]) AS b(scope, message_id) \
                    ON c.scope = b.scope AND c.message_id = b.message_id, n"
                )),
            },
            create,
            steps: StepSql::new::<Postgres>(table),
        }
    }
}
