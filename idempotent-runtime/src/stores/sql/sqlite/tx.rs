//! Transactional mode on SQLite (see [`common::tx`](crate::stores::sql::common::tx)):
//! the store's insert, then on a duplicate its read and take-over, under the
//! database's write lock (the transaction holds it from its first write, so reads
//! after the insert see the latest rows).

use super::statements::Statements;
use crate::error::StoreError;
use crate::store::ClaimOutcome;
use crate::stores::sql::common::tx::TxClaim;
use crate::stores::sql::common::{Plan, read_row};
use sqlx::sqlite::Sqlite;

crate::stores::sql::common::tx::tx_mode!(Sqlite, Statements, claim_once);

/// One attempt: the insert, or on a duplicate the read and the take-over.
async fn claim_once(
    c: TxClaim<'_, Sqlite, Statements>,
) -> Result<Option<ClaimOutcome>, StoreError> {
    let (err, req) = (c.err(), c.req);
    let inserted = c.sql.write_claim(c.conn, req, Plan::Insert, None, &err);
    if let Some(outcome) = inserted.await? {
        return Ok(Some(outcome));
    }
    let read = c.sql.steps.read_query(req.key);
    let Some(seen) = read_row(&mut *c.conn, read, req.key.scope(), &err).await? else {
        return Ok(None);
    };
    let plan = Plan::of(req, Some(seen));
    c.sql.write_claim(c.conn, req, plan, None, &err).await
}
