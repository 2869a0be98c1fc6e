//! The outbox table in PostgreSQL (see [`common::outbox`](crate::stores::sql::common::outbox)):
//! its DDL, the claim (`FOR UPDATE SKIP LOCKED` in a CTE, then the lease in the same
//! statement), the mark (one statement over arrays of ids and tokens) and the purge.

use super::PostgresStore;
use super::statements::with_clock;
use crate::error::StoreError;
use crate::outbox::store::RowLease;
use crate::stores::sql::common::outbox::{
    Claim, OutboxDialect, OutboxSql, Params, claim_in_one_statement, fence_param, outbox_handle,
};
use crate::stores::sql::common::{SqlDialect, TableName, sql};
use sqlx::postgres::Postgres;

impl OutboxDialect for Postgres {
    const OUTBOX_TYPES: &'static str = "BYTEA PRIMARY KEY, BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, \
         TEXT NOT NULL, BYTEA NOT NULL, TEXT NOT NULL, BYTEA NOT NULL, \
         TEXT NOT NULL, TEXT, SMALLINT NOT NULL, INTEGER NOT NULL, \
         BIGINT NOT NULL, TEXT, BIGINT, BIGINT NOT NULL, TEXT, BIGINT NOT NULL, \
         BIGINT";

    /// PostgreSQL creates an index in its table's schema: the name is not qualified.
    fn outbox_index(table: &TableName, suffix: &str, columns: &str) -> Result<String, String> {
        Err(format!(
            "CREATE INDEX IF NOT EXISTS \"{}_{suffix}\" ON {} ({columns})",
            table.name(),
            table.quoted(Self::QUOTE)
        ))
    }

    fn outbox_purge(s: &OutboxSql) -> String {
        let t = &s.t;
        format!(
            "{} DELETE FROM {t} WHERE id IN (\
                SELECT o.id FROM {t} o, n WHERE o.status = 1 AND o.sent_us <= n.now_us - $1 \
                LIMIT $2 FOR UPDATE OF o SKIP LOCKED)",
            with_clock()
        )
    }

    /// One statement whatever the batch: the ids and the tokens bound as two arrays,
    /// joined to the rows by id (the generic statement's condition per lease is
    /// planned anew at every call, 200 parameters for a batch of 100).
    async fn outbox_mark_sent<'a>(
        conn: &'a mut sqlx::PgConnection,
        s: &'a OutboxSql,
        leases: &'a [RowLease],
    ) -> Result<Option<u64>, StoreError> {
        let op = "marking outbox rows sent";
        let t = &s.t;
        let text = format!(
            "{} UPDATE {t} AS r SET status = 1, sent_us = n.now_us, lease_owner = NULL, \
                lease_until_us = NULL \
             FROM n, unnest($1::bytea[], $2::int8[]) AS m(id, fence) \
             WHERE r.id = m.id AND r.fence = m.fence AND r.status = 0",
            with_clock()
        );
        let ids: Vec<Vec<u8>> = leases.iter().map(|l| l.id.as_bytes().to_vec()).collect();
        let fences: Vec<i64> = leases.iter().map(|l| fence_param(l.fence)).collect();
        let done = sqlx::query(sql(text))
            .bind(ids)
            .bind(fences)
            .execute(conn)
            .await
            .map_err(Self::err(op))?;
        Ok(Some(done.rows_affected()))
    }

    async fn outbox_claim<'a>(
        pool: &'a sqlx::PgPool,
        s: &'a OutboxSql,
        claim: Claim<'a>,
    ) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
        let t = &s.t;
        let mut p = Params::<Self>::new();
        let (owner, lease, limit) = (p.next(), p.next(), p.next());
        let text = format!(
            "{}, c AS (SELECT o.id FROM {t} o, n WHERE {} \
                ORDER BY o.seq LIMIT {limit} FOR UPDATE OF o SKIP LOCKED) \
             UPDATE {t} AS r SET lease_owner = {owner}, lease_until_us = n.now_us + {lease}, \
                fence = r.fence + 1 \
             FROM n WHERE r.id = ANY(ARRAY(SELECT c.id FROM c)) \
             RETURNING {}",
            with_clock(),
            s.claimable_among(claim.ids.len(), &mut p),
            OutboxSql::claimed::<Self>("r.", "fence")
        );
        claim_in_one_statement(pool, text, claim).await
    }
}

outbox_handle!(
    /// An outbox table in PostgreSQL, feature `postgres`: what a
    /// [`Relay`](crate::outbox::Relay) publishes from (it implements
    /// [`OutboxStore`](crate::outbox::OutboxStore)); made with
    /// [`PostgresStore::outbox`] or [`PostgresOutbox::new`]. Handlers write to it in
    /// their transaction (`sqlx::Transaction<'_, Postgres>` implements
    /// [`OutboxTransaction`](crate::outbox::OutboxTransaction)) with one multi-row
    /// `INSERT`.
    ///
    /// A claim is one statement: a CTE selects the claimable rows
    /// `ORDER BY seq LIMIT n FOR UPDATE OF o SKIP LOCKED` (so relays claiming at
    /// once skip each other's rows instead of waiting), and the `UPDATE` that follows
    /// takes them by id (`id = ANY(ARRAY(…))`, through the primary key whatever the
    /// table's statistics say), sets the lease and the new fencing token, `RETURNING`
    /// the messages. A mark is one `UPDATE` joined to `unnest` of the leases' ids and
    /// tokens, the same statement for any batch.
    ///
    /// # Table
    ///
    /// ```sql
    /// CREATE TABLE IF NOT EXISTS idempotent_outbox (
    ///     id              BYTEA PRIMARY KEY,    -- the message id, 16 bytes of the UUID
    ///     seq             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, -- emission order
    ///     origin_scope    TEXT NOT NULL,        -- the execution that emitted it
    ///     origin_key      BYTEA NOT NULL,
    ///     destination     TEXT NOT NULL,
    ///     payload         BYTEA NOT NULL,
    ///     headers         TEXT NOT NULL,        -- JSON list of [name, value]
    ///     ordering_key    TEXT,
    ///     status          SMALLINT NOT NULL,    -- 0 pending, 1 sent, 2 dead
    ///     attempts        INTEGER NOT NULL,     -- failed publishes
    ///     next_attempt_us BIGINT NOT NULL,      -- due time (backoff)
    ///     lease_owner     TEXT,                 -- the relay holding it
    ///     lease_until_us  BIGINT,
    ///     fence           BIGINT NOT NULL,      -- fencing token of the latest claim
    ///     last_error      TEXT,
    ///     created_us      BIGINT NOT NULL,      -- µs since the epoch, database clock
    ///     sent_us         BIGINT
    /// );
    /// CREATE INDEX IF NOT EXISTS idempotent_outbox_due_idx ON idempotent_outbox (status, next_attempt_us);
    /// CREATE INDEX IF NOT EXISTS idempotent_outbox_key_idx ON idempotent_outbox (ordering_key, seq);
    /// CREATE INDEX IF NOT EXISTS idempotent_outbox_sent_idx ON idempotent_outbox (status, sent_us);
    /// ```
    PostgresOutbox,
    Postgres,
    PostgresStore
);
