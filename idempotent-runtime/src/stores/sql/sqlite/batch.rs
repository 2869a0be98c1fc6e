//! The batch steps of [`SqliteStore`]: one `BEGIN IMMEDIATE` transaction on the writer
//! connection per batch, the single-key statements inside it.

use super::SqliteStore;
use crate::error::StoreError;
use crate::store::{ClaimOutcome, ClaimRequest, Fence};
use crate::stores::sql::common::steps::Steps;
use crate::stores::sql::common::{self, OwnedBatch, Plan, SqlDialect, read_row, repeated};
use sqlx::Connection;
use sqlx::sqlite::{Sqlite, SqliteConnection};
use std::collections::HashMap;

impl SqliteStore {
    /// Runs the compare-and-set `UPDATE`s of `b` in one transaction on the writer
    /// connection; one fence each, as the single-key steps answer it (an item that
    /// matched no row reads its row back: a corrupt row is an error, and a step its
    /// row shows applied by the same claim is [`Fence::Held`]).
    pub(super) async fn apply_many(&self, b: &OwnedBatch<'_>) -> Result<Vec<Fence>, StoreError> {
        let op = b.op;
        self.with_writer(async |conn| {
            let mut tx = conn
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(Sqlite::err(op))?;
            let mut out = Vec::with_capacity(b.items.len());
            for &item in &b.items {
                out.push(Steps::<Sqlite>::apply_in(&mut tx, &self.sql.steps, op, item).await?);
            }
            tx.commit().await.map_err(Sqlite::err(op))?;
            Ok(out)
        })
        .await
    }

    /// One transaction holding the write lock: every read in it sees the latest rows
    /// and no other writer can change them before its write, so the whole batch
    /// commits once. A repeated key in the batch gets what a second claim right after
    /// the first would get, without another read.
    pub(super) async fn claim_many(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        self.with_writer(async |conn| self.claim_batch_in(conn, reqs).await)
            .await
    }

    async fn claim_batch_in(
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
        let err = Sqlite::err("claim_batch");
        for (i, req) in reqs.iter().enumerate() {
            let f = *first.entry(req.key.as_bytes()).or_insert(i);
            let outcome = if f != i {
                repeated(&out[f], req)
            } else {
                common::retrying!({
                    let read = self.sql.steps.read_query(req.key);
                    let seen = read_row(&mut *tx, read, req.key.scope(), &err).await?;
                    self.write_claim(&mut tx, req, Plan::of(req, seen)).await?
                })?
            };
            out.push(outcome);
        }
        tx.commit().await.map_err(Sqlite::err("claim_batch"))?;
        Ok(out)
    }
}
