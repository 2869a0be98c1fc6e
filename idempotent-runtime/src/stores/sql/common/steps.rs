//! The steps every SQL store takes alike, written once over the database's
//! [`SqlDialect`]: complete, release and renew (one compare-and-set on the owner token,
//! then the fence check, on the pool or on a connection of a transaction), inspect,
//! forget, purge, the scans, statistics and operator changes. Each store's `impl Store`
//! (written once, by [`sql_store!`](super::methods::sql_store)) calls them; claims and
//! batches, whose SQL differs per database, stay in the stores' folders.

use super::base::{
    BindExt, ClaimGate, PURGE_BATCH, SqlDialect, TableName, execute, micros, purge_in_batches, sql,
};
use super::row::{Columns, Owned, Plan, RowView, fence_of, read_row, retrying};
use super::scan::{self, Param, Stmt};
use crate::error::StoreError;
use crate::key::RecordKey;
use crate::store::scan::{AdminOutcome, ScanCursor, ScanFilter, ScanPage, ScopeStats};
use crate::store::{ClaimOutcome, ClaimRequest, Fence, Record};
use sqlx::query::Query;
use sqlx::{Database, Encode, Executor, Pool, SqlStr, Type};
use std::future::Future;
use std::marker::PhantomData;
use tokio::sync::SemaphorePermit;

/// A statement of the database `DB` with its parameters bound.
pub(crate) type SqlQuery<'q, DB> = Query<'q, DB, <DB as Database>::Arguments>;

/// The statements of the shared steps on one table, built once from the dialect:
/// every value in them is a bound parameter.
pub(crate) struct StepSql {
    pub(crate) table: TableName,
    /// The record's row (see [`SqlDialect::view`]) by key.
    pub(crate) read: SqlStr,
    pub(crate) complete: SqlStr,
    pub(crate) release: SqlStr,
    pub(crate) renew: SqlStr,
    pub(crate) forget: SqlStr,
    pub(crate) purge: SqlStr,
}

impl StepSql {
    pub(crate) fn new<D: SqlDialect>(table: TableName) -> Self {
        let t = table.quoted(D::QUOTE);
        let p = D::param;
        let now = D::now();
        let key = format!("scope = {} AND message_id = {}", p(1), p(2));
        StepSql {
            read: sql(D::select(
                &D::view("c."),
                &format!("{t} c"),
                &format!("c.scope = {} AND c.message_id = {}", p(1), p(2)),
            )),
            complete: sql(D::update(
                &t,
                &format!(
                    "status = 1, output = {}, lease_until_us = NULL, expires_at_us = {now} + {}",
                    p(4),
                    p(5)
                ),
                &D::owned(),
            )),
            release: sql(D::update(&t, "lease_until_us = NULL", &D::owned())),
            renew: sql(D::update(
                &t,
                &format!(
                    "lease_until_us = {now} + {lease}, \
                     expires_at_us = {}(expires_at_us, {now} + {lease})",
                    D::GREATEST,
                    lease = p(4)
                ),
                &D::owned(),
            )),
            forget: sql(format!("DELETE FROM {t} WHERE {key}")),
            purge: sql(D::purge(&t)),
            table,
        }
    }

    /// The read of `key`'s row.
    pub(crate) fn read_query<'q, D: SqlDialect>(&self, key: &'q RecordKey) -> SqlQuery<'q, D>
    where
        for<'a> SqlQuery<'a, D>: BindExt,
    {
        sqlx::query(self.read.clone()).bind_key(key)
    }

    /// The compare-and-set write `w` (matching the ownership clause of its key and
    /// token), its values bound in the order the dialect's placeholders take them.
    pub(crate) fn write_query<'q, D: SqlDialect>(&self, w: &Owned<'q>) -> SqlQuery<'q, D>
    where
        for<'a> SqlQuery<'a, D>: BindExt,
    {
        match *w {
            Owned::Complete(c) => {
                let q = sqlx::query(self.complete.clone());
                if D::NUMBERED {
                    q.bind_completion(&c)
                } else {
                    q.bind_output(&c).bind_owned(c.key, c.token)
                }
            }
            Owned::Release(r) => sqlx::query(self.release.clone()).bind_owned(r.key, r.token),
            Owned::Renew { key, token, lease } => {
                let q = sqlx::query(self.renew.clone());
                if D::NUMBERED {
                    q.bind_owned(key, token).bind_int(micros(lease))
                } else {
                    q.bind_int(micros(lease))
                        .bind_int(micros(lease))
                        .bind_owned(key, token)
                }
            }
        }
    }
}

