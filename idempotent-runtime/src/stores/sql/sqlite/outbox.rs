//! The outbox table in SQLite (see [`common::outbox`](crate::stores::sql::common::outbox)):
//! its DDL, the claim (one `UPDATE … RETURNING`, atomic under the database's write
//! lock, with leases and fencing tokens) and the purge.

use super::SqliteStore;
use crate::error::StoreError;
use crate::stores::sql::common::outbox::{
    Claim, OutboxDialect, OutboxSql, Params, claim_in_one_statement, outbox_handle,
};
use crate::stores::sql::common::{SqlDialect, TableName};
use sqlx::sqlite::{Sqlite, SqlitePool, SqliteRow};

impl OutboxDialect for Sqlite {
    /// The id is a unique key rather than the primary key: `seq` is the rowid
    /// (`AUTOINCREMENT`, so that a `VACUUM` never renumbers it).
    const OUTBOX_TYPES: &'static str = "BLOB NOT NULL UNIQUE, INTEGER PRIMARY KEY AUTOINCREMENT, TEXT NOT NULL, \
         BLOB NOT NULL, TEXT NOT NULL, BLOB NOT NULL, TEXT NOT NULL, TEXT, \
         INTEGER NOT NULL, INTEGER NOT NULL, INTEGER NOT NULL, TEXT, INTEGER, \
         INTEGER NOT NULL, TEXT, INTEGER NOT NULL, INTEGER";

    /// SQLite qualifies the index name, not the table, with the schema.
    fn outbox_index(table: &TableName, suffix: &str, columns: &str) -> Result<String, String> {
        let name = match table.schema() {
            Some(s) => format!("\"{s}\".\"{}_{suffix}\"", table.name()),
            None => format!("\"{}_{suffix}\"", table.name()),
        };
        Err(format!(
            "CREATE INDEX IF NOT EXISTS {name} ON \"{}\" ({columns})",
            table.name()
        ))
    }

    async fn outbox_claim<'a>(
        pool: &'a SqlitePool,
        s: &'a OutboxSql,
        claim: Claim<'a>,
    ) -> Result<Vec<SqliteRow>, StoreError> {
        let mut p = Params::<Self>::new();
        let (owner, lease, limit) = (p.next(), p.next(), p.next());
        // one statement: it holds the write lock from its start, so two relays'
        // claims run one after the other and never take the same row
        let text = format!(
            "UPDATE {t} SET lease_owner = {owner}, lease_until_us = {now} + {lease}, \
                fence = fence + 1 \
             WHERE seq IN (SELECT o.seq FROM {t} o WHERE {} ORDER BY o.seq LIMIT {limit}) \
             RETURNING {}",
            s.claimable_among(claim.ids.len(), &mut p),
            OutboxSql::claimed::<Self>("", "fence"),
            now = Self::NOW_US,
            t = s.t
        );
        claim_in_one_statement(pool, text, claim).await
    }

    fn outbox_purge(s: &OutboxSql) -> String {
        let t = &s.t;
        format!(
            "DELETE FROM {t} WHERE seq IN (\
                SELECT seq FROM {t} WHERE status = 1 AND sent_us <= {} - ?1 LIMIT ?2)",
            Self::NOW_US
        )
    }
}

outbox_handle!(
    /// An outbox table in SQLite, feature `sqlite`: what a
    /// [`Relay`](crate::outbox::Relay) publishes from (it implements
    /// [`OutboxStore`](crate::outbox::OutboxStore)); made with
    /// [`SqliteStore::outbox`] or [`SqliteOutbox::new`]. Handlers write to it in
    /// their transaction (`sqlx::Transaction<'_, Sqlite>` implements
    /// [`OutboxTransaction`](crate::outbox::OutboxTransaction)) with one multi-row
    /// `INSERT`.
    ///
    /// SQLite has no `SKIP LOCKED`: a claim is one `UPDATE … WHERE seq IN (SELECT …
    /// ORDER BY seq LIMIT n) RETURNING …`, which runs under the database's write lock,
    /// so claims of several relays (tasks or processes sharing the file) run one after
    /// the other and each takes other rows; the lease and the fencing token it sets
    /// keep a row to its relay until the lease runs out.
    ///
    /// # Table
    ///
    /// ```sql
    /// CREATE TABLE IF NOT EXISTS idempotent_outbox (
    ///     id              BLOB NOT NULL UNIQUE,  -- the message id, 16 bytes of the UUID
    ///     seq             INTEGER PRIMARY KEY AUTOINCREMENT, -- emission order
    ///     origin_scope    TEXT NOT NULL,         -- the execution that emitted it
    ///     origin_key      BLOB NOT NULL,
    ///     destination     TEXT NOT NULL,
    ///     payload         BLOB NOT NULL,
    ///     headers         TEXT NOT NULL,         -- JSON list of [name, value]
    ///     ordering_key    TEXT,
    ///     status          INTEGER NOT NULL,      -- 0 pending, 1 sent, 2 dead
    ///     attempts        INTEGER NOT NULL,      -- failed publishes
    ///     next_attempt_us INTEGER NOT NULL,      -- due time (backoff)
    ///     lease_owner     TEXT,                  -- the relay holding it
    ///     lease_until_us  INTEGER,
    ///     fence           INTEGER NOT NULL,      -- fencing token of the latest claim
    ///     last_error      TEXT,
    ///     created_us      INTEGER NOT NULL,      -- µs since the epoch, database clock
    ///     sent_us         INTEGER
    /// );
    /// CREATE INDEX IF NOT EXISTS idempotent_outbox_due_idx ON idempotent_outbox (status, next_attempt_us);
    /// CREATE INDEX IF NOT EXISTS idempotent_outbox_key_idx ON idempotent_outbox (ordering_key, seq);
    /// CREATE INDEX IF NOT EXISTS idempotent_outbox_sent_idx ON idempotent_outbox (status, sent_us);
    /// ```
    ///
    /// The id is a unique key rather than the primary key: `seq` is the rowid
    /// (`AUTOINCREMENT`, so a `VACUUM` never renumbers it and emission order holds).
    SqliteOutbox,
    Sqlite,
    SqliteStore
);
