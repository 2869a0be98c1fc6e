//! The outbox table in MySQL and MariaDB (see
//! [`common::outbox`](crate::stores::sql::common::outbox)): its DDL, the claim (a
//! `SELECT … FOR UPDATE SKIP LOCKED` and the lease's `UPDATE` in one short
//! transaction) and the purge.

use super::MySqlStore;
use crate::error::StoreError;
use crate::stores::sql::common::outbox::{
    Claim, OutboxDb, OutboxDialect, OutboxSql, Params, outbox_handle,
};
use crate::stores::sql::common::{SqlDialect, TableName, sql};
use sqlx::Connection;
use sqlx::mysql::{MySql, MySqlPool, MySqlRow};

impl OutboxDialect for MySql {
    /// Text columns are binary, so ordering keys compare byte for byte.
    const OUTBOX_TYPES: &'static str = "BINARY(16) NOT NULL PRIMARY KEY, BIGINT NOT NULL AUTO_INCREMENT UNIQUE, \
         VARBINARY(200) NOT NULL, VARBINARY(130) NOT NULL, \
         VARBINARY(512) NOT NULL, LONGBLOB NOT NULL, LONGBLOB NOT NULL, \
         VARBINARY(255) NULL, TINYINT NOT NULL, INT NOT NULL, BIGINT NOT NULL, \
         VARBINARY(100) NULL, BIGINT NULL, BIGINT NOT NULL, BLOB NULL, \
         BIGINT NOT NULL, BIGINT NULL";

    const OUTBOX_TABLE_OPTIONS: &'static str = " ENGINE = InnoDB";

    /// MySQL has no `CREATE INDEX IF NOT EXISTS`: the indexes are keys of the table.
    fn outbox_index(_: &TableName, suffix: &str, columns: &str) -> Result<String, String> {
        Ok(format!("KEY {suffix} ({columns})"))
    }

    fn outbox_purge(s: &OutboxSql) -> String {
        format!(
            "DELETE FROM {} WHERE status = 1 AND sent_us <= {} - ? ORDER BY sent_us LIMIT ?",
            s.t,
            Self::NOW_US
        )
    }

    async fn outbox_claim<'a>(
        pool: &'a MySqlPool,
        s: &'a OutboxSql,
        claim: Claim<'a>,
    ) -> Result<Vec<MySqlRow>, StoreError> {
        let op = "claiming outbox rows";
        let t = &s.t;
        let mut p = Params::<Self>::new();
        // the fencing token the UPDATE below gives the rows this transaction locks
        let select = format!(
            "SELECT {} FROM {t} o WHERE {} ORDER BY o.seq LIMIT {} FOR UPDATE SKIP LOCKED",
            OutboxSql::claimed::<Self>("o.", "fence + 1"),
            s.claimable_among(claim.ids.len(), &mut p),
            p.next()
        );
        let mut conn = pool.acquire().await.map_err(Self::err(op))?;
        // READ COMMITTED: the locking read takes no gap locks, so the handlers'
        // INSERTs never wait for a relay's claim
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(Self::err(op))?;
        let mut tx = conn.begin().await.map_err(Self::err(op))?;
        let mut q = sqlx::query::<MySql>(sql(select));
        for id in claim.ids {
            q = Self::bytes(q, id.as_bytes().to_vec());
        }
        q = Self::int(q, claim.limit);
        let rows = Self::rows(&mut tx, q, op).await?;
        if !rows.is_empty() {
            let ids = rows
                .iter()
                .map(|r| sqlx::Row::try_get::<Vec<u8>, _>(r, 0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(Self::err(op))?;
            let mut p = Params::<Self>::new();
            let update = format!(
                "UPDATE {t} SET lease_owner = {}, lease_until_us = {} + {}, fence = fence + 1 \
                 WHERE {}",
                p.next(),
                Self::NOW_US,
                p.next(),
                OutboxSql::ids_in("", ids.len(), &mut p)
            );
            let mut q = sqlx::query::<MySql>(sql(update));
            q = Self::text(q, Some(claim.owner));
            q = Self::int(q, claim.lease_us);
            for id in ids {
                q = Self::bytes(q, id);
            }
            Self::write(&mut tx, q, op).await?;
        }
        tx.commit().await.map_err(Self::err(op))?;
        Ok(rows)
    }
}

outbox_handle!(
    /// An outbox table in MySQL 8 or MariaDB 10.6+, feature `mysql`: what a
    /// [`Relay`](crate::outbox::Relay) publishes from (it implements
    /// [`OutboxStore`](crate::outbox::OutboxStore)); made with
    /// [`MySqlStore::outbox`] or [`MySqlOutbox::new`]. Handlers write to it in their
    /// transaction (`sqlx::Transaction<'_, MySql>` implements
    /// [`OutboxTransaction`](crate::outbox::OutboxTransaction)) with one multi-row
    /// `INSERT`.
    ///
    /// A claim is one short `READ COMMITTED` transaction: `SELECT … ORDER BY seq LIMIT
    /// n FOR UPDATE SKIP LOCKED` (relays claiming at once skip each other's rows
    /// instead of waiting), then one `UPDATE` that sets the lease and the new fencing
    /// token of the rows it locked.
    ///
    /// # Table
    ///
    /// ```sql
    /// CREATE TABLE IF NOT EXISTS idempotent_outbox (
    ///     id              BINARY(16) NOT NULL PRIMARY KEY,  -- the message id (UUID bytes)
    ///     seq             BIGINT NOT NULL AUTO_INCREMENT UNIQUE, -- emission order
    ///     origin_scope    VARBINARY(200) NOT NULL,  -- the execution that emitted it
    ///     origin_key      VARBINARY(130) NOT NULL,
    ///     destination     VARBINARY(512) NOT NULL,
    ///     payload         LONGBLOB NOT NULL,
    ///     headers         LONGBLOB NOT NULL,        -- JSON list of [name, value], UTF-8
    ///     ordering_key    VARBINARY(255) NULL,      -- compared byte for byte
    ///     status          TINYINT NOT NULL,         -- 0 pending, 1 sent, 2 dead
    ///     attempts        INT NOT NULL,             -- failed publishes
    ///     next_attempt_us BIGINT NOT NULL,          -- due time (backoff)
    ///     lease_owner     VARBINARY(100) NULL,      -- the relay holding it
    ///     lease_until_us  BIGINT NULL,
    ///     fence           BIGINT NOT NULL,          -- fencing token of the latest claim
    ///     last_error      BLOB NULL,
    ///     created_us      BIGINT NOT NULL,          -- µs since the epoch, database clock
    ///     sent_us         BIGINT NULL,
    ///     KEY due_idx (status, next_attempt_us),
    ///     KEY key_idx (ordering_key, seq),
    ///     KEY sent_idx (status, sent_us)
    /// ) ENGINE = InnoDB;
    /// ```
    MySqlOutbox,
    MySql,
    MySqlStore
);
