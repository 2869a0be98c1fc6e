//! Transactional mode on SQLite (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's insert, then on a duplicate its read and take-over, under the
//! database's write lock.

use super::statements::Statements;
use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest};
use crate::stores::sql::common::tx::{Prepared, TxDialect, prepared};
use crate::stores::sql::common::{self, Plan, RowView, SqlDialect, StepSql};
use sqlx::sqlite::{Sqlite, SqliteConnection};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The SQLite store's statements; the transaction holds the database's write lock
/// from its first write, so reads after the insert see the latest rows.
static SQLITE: Prepared<Statements> = RwLock::new(BTreeMap::new());

impl TxDialect for Sqlite {
    type Sql = Statements;

    fn prepared(table: &str) -> Result<Arc<Statements>, StoreError> {
        prepared(&SQLITE, table, Statements::new)
    }

    fn steps(sql: &Statements) -> &StepSql {
        &sql.steps
    }

    async fn claim_in<'a>(
        conn: &'a mut SqliteConnection,
        s: &'a Statements,
        req: &'a ClaimRequest<'a>,
    ) -> Result<ClaimOutcome, StoreError> {
        let err = || Sqlite::err("claim in transaction");
        common::retrying!({
            let inserted = s.write_claim(conn, req, Plan::Insert, None, err());
            if let Some(outcome) = inserted.await? {
                return Ok(outcome);
            }
            let row = s
                .steps
                .read_query(req.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(err())?;
            let Some(row) = row else { continue };
            let plan = Plan::of(req, Some(RowView::decode(&row, 0, req.key.scope())?));
            s.write_claim(conn, req, plan, None, err()).await?
        })
    }
}
