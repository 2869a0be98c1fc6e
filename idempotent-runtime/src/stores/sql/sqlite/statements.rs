//! The SQL of [`SqliteStore`](super::SqliteStore): the table and every statement of the
//! protocol, built once per table, and the claim's conditional write.

use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest};
use crate::stores::sql::common::{
    self, BindExt, Plan, PlanSql, SqlDialect, StepSql, TableName, sql,
};
use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{Row, SqlStr};

/// The database clock, as every statement reads it.
const NOW_US: &str = Sqlite::NOW_US;

/// The statements of one table, built once: every value in them is a bound parameter.
pub(crate) struct Statements {
    /// The statements of the steps every store shares.
    pub(crate) steps: StepSql,
    /// The conditional writes of the claim.
    pub(crate) plans: PlanSql,
    /// `plans.insert` with a lower bound `?6` on the token.
    pub(crate) insert_after: SqlStr,
    pub(crate) create: [SqlStr; 2],
}

impl Statements {
    pub(crate) fn new(table: TableName) -> Self {
        let t = table.quoted(Sqlite::QUOTE);
        let sane = common::sane("", Sqlite::ANY_TYPE);
        // SQLite qualifies the index name, not the table, with the schema
        let index = match table.schema() {
            Some(s) => format!("\"{s}\".\"{}_expires_at_us_idx\"", table.name()),
            None => format!("\"{}_expires_at_us_idx\"", table.name()),
        };
        let insert = |token: &str| {
            sql(format!(
                "INSERT INTO {t} (scope, message_id, status, retry_times, owner_token, \
                    lease_until_us, expires_at_us, fingerprint, output) \
                 VALUES (?1, ?2, 0, 1, {token}, {NOW_US} + ?3, {NOW_US} + ?4, ?5, NULL) \
                 ON CONFLICT (scope, message_id) DO NOTHING \
                 RETURNING owner_token"
            ))
        };
        let plans = PlanSql {
            insert: insert(NOW_US),
            take_over: sql(format!(
                "UPDATE {t} SET status = 0, retry_times = retry_times + 1, \
                    owner_token = max(owner_token + 1, {NOW_US}), \
                    lease_until_us = {NOW_US} + ?3, \
                    expires_at_us = max(expires_at_us, {NOW_US} + ?4), \
                    fingerprint = coalesce(fingerprint, ?5), output = NULL \
                 WHERE scope = ?1 AND message_id = ?2 AND owner_token = ?6 AND retry_times = ?7 \
                    AND expires_at_us > {NOW_US} AND status = 0 \
                    AND (lease_until_us IS NULL OR lease_until_us <= {NOW_US}) AND {sane} \
                 RETURNING owner_token, retry_times"
            )),
            take_over_expired: sql(format!(
                "UPDATE {t} SET status = 0, retry_times = 1, \
                    owner_token = max(owner_token + 1, {NOW_US}), \
                    lease_until_us = {NOW_US} + ?3, expires_at_us = {NOW_US} + ?4, \
                    fingerprint = ?5, output = NULL \
                 WHERE scope = ?1 AND message_id = ?2 AND owner_token = ?6 \
                    AND expires_at_us <= {NOW_US} AND {sane} \
                 RETURNING owner_token, retry_times"
            )),
        };
        Statements {
            plans,
            insert_after: insert(&format!("max({NOW_US}, ?6)")),
            create: [
                sql(format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\
                     scope TEXT NOT NULL, \
                     message_id BLOB NOT NULL, \
                     status INTEGER NOT NULL, \
                     retry_times INTEGER NOT NULL, \
                     owner_token INTEGER NOT NULL, \
                     lease_until_us INTEGER, \
                     expires_at_us INTEGER NOT NULL, \
                     fingerprint BLOB, \
                     output BLOB, \
                     PRIMARY KEY (scope, message_id))"
                )),
                sql(format!(
                    "CREATE INDEX IF NOT EXISTS {index} ON \"{}\" (expires_at_us)",
                    table.name()
                )),
            ],
            steps: StepSql::new::<Sqlite>(table),
        }
    }
}

pub(crate) type SqliteQuery<'q> =
    sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

impl Statements {
    /// Makes a claim's conditional write for `plan` on `conn`: answers, inserts an
    /// absent key (with a token of at least `floor`, if given) or takes over the row
    /// read, compare-and-set on what was read. `Ok(None)`: the row changed since the
    /// read; read again. `err` wraps a driver error.
    pub(crate) async fn write_claim(
        &self,
        conn: &mut SqliteConnection,
        req: &ClaimRequest<'_>,
        plan: Plan,
        floor: Option<i64>,
        err: impl Fn(sqlx::Error) -> StoreError,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let q = |stmt: &SqlStr| sqlx::query(stmt.clone()).bind_claim(req);
        let (query, takes_over) = match plan {
            Plan::Answer(outcome) => return Ok(Some(outcome)),
            Plan::Insert => match floor {
                Some(floor) => (q(&self.insert_after).bind(floor), false),
                None => (q(&self.plans.insert), false),
            },
            Plan::TakeOverExpired { token } => (q(&self.plans.take_over_expired).bind(token), true),
            Plan::TakeOver { token, attempts } => {
                (q(&self.plans.take_over).bind(token).bind(attempts), true)
            }
        };
        let row = query.fetch_optional(&mut *conn).await.map_err(&err)?;
        let Some(row) = row else { return Ok(None) };
        let token: i64 = row.try_get(0).map_err(&err)?;
        let attempt: i64 = if takes_over {
            row.try_get(1).map_err(&err)?
        } else {
            1
        };
        common::acquired(token, attempt, req.key.scope()).map(Some)
    }
}
