//! The batch steps of [`MySqlStore`]: one read for many keys, one multi-row insert,
//! one `UPDATE … JOIN` per chunk of completions or releases.

use super::MySqlStore;
use super::statements::MySqlQuery;
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::{ClaimOutcome, ClaimRequest, Fence, Token};
use crate::stores::sql::common::steps::Steps;
use crate::stores::sql::common::{
    BindExt, Owned, OwnedBatch, Plan, RowView, SqlDialect, repeated, unmatched_fence,
};
use sqlx::Row;
use sqlx::mysql::MySql;
use std::collections::HashMap;

/// Keys read per statement by `claim_batch`.
const BATCH_READ: usize = 500;

/// Bytes of cached outputs sent in one batch statement, well below the default
/// `max_allowed_packet` of MariaDB (16 MiB).
const BATCH_BYTES: usize = 4 << 20;

impl MySqlStore {
    pub(super) async fn claim_many(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        // one read for up to BATCH_READ distinct keys answers every duplicate, live claim
        // and poisoned key; only the keys that must be written cost a round trip each
        let mut first: HashMap<&[u8], usize> = HashMap::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            first.entry(r.key.as_bytes()).or_insert(i);
        }
        let distinct: Vec<usize> = (0..reqs.len())
            .filter(|&i| first[reqs[i].key.as_bytes()] == i)
            .collect();
        let mut seen: HashMap<RecordKey, RowView> = HashMap::new();
        for chunk in distinct.chunks(BATCH_READ) {
            let mut q = sqlx::query(self.sql.read_many(chunk.len()));
            for &i in chunk {
                q = q.bind_key(reqs[i].key);
            }
            let rows = q
                .fetch_all(&self.pool)
                .await
                .map_err(MySql::err("claim_batch"))?;
            for row in &rows {
                let key = row_key(row)?;
                let view = RowView::decode(row, 2, key.scope())?;
                seen.insert(key, view);
            }
        }
        // the keys no row was read for are inserted together: one statement per chunk,
        // which a concurrent insert of any of them fails as a whole (nothing is
        // written; those keys then go the single-key way)
        let mut inserted: HashMap<usize, Token> = HashMap::new();
        let absent: Vec<usize> = distinct
            .iter()
            .copied()
            .filter(|&i| !seen.contains_key(reqs[i].key))
            .collect();
        for chunk in absent.chunks(BATCH_READ) {
            let mut q = sqlx::query(self.sql.insert_many(chunk.len()));
            for &i in chunk {
                q = q.bind_claim(&reqs[i]);
            }
            match q.execute(&self.pool).await {
                Ok(done) => {
                    for &i in chunk {
                        inserted.insert(i, Token(done.last_insert_id()));
                    }
                }
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {}
                Err(e) => return Err(MySql::err("claim_batch")(e)),
            }
        }
        let mut out: Vec<ClaimOutcome> = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            let f = first[req.key.as_bytes()];
            let outcome = if f != i {
                repeated(&out[f], req)
            } else if let Some(&token) = inserted.get(&i) {
                ClaimOutcome::Acquired { token, attempt: 1 }
            } else {
                let plan = Plan::of(req, seen.remove(req.key));
                match self
                    .sql
                    .write_claim(&self.pool, req, plan, MySql::err("claim"))
                    .await?
                {
                    Some(outcome) => outcome,
                    None => self.claim_unguarded(req).await?,
                }
            };
            out.push(outcome);
        }
        Ok(out)
    }

    /// Completes or releases `items` (all of one kind): one `UPDATE … JOIN` per chunk of
    /// distinct keys, compare-and-set on each token.
    pub(super) async fn apply_many(&self, b: &OwnedBatch<'_>) -> Result<Vec<Fence>, StoreError> {
        let items = &b.items;
        let mut out = vec![Fence::Lost; items.len()];
        let (distinct, repeats) = distinct_keys(items.iter().map(Owned::key));
        let bytes = |&i: &usize| match items[i] {
            Owned::Complete(c) => c.output.map_or(0, <[u8]>::len),
            _ => 0,
        };
        for chunk in chunks_by_bytes(&distinct, bytes) {
            let mut q = sqlx::query(self.sql.owned_many(b.completes(), chunk.len()));
            for &i in chunk {
                q = match items[i] {
                    Owned::Complete(c) => q.bind_completion(&c),
                    w => q.bind_owned(w.key(), w.token()),
                };
            }
            self.apply_chunk(b.op, q, chunk, items, &mut out).await?;
        }
        // a key repeated in the batch: what the same step right after the first would get
        for i in repeats {
            out[i] = Steps::apply(self, items[i]).await?;
        }
        Ok(out)
    }

    /// Runs `q`, the compare-and-set `UPDATE` of the items `chunk` (indexes into `items`
    /// and `out`, one key each): all of them are [`Fence::Held`] when it matched a row
    /// each. Else some were not owned any more: their rows are read back, and an item is
    /// Held when its row shows its step applied by its claim (a completion or release
    /// whose reply was lost); any other is Lost (or, if its row is corrupt, an error).
    async fn apply_chunk(
        &self,
        op: &'static str,
        q: MySqlQuery<'_>,
        chunk: &[usize],
        items: &[Owned<'_>],
        out: &mut [Fence],
    ) -> Result<(), StoreError> {
        let done = q.execute(&self.pool).await.map_err(MySql::err(op))?;
        if done.rows_affected() == chunk.len() as u64 {
            chunk.iter().for_each(|&i| out[i] = Fence::Held);
            return Ok(());
        }
        let rows = self.states(chunk.iter().map(|&i| items[i].key())).await?;
        for &i in chunk {
            out[i] = unmatched_fence(rows.get(items[i].key()), &items[i]);
        }
        Ok(())
    }

    /// Reads back the rows of `keys` after a batch step that did not apply to all of
    /// them.
    async fn states<'k>(
        &self,
        keys: impl ExactSizeIterator<Item = &'k RecordKey>,
    ) -> Result<HashMap<RecordKey, RowView>, StoreError> {
        let mut q = sqlx::query(self.sql.read_many(keys.len()));
        for k in keys {
            q = q.bind_key(k);
        }
        let rows = q
            .fetch_all(&self.pool)
            .await
            .map_err(MySql::err("reading a batch"))?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in &rows {
            let key = row_key(row)?;
            let view = RowView::decode(row, 2, key.scope())?;
            out.insert(key, view);
        }
        Ok(out)
    }
}