/// What the shared steps need of a store: its pool, its statements, the gate of its
/// claims and how it runs a write.
pub(crate) trait SqlStore: Send + Sync {
    /// The database.
    type Db: SqlDialect;
    /// The pool reads run on.
    fn pool(&self) -> &Pool<Self::Db>;
    /// The statements of the shared steps.
    fn steps(&self) -> &StepSql;
    /// The gate every claim passes.
    fn claims(&self) -> &ClaimGate;
    /// Runs one write: the rows it matched. On the pool, unless the store writes
    /// through a connection of its own.
    fn write<'q>(
        &'q self,
        op: &'static str,
        q: SqlQuery<'q, Self::Db>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'q
    where
        for<'c> &'c mut <Self::Db as Database>::Connection: Executor<'c, Database = Self::Db>,
    {
        execute(self.pool(), q, Self::Db::err(op))
    }
}

/// The shared steps on the database `DB`, each taking the store it runs for.
pub(crate) struct Steps<DB>(PhantomData<DB>);

impl<DB> Steps<DB>
where
    DB: SqlDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Row: Columns,
    for<'a> SqlQuery<'a, DB>: BindExt,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    /// The row of `key`, checked; `None` when there is none.
    pub(crate) async fn read<S: SqlStore<Db = DB>>(
        s: &S,
        key: &RecordKey,
    ) -> Result<Option<RowView>, StoreError> {
        let q = s.steps().read_query(key);
        read_row(s.pool(), q, key.scope(), DB::err("reading a record")).await
    }

    /// Waits for a claim slot of `s` for the claims `reqs`, once the database can
    /// store their keys.
    pub(crate) async fn enter<'s, S: SqlStore<Db = DB>>(
        s: &'s S,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Option<SemaphorePermit<'s>>, StoreError> {
        reqs.iter().try_for_each(|r| DB::storable(r.key))?;
        Ok(s.claims().enter().await)
    }

    /// A claim that reads first (MySQL without its procedure, SQLite): the key's row,
    /// then what it plans ([`Plan::of`]): the answer, or the conditional write `write`
    /// (`None` when the row changed since the read), until it answers.
    #[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
    pub(crate) async fn claim_read_first<S, W, Fut>(
        s: &S,
        req: &ClaimRequest<'_>,
        write: W,
    ) -> Result<ClaimOutcome, StoreError>
    where
        S: SqlStore<Db = DB>,
        W: Fn(Plan) -> Fut,
        Fut: Future<Output = Result<Option<ClaimOutcome>, StoreError>>,
    {
        retrying!({
            match Plan::of(req, Self::read(s, req.key).await?) {
                Plan::Answer(outcome) => Some(outcome),
                plan => write(plan).await?,
            }
        })
    }

    /// The read of [`claim_read_first`](Self::claim_read_first) on the connection
    /// `conn`, which the caller holds for the claim (SQLite's writer connection when no
    /// write is under way): the key's row, then what the claim plans ([`Plan::of`]).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) async fn plan_on(
        conn: &mut DB::Connection,
        sql: &StepSql,
        req: &ClaimRequest<'_>,
    ) -> Result<Plan, StoreError> {
        let q = sql.read_query(req.key);
        let seen = read_row(conn, q, req.key.scope(), DB::err("reading a record")).await?;
        Ok(Plan::of(req, seen))
    }

    /// The compare-and-set write `w` (matching the ownership clause), then the fence
    /// check ([`fence_of`]) with the key's row read back.
    pub(crate) async fn apply<S: SqlStore<Db = DB>>(
        s: &S,
        w: Owned<'_>,
    ) -> Result<Fence, StoreError> {
        DB::storable(w.key())?;
        let rows = s.write(w.op(), s.steps().write_query(&w)).await?;
        fence_of(rows, &w, Self::read(s, w.key())).await
    }

    /// The record of `key`, if it is live.
    pub(crate) async fn inspect<S: SqlStore<Db = DB>>(
        s: &S,
        key: &RecordKey,
    ) -> Result<Option<Record>, StoreError> {
        DB::storable(key)?;
        Ok(Self::read(s, key).await?.and_then(RowView::into_record))
    }

    /// Deletes the record of `key`: whether there was one.
    pub(crate) async fn forget<S: SqlStore<Db = DB>>(
        s: &S,
        key: &RecordKey,
    ) -> Result<bool, StoreError> {
        DB::storable(key)?;
        let q = sqlx::query(s.steps().forget.clone()).bind_key(key);
        Ok(s.write("forget", q).await? > 0)
    }

    /// Deletes expired records, a batch per statement (a store that writes through one
    /// connection takes it per batch, so claims interleave with a long purge).
    pub(crate) async fn purge_expired<S: SqlStore<Db = DB>>(s: &S) -> Result<u64, StoreError> {
        purge_in_batches(|| {
            let q = sqlx::query(s.steps().purge.clone()).bind(PURGE_BATCH);
            s.write("purge_expired", q)
        })
        .await
    }

    /// Keyset pagination on `(scope, message_id)` with the filter in the `WHERE`
    /// clause.
    pub(crate) async fn scan<S: SqlStore<Db = DB>>(
        s: &S,
        filter: &ScanFilter,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let (stmt, limit) = scan::scan_stmt::<DB>(&s.steps().table, filter, cursor, limit)?;
        scan::scan_page(&Self::fetch(s, "scan", stmt).await?, limit)
    }

    /// One `GROUP BY` statement.
    pub(crate) async fn stats<S: SqlStore<Db = DB>>(
        s: &S,
        scope: Option<&str>,
        poisoned_at: Option<u32>,
    ) -> Result<Vec<ScopeStats>, StoreError> {
        let stmt = scan::stats_stmt::<DB>(&s.steps().table, scope, poisoned_at);
        scan::stats_of(&Self::fetch(s, "stats", stmt).await?, poisoned_at)
    }

    /// An operator change of one record (see [`scan::admin_stmt`]): `release` (In
    /// progress → Released) or `reset` (attempts back to zero).
    pub(crate) async fn admin<S: SqlStore<Db = DB>>(
        s: &S,
        key: &RecordKey,
        reset: bool,
    ) -> Result<AdminOutcome, StoreError> {
        let stmt = scan::admin_stmt::<DB>(&s.steps().table, key, reset);
        let op = if reset { "reset attempts" } else { "release" };
        let done = Self::query(stmt)
            .execute(s.pool())
            .await
            .map_err(DB::err(op))?;
        if DB::rows_affected(&done) > 0 {
            return Ok(AdminOutcome::Applied);
        }
        Ok(match Self::inspect(s, key).await? {
            Some(r) => AdminOutcome::Unchanged { state: r.state },
            None => AdminOutcome::NotFound,
        })
    }

    /// The rows of `stmt`, read on the pool; `op` names it in errors.
    async fn fetch<S: SqlStore<Db = DB>>(
        s: &S,
        op: &str,
        stmt: Stmt<DB>,
    ) -> Result<Vec<DB::Row>, StoreError> {
        Self::query(stmt)
            .fetch_all(s.pool())
            .await
            .map_err(DB::err(op))
    }

    /// `stmt` as a query with its parameters bound.
    fn query(stmt: Stmt<DB>) -> SqlQuery<'static, DB> {
        let mut q = sqlx::query::<DB>(sql(stmt.text));
        for p in stmt.params {
            q = match p {
                Param::Text(s) => q.bind(s),
                Param::Bytes(b) => q.bind(b),
                Param::Int(i) => q.bind(i),
            };
        }
        q
    }

    /// The compare-and-set write `w` with the statements `sql` on `conn`, then the
    /// fence check ([`fence_of`]) with its row read on the same connection; `op` names
    /// the step in errors.
    pub(crate) async fn apply_in(
        conn: &mut DB::Connection,
        sql: &StepSql,
        op: &str,
        w: Owned<'_>,
    ) -> Result<Fence, StoreError> {
        let rows = execute(&mut *conn, sql.write_query(&w), DB::err(op)).await?;
        let read = read_row(
            &mut *conn,
            sql.read_query(w.key()),
            w.key().scope(),
            DB::err(op),
        );
        fence_of(rows, &w, read).await
    }
}
