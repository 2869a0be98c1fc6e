//! Transactional mode on PostgreSQL (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's own claim statement, which locks what it writes.

use super::PostgresStore;
use super::statements::Statements;
use crate::error::StoreError;
use crate::store::ClaimOutcome;
use crate::stores::sql::common::BindExt;
use crate::stores::sql::common::tx::TxClaim;
use sqlx::postgres::Postgres;

crate::stores::sql::common::tx::tx_mode!(Postgres, Statements, claim_once);

/// One attempt: the store's claim statement.
async fn claim_once(
    c: TxClaim<'_, Postgres, Statements>,
) -> Result<Option<ClaimOutcome>, StoreError> {
    let row = sqlx::query(c.sql.claim.clone())
        .bind_claim(c.req)
        .bind(None::<i32>)
        .fetch_optional(&mut *c.conn)
        .await
        .map_err(c.err())?;
    // no row: the statement waited for a concurrent claimant that committed after its
    // snapshot; the next statement sees that row (READ COMMITTED). Under REPEATABLE
    // READ and SERIALIZABLE the insert fails with a serialization failure instead.
    match row {
        Some(row) => PostgresStore::decode_claim(&row, 0, c.req),
        None => Ok(None),
    }
}
