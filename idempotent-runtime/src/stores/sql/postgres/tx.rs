//! Transactional mode on PostgreSQL (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's own claim statement, which locks what it writes.

use super::PostgresStore;
use super::statements::Statements;
use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest};
use crate::stores::sql::common::tx::{Prepared, TxDialect, prepared};
use crate::stores::sql::common::{self, BindExt, SqlDialect, StepSql};
use sqlx::postgres::{PgConnection, Postgres};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The PostgreSQL store's statements: its claim already locks what it writes.
static POSTGRES: Prepared<Statements> = RwLock::new(BTreeMap::new());

impl TxDialect for Postgres {
    type Sql = Statements;

    fn prepared(table: &str) -> Result<Arc<Statements>, StoreError> {
        prepared(&POSTGRES, table, Statements::new)
    }

    fn steps(sql: &Statements) -> &StepSql {
        &sql.steps
    }

    async fn claim_in<'a>(
        conn: &'a mut PgConnection,
        sql: &'a Statements,
        req: &'a ClaimRequest<'a>,
    ) -> Result<ClaimOutcome, StoreError> {
        common::retrying!({
            let row = sqlx::query(sql.claim.clone())
                .bind_claim(req)
                .bind(None::<i32>)
                .fetch_optional(&mut *conn)
                .await
                .map_err(Postgres::err("claim in transaction"))?;
            // no row: the statement waited for a concurrent claimant that
            // committed after its snapshot; the next statement sees that row
            // (READ COMMITTED). Under REPEATABLE READ and SERIALIZABLE the
            // insert fails with a serialization failure instead.
            match row {
                Some(row) => PostgresStore::decode_claim(&row, 0, req)?,
                None => None,
            }
        })
    }
}
