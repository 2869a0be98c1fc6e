//! The batch steps of [`SqliteStore`]: one `BEGIN IMMEDIATE` transaction on the writer
//! connection per batch, the single-key statements inside it.

use super::SqliteStore;
use super::statements::SqliteQuery;
use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::{ClaimOutcome, ClaimRequest, Fence};
use crate::stores::sql::common::{self, Plan, RowView, SqlDialect, Step, Steps, repeated};
use sqlx::Connection;
use sqlx::sqlite::{Sqlite, SqliteConnection};
use std::collections::HashMap;

impl SqliteStore {
    /// Runs compare-and-set `UPDATE`s in one transaction; one fence each, as the
    /// single-key steps answer it (an item that matched no row reads its row back:
    /// a corrupt row is an error, and a step its row shows applied by the same claim
    /// is [`Fence::Held`]).
    pub(super) async fn apply_all<'q>(
        &self,
        conn: &mut SqliteConnection,
        op: &'static str,
        queries: impl Iterator<Item = (SqliteQuery<'q>, &'q RecordKey, Step)>,
    ) -> Result<Vec<Fence>, StoreError> {
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Sqlite::err(op))?;
        let mut out = Vec::with_capacity(queries.size_hint().0);
        for (q, key, step) in queries {
            let read = self.sql.steps.read_query(key);
            out.push(Steps::<Sqlite>::write_fenced(&mut tx, op, q, read, key, step).await?);
        }
        tx.commit().await.map_err(Sqlite::err(op))?;
        Ok(out)
    }
}

impl SqliteStore {
    pub(super) async fn claim_batch_in(
        &self,
        conn: &mut SqliteConnection,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(reqs.len());
        let mut out: Vec<ClaimOutcome> = Vec::with_capacity(reqs.len());
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(Sqlite::err("claim_batch"))?;
        for (i, req) in reqs.iter().enumerate() {
            let f = *first.entry(req.key.as_bytes()).or_insert(i);
            let outcome = if f != i {
                repeated(&out[f], req)
            } else {
                common::retrying!({
                    let row = self
                        .sql
                        .steps
                        .read_query(req.key)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(Sqlite::err("claim_batch"))?;
                    let seen = row
                        .map(|r| RowView::decode(&r, 0, req.key.scope()))
                        .transpose()?;
                    self.write_claim(&mut tx, req, Plan::of(req, seen)).await?
                })?
            };
            out.push(outcome);
        }
        tx.commit().await.map_err(Sqlite::err("claim_batch"))?;
        Ok(out)
    }
}