/// The record key of a row whose first two columns are `scope, message_id`.
fn row_key(row: &sqlx::mysql::MySqlRow) -> Result<RecordKey, StoreError> {
    let scope: Vec<u8> = row.try_get(0).map_err(MySql::err("reading a batch"))?;
    let id: Vec<u8> = row.try_get(1).map_err(MySql::err("reading a batch"))?;
    let scope = String::from_utf8(scope).map_err(|e| {
        StoreError::with_source(StoreErrorKind::Corrupt, "a record's scope is not UTF-8", e)
    })?;
    Ok(RecordKey::from_encoded(&scope, &id))
}

/// Splits item indexes into the first occurrence of each key and the later ones.
fn distinct_keys<'k>(keys: impl Iterator<Item = &'k RecordKey>) -> (Vec<usize>, Vec<usize>) {
    let mut seen: HashMap<&[u8], ()> = HashMap::new();
    let (mut distinct, mut repeats) = (Vec::new(), Vec::new());
    for (i, k) in keys.enumerate() {
        if seen.insert(k.as_bytes(), ()).is_none() {
            distinct.push(i);
        } else {
            repeats.push(i);
        }
    }
    (distinct, repeats)
}

/// Chunks of at most [`BATCH_READ`] items and about [`BATCH_BYTES`] of outputs each.
fn chunks_by_bytes<'a>(
    items: &'a [usize],
    bytes: impl Fn(&usize) -> usize + 'a,
) -> impl Iterator<Item = &'a [usize]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut n = 0;
        let mut total = 0;
        while n < rest.len() && n < BATCH_READ && (n == 0 || total + bytes(&rest[n]) <= BATCH_BYTES)
        {
            total += bytes(&rest[n]);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}
