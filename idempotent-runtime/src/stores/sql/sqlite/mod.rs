//! [`SqliteStore`]: the embedded durable store.

mod batch;
pub(super) mod outbox;
mod scan;
mod statements;
mod tx;

use statements::SqliteQuery;
pub(crate) use statements::Statements;

use super::common::steps::Steps;
use super::common::{self, DEFAULT_TABLE, Plan, SqlDialect, TableName, token_param};
use crate::error::{StoreError, StoreErrorKind};
use crate::store::{ClaimOutcome, ClaimRequest};
use sqlx::error::DatabaseError;
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};

/// The embedded durable store: the dedup table in an SQLite file, feature `sqlite`.
///
/// `SqliteStore::connect("sqlite://dedup.db?mode=rwc")` creates the file and the table
/// if they are missing, turns on write-ahead logging (readers never wait for the
/// writer) with `synchronous = NORMAL`, and a busy timeout of
/// [`BUSY_TIMEOUT`](Self::BUSY_TIMEOUT). Every record survives a process crash; with
/// `synchronous = NORMAL` the last commits before a power loss or OS crash may be
/// lost (SQLite syncs the log at checkpoints, not at every commit), which can let a
/// message completed just before it run again. Use `synchronous = FULL` on your own
/// pool ([`from_pool`](Self::from_pool)) to sync every commit, at the cost of one
/// fsync per write. The pool's connections are not pinged before use (an embedded
/// database has no network to fail).
///
/// Every write of one store (and of its clones) goes through one connection of its
/// own, taken out of the pool at the first write, so concurrent tasks queue for it
/// instead of spinning on SQLite's write lock and never see `database is locked`;
/// other processes sharing the file wait on SQLite's busy timeout.
///
/// A claim reads first and writes only when it must: the row is read with a plain
/// `SELECT` (one statement; this answers every duplicate of a completed key, live
/// claim, exhausted or mismatched key without a write), on the writer connection when
/// no write is under way (held for the claim's write too, so the claim takes no pooled
/// connection, which sqlx would ping when it goes back to the pool), else on a pooled
/// connection (so a duplicate never waits for writes); an
/// absent key is inserted with `INSERT … ON CONFLICT DO NOTHING RETURNING owner_token`,
/// a released, lapsed or expired one taken over with `UPDATE … WHERE owner_token =
/// <token read> AND <still claimable> RETURNING owner_token, retry_times`
/// (compare-and-set on what was read; the claim starts over if the row changed). A
/// first delivery is therefore two statements. SQLite's clock has millisecond
/// resolution, so a new record's token is also at least one more than the last token
/// the store issued. Complete, release and renew are one `UPDATE` each,
/// compare-and-set on the owner token. Times come from SQLite's `unixepoch('subsec')`.
///
/// Batches run in one `BEGIN IMMEDIATE` transaction on the writer (one commit for the
/// whole batch): the same statements per key, with every read seeing the latest rows
/// since no other writer can commit in between.
///
/// # Table
///
/// [`connect`](Self::connect) and [`migrate`](Self::migrate) create the table if it is
/// missing; to create it by hand (name it as you like and pass the name to
/// [`with_table`](Self::with_table)):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS message_idempotent (
///     scope          TEXT    NOT NULL,  -- the handler's namespace
///     message_id     BLOB    NOT NULL,  -- the encoded key, at most 130 bytes
///     status         INTEGER NOT NULL,  -- 0 not yet consumed successfully, 1 consumed
///     retry_times    INTEGER NOT NULL,  -- attempts claimed so far
///     owner_token    INTEGER NOT NULL,  -- fencing token of the latest claim
///     lease_until_us INTEGER,           -- lease deadline while in progress, NULL otherwise
///     expires_at_us  INTEGER NOT NULL,  -- when the record may be purged
///     fingerprint    BLOB,              -- 32-byte message fingerprint, if declared
///     output         BLOB,              -- cached output once consumed
///     PRIMARY KEY (scope, message_id)
/// );
/// CREATE INDEX IF NOT EXISTS message_idempotent_expires_at_us_idx
///     ON message_idempotent (expires_at_us);
/// ```
///
/// Times are microseconds since the Unix epoch
/// (`datetime(expires_at_us / 1e6, 'unixepoch')` shows them as timestamps). The record
/// states map onto the columns as: **In progress** `status = 0` with a lease deadline;
/// **Released** (the last attempt failed, claimable again) `status = 0` with
/// `lease_until_us IS NULL`; **Completed** `status = 1`. A row whose `expires_at_us`
/// has passed counts as absent and is deleted by [`purge_expired`](crate::store::admin::StoreAdmin::purge_expired).
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: Arc<Statements>,
    claims: common::ClaimGate,
    /// The one connection every write of this store (and of its clones) goes through,
    /// taken out of the pool at the first write (the pool may open a replacement).
    writer: Arc<Mutex<Option<SqliteConnection>>>,
    /// The largest token this store issued (see `write_claim`).
    last_token: Arc<AtomicI64>,
}

