//! The batch steps of [`PostgresStore`]: each one statement over arrays of keys.

use super::PostgresStore;
use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::{ClaimOutcome, ClaimRequest, Fence, Token};
use crate::stores::sql::common::{
    self, Owned, OwnedBatch, RowView, SqlDialect, keep_micros, max_attempts_param, micros,
    repeated, token_param, unmatched_fence,
};
use sqlx::Row;
use sqlx::postgres::{PgArguments, PgRow, Postgres};
use std::collections::HashMap;

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Binds the `scope`, `message_id` and `owner_token` arrays of a batch step.
fn bind_owned_arrays<'k>(
    q: PgQuery<'_>,
    items: impl Iterator<Item = (&'k RecordKey, Token)> + Clone,
) -> PgQuery<'_> {
    q.bind(items.clone().map(|(k, _)| k.scope()).collect::<Vec<_>>())
        .bind(items.clone().map(|(k, _)| k.key()).collect::<Vec<_>>())
        .bind(items.map(|(_, t)| token_param(t)).collect::<Vec<_>>())
}

impl PostgresStore {
    pub(super) async fn claim_many(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        // one statement for the distinct keys; a key repeated within the batch is
        // answered as a second claim of it would be (it cannot be upserted twice in one
        // statement), and a key whose row changed under the statement is asked again
        let mut out: Vec<Option<ClaimOutcome>> = vec![None; reqs.len()];
        let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            first.entry(r.key.as_bytes()).or_insert(i);
        }
        let mut pending: Vec<usize> = (0..reqs.len())
            .filter(|&i| first[reqs[i].key.as_bytes()] == i)
            .collect();
        common::retrying!({
            if pending.is_empty() {
                Some(())
            } else {
                let rows = sqlx::query(self.sql.batch.claim.clone())
                    .bind(
                        pending
                            .iter()
                            .map(|&i| reqs[i].key.scope())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        pending
                            .iter()
                            .map(|&i| reqs[i].key.key())
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        pending
                            .iter()
                            .map(|&i| micros(reqs[i].lease))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        pending
                            .iter()
                            .map(|&i| keep_micros(&reqs[i]))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        pending
                            .iter()
                            .map(|&i| reqs[i].fingerprint)
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        pending
                            .iter()
                            .map(|&i| {
                                max_attempts_param(&reqs[i])
                                    .map(|m| i32::try_from(m).unwrap_or(i32::MAX))
                            })
                            .collect::<Vec<_>>(),
                    )
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Postgres::err("claim_batch"))?;
                for row in &rows {
                    let scope: String = row.try_get(0).map_err(Postgres::err("claim_batch"))?;
                    let id: Vec<u8> = row.try_get(1).map_err(Postgres::err("claim_batch"))?;
                    let key = RecordKey::from_encoded(&scope, &id);
                    let Some(&i) = first.get(key.as_bytes()) else {
                        return Err(common::corrupt(
                            "claim_batch returned a key it was not asked for".into(),
                        ));
                    };
                    out[i] = Self::decode_claim(row, 2, &reqs[i])?;
                }
                pending.retain(|&i| out[i].is_none());
                pending.is_empty().then_some(())
            }
        })?;
        let mut result = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let f = first[r.key.as_bytes()];
            let outcome = if f == i {
                out[i].take().ok_or_else(common::contended)?
            } else {
                repeated(&result[f], r)
            };
            result.push(outcome);
        }
        Ok(result)
    }

    /// Completes or releases `items` (all of one kind) in one statement over arrays,
    /// compare-and-set on each token.
    pub(super) async fn apply_many(&self, b: &OwnedBatch<'_>) -> Result<Vec<Fence>, StoreError> {
        let (op, items, completes) = (b.op, &b.items, b.completes());
        let owned = items.iter().map(|w| (w.key(), w.token()));
        let rows = if completes {
            let completions = items.iter().filter_map(|w| match w {
                Owned::Complete(c) => Some(c),
                _ => None,
            });
            bind_owned_arrays(sqlx::query(self.sql.batch.complete.clone()), owned.clone())
                .bind(completions.clone().map(|c| c.output).collect::<Vec<_>>())
                .bind(completions.map(|c| micros(c.ttl)).collect::<Vec<_>>())
        } else {
            bind_owned_arrays(sqlx::query(self.sql.batch.release.clone()), owned.clone())
        }
        .fetch_all(&self.pool)
        .await
        .map_err(Postgres::err(op))?;
        // the rows it changed, then (completions) the others as read
        let mut applied = Vec::with_capacity(rows.len());
        let mut seen = HashMap::new();
        for row in rows {
            if row.try_get(3).map_err(Postgres::err(op))? {
                applied.push(row);
            } else {
                let key = returned_key(&row)?;
                let view = RowView::decode(&row, 4, key.scope())?;
                seen.insert(key, view);
            }
        }
        // a completion repeated by its own claim finds its record Completed
        let mut out = fences(&applied, owned, completes)?;
        if !completes && out.contains(&Fence::Lost) {
            // the rows of the releases not applied, read back
            let lost = (0..items.len()).filter(|&i| out[i] == Fence::Lost);
            seen = self.read_many(lost.map(|i| items[i].key())).await?;
        }
        // an item not applied is Held when its row shows its step applied by its claim
        // (a completion or release whose reply was lost, or a release repeated within
        // this batch); a corrupt row is an error, not a lost claim
        for (i, w) in items.iter().enumerate() {
            if out[i] == Fence::Lost {
                out[i] = unmatched_fence(seen.get(w.key()), w);
            }
        }
        Ok(out)
    }

    /// The rows of `keys`, checked.
    async fn read_many<'k>(
        &self,
        keys: impl Iterator<Item = &'k RecordKey> + Clone,
    ) -> Result<HashMap<RecordKey, RowView>, StoreError> {
        let rows = sqlx::query(self.sql.batch.inspect.clone())
            .bind(keys.clone().map(|k| k.scope()).collect::<Vec<_>>())
            .bind(keys.map(|k| k.key()).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await
            .map_err(Postgres::err("reading a batch"))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in &rows {
            let scope: String = row.try_get(0).map_err(Postgres::err("reading a batch"))?;
            let id: Vec<u8> = row.try_get(1).map_err(Postgres::err("reading a batch"))?;
            let view = RowView::decode(row, 2, &scope)?;
            out.insert(RecordKey::from_encoded(&scope, &id), view);
        }
        Ok(out)
    }
}

/// The record key of a returned row whose first two columns are `scope, message_id`.
fn returned_key(row: &PgRow) -> Result<RecordKey, StoreError> {
    let scope: String = row.try_get(0).map_err(Postgres::err("reading a batch"))?;
    let id: Vec<u8> = row.try_get(1).map_err(Postgres::err("reading a batch"))?;
    Ok(RecordKey::from_encoded(&scope, &id))
}

/// Maps the rows an `UPDATE … RETURNING scope, message_id, owner_token` changed back
/// onto the items, in order. Each (key, token) was applied once: a repeat in the same
/// batch is [`Fence::Held`] when `repeat_held` (a completion repeated by its own claim
/// finds its record Completed), else [`Fence::Lost`] (a release repeated).
fn fences<'a>(
    rows: &[PgRow],
    items: impl Iterator<Item = (&'a RecordKey, Token)>,
    repeat_held: bool,
) -> Result<Vec<Fence>, StoreError> {
    let mut held: HashMap<(RecordKey, i64), bool> = HashMap::with_capacity(rows.len());
    for row in rows {
        let token: i64 = row.try_get(2).map_err(Postgres::err("reading a batch"))?;
        held.insert((returned_key(row)?, token), false);
    }
    Ok(items
        .map(
            |(key, token)| match held.get_mut(&(key.clone(), token_param(token))) {
                Some(used) if !*used || repeat_held => {
                    *used = true;
                    Fence::Held
                }
                _ => Fence::Lost,
            },
        )
        .collect())
}