common::methods::sql_store!(SqliteStore, Sqlite, SqlitePool,
    write = execute,
    own = [writer, last_token],
    from_pool = {
        /// Uses the application's pool; the table `message_idempotent` must exist (call
        /// [`migrate`](Self::migrate) or create it by hand). Touches no schema. Set a
        /// busy timeout on the pool's options if other processes write to the same file.
    },
    with_table = {
        /// The same pool (and write gate) on another table: letters, digits and `_`,
        /// optionally qualified by one attached database name (`schema.table`). Touches no
        /// schema; a bad name is a [`StoreErrorKind::Rejected`] error.
    },
);

/// The primary result code of an SQLite error (its low byte).
pub(super) fn primary_code(e: &dyn DatabaseError) -> i64 {
    let code: i64 = e.code().and_then(|c| c.parse().ok()).unwrap_or(0);
    code & 0xff
}

/// The operation of opening the database of `options`, for errors.
fn opening(options: &SqliteConnectOptions) -> String {
    format!(
        "opening the SQLite database {}",
        options.get_filename().display()
    )
}

/// Opens one connection that switches the file to write-ahead logging. The switch takes
/// an exclusive lock SQLite's busy timeout does not wait for: a connection opening the
/// same new file at the same moment (another process starting, another store of this
/// one) gets `SQLITE_BUSY` at once, so this retries for up to
/// [`SqliteStore::BUSY_TIMEOUT`].
async fn switch_to_wal(options: &SqliteConnectOptions, op: &str) -> Result<(), StoreError> {
    use sqlx::Connection;
    let wal = options.clone().journal_mode(SqliteJournalMode::Wal);
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match SqliteConnection::connect_with(&wal).await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(sqlx::Error::Database(e))
                if primary_code(e.as_ref()) == 5
                    && started.elapsed() + pause < SqliteStore::BUSY_TIMEOUT =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(Sqlite::err(op)(e)),
        }
    }
}

impl SqliteStore {
    /// How long a connection opened by [`connect`](Self::connect) waits for another
    /// process's write lock before giving up.
    pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

    /// Opens the database at `url` (`sqlite://path/to/dedup.db?mode=rwc` creates the
    /// file if it is missing) in write-ahead-log mode with a busy timeout of
    /// [`BUSY_TIMEOUT`](Self::BUSY_TIMEOUT), and creates the table `message_idempotent` if it is
    /// missing. Write-ahead logging is a property of the file, switched on by the first
    /// `connect`; processes (or stores) opening one new file at the same moment wait for
    /// each other, up to [`BUSY_TIMEOUT`](Self::BUSY_TIMEOUT), rather than fail with
    /// `database is locked`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_table(url, DEFAULT_TABLE).await
    }

    /// Like [`connect`](Self::connect), on the table `table` (optionally qualified by
    /// an attached database name: `schema.table`).
    pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
        let table = TableName::parse(table)?;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(Sqlite::err("parsing the SQLite URL"))?
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Self::BUSY_TIMEOUT);
        let op = opening(&options);
        let dir = options
            .get_filename()
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(std::path::Path::to_path_buf);
        let explain = |e: StoreError| match &dir {
            // SQLite says only "unable to open database file"
            Some(dir) if !dir.is_dir() => StoreError::with_source(
                StoreErrorKind::Rejected,
                format!("{op}: the directory {} does not exist", dir.display()),
                e,
            ),
            _ => e,
        };
        // WAL is a property of the file: switched on once here, the pool's connections
        // find it on and never ask for the exclusive lock the switch takes
        switch_to_wal(&options, &op).await.map_err(explain)?;
        let pool = Self::open_pool(SqlitePoolOptions::new(), options)
            .await
            .map_err(explain)?;
        Self::open(pool, table).await
    }

    /// Opens a pool with the settings `pool` on `options` as [`connect`](Self::connect)
    /// opens its own, touching neither the schema nor the journal mode: the first
    /// connection is opened directly (bounded by the pool's acquire timeout), so a file
    /// that cannot be opened is an error at once, with the driver's error as its
    /// source. For [`from_pool`](Self::from_pool) with settings of one's own.
    pub async fn open_pool(
        pool: SqlitePoolOptions,
        options: SqliteConnectOptions,
    ) -> Result<SqlitePool, StoreError> {
        let op = opening(&options);
        common::open_pool(pool, options, &op).await
    }

    /// Creates the table and its expiry index if they are missing.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        for stmt in &self.sql.create {
            self.execute("creating the dedup table", sqlx::query(stmt.clone()))
                .await?;
        }
        Ok(())
    }

    /// The statements [`migrate`](Self::migrate) runs, for a DBA to review or run by
    /// hand: the `CREATE TABLE` and its index.
    pub fn schema(&self) -> Vec<String> {
        common::schema(&self.sql.create)
    }

    /// The writer connection, taken out of the pool if this is the first write.
    async fn writer(&self) -> Result<Writer<'_>, StoreError> {
        let mut slot = self.writer.lock().await;
        if slot.is_none() {
            let conn = self
                .pool
                .acquire()
                .await
                .map_err(Sqlite::err("opening the writer connection"))?;
            *slot = Some(conn.detach());
        }
        Ok(Writer(slot))
    }

    /// Runs one write statement on the writer connection.
    async fn execute(&self, op: &'static str, q: SqliteQuery<'_>) -> Result<u64, StoreError> {
        let mut w = self.writer().await?;
        let done = q.execute(w.conn()?).await;
        Ok(w.check(done).map_err(Sqlite::err(op))?.rows_affected())
    }

    /// One claim, once in the gate: a read and a conditional write until they answer.
    /// When no write is under way (the writer connection is open and free), both run
    /// on the writer, held for the claim: no pooled connection is taken, so none goes
    /// back to the pool, which pings every connection it gets back (one more call to
    /// that connection's thread per claim). Otherwise the read runs on a pooled
    /// connection, so that claims answered by their read (duplicates) never wait for
    /// writes.
    async fn claim_unguarded(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        if let Ok(slot) = self.writer.try_lock()
            && slot.is_some()
        {
            let mut w = Writer(slot);
            let done = async {
                let conn = w.conn()?;
                common::retrying!({
                    match Steps::<Sqlite>::plan_on(conn, &self.sql.steps, req).await? {
                        Plan::Answer(outcome) => Some(outcome),
                        plan => self.write_claim(conn, req, plan).await?,
                    }
                })
            }
            .await;
            return w.check_store(done);
        }
        let write = |plan| self.with_writer(async |conn| self.write_claim(conn, req, plan).await);
        Steps::claim_read_first(self, req, write).await
    }

    /// Runs `f` on the writer connection, dropping the connection when the error it
    /// fails with says it may have broken.
    async fn with_writer<T>(
        &self,
        f: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut w = self.writer().await?;
        let done = f(w.conn()?).await;
        w.check_store(done)
    }

    /// Makes a claim's conditional write on `conn` (the writer connection, locked, or
    /// a transaction on it). A new record's token is at least one more than the last
    /// token this store issued: the database clock has millisecond resolution, so a
    /// key forgotten and claimed again within one millisecond still gets a larger
    /// token.
    async fn write_claim(
        &self,
        conn: &mut SqliteConnection,
        req: &ClaimRequest<'_>,
        plan: Plan,
    ) -> Result<Option<ClaimOutcome>, StoreError> {
        let floor = self
            .last_token
            .load(AtomicOrdering::Relaxed)
            .saturating_add(1);
        let outcome = self
            .sql
            .write_claim(conn, req, plan, Some(floor), Sqlite::err("claim"))
            .await?;
        if let Some(ClaimOutcome::Acquired { token, .. }) = &outcome {
            self.last_token
                .fetch_max(token_param(*token), AtomicOrdering::Relaxed);
        }
        Ok(outcome)
    }
}

/// Whether an error leaves the writer connection unusable; it is then dropped and the
/// next write takes a fresh one from the pool.
fn broken(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed
    )
}

/// The writer connection, locked.
struct Writer<'a>(MutexGuard<'a, Option<SqliteConnection>>);

impl Writer<'_> {
    fn conn(&mut self) -> Result<&mut SqliteConnection, StoreError> {
        self.0
            .as_mut()
            .ok_or_else(|| StoreError::new(StoreErrorKind::Unavailable, "no writer connection"))
    }

    /// Passes a result through, dropping the connection when it may have broken.
    fn check_store<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &r
            && e.kind() == StoreErrorKind::Unavailable
        {
            *self.0 = None;
        }
        r
    }

    /// Passes a result through, dropping the connection when it broke.
    fn check<T>(&mut self, r: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if let Err(e) = &r
            && broken(e)
        {
            *self.0 = None;
        }
        r
    }
}
