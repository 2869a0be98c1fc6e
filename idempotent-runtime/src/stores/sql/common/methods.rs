//! What every SQL store has alike besides the steps themselves: the accessors, the
//! background sweeper and the store traits' implementations ([`sql_store!`]).

use crate::error::StoreError;
use crate::error::StoreErrorKind;
use crate::store::admin::StoreAdmin;
use std::time::Duration;

/// Spawns a task that calls [`StoreAdmin::purge_expired`] every `every`; fails when called
/// outside a Tokio runtime.
pub(crate) fn spawn_sweeper<S>(
    store: S,
    every: Duration,
) -> Result<tokio::task::JoinHandle<()>, StoreError>
where
    S: StoreAdmin + 'static,
{
    let rt = tokio::runtime::Handle::try_current().map_err(|e| {
        StoreError::with_source(
            StoreErrorKind::Rejected,
            "the sweeper must be spawned from within a Tokio runtime",
            e,
        )
    })?;
    let every = every.max(Duration::from_millis(1));
    Ok(rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match store.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "purged expired idempotency records"),
                Err(e) => tracing::warn!(error = %e, "purging expired idempotency records failed"),
            }
        }
    }))
}

/// What every SQL store has alike, for a store type `$store` on the database `$db`
/// with the fields `pool` (of type `$pool`), `sql` (its statements, built by
/// `Statements::new` from the table name, the shared ones as `sql.steps`), `claims`
/// (its [`ClaimGate`](super::base::ClaimGate)) and `own` (fields of its own, each
/// starting from its `Default`): the constructors `new`, `from_pool` and `with_table`
/// (documented by the caller) and, for a server, `open_pool`; the methods `pool`,
/// `table` and `spawn_sweeper`, its `Debug`, its [`SqlStore`](super::steps::SqlStore)
/// (writing on the pool, or with its method `$write`), and its `Store` and
/// `StoreAdmin`, whose steps are the shared ones ([`Steps`](super::steps::Steps)). Its
/// claims and batches are its own: the methods `claim_unguarded` (one claim, once in
/// the gate), `claim_many` (a batch of claims, once in the gate) and `apply_many` (an
/// [`OwnedBatch`](super::row::OwnedBatch) of completions or of releases).
macro_rules! sql_store {
    (
        $store:ident, $db:ty, $pool:ty
        $(, write = $write:ident)?
        $(, own = [$($own:ident),*])?
        $(, open_pool = ($pool_options:ty, $options:ty, $connecting:literal))?,
        from_pool = {$(#[$from_pool:meta])*},
        with_table = {$(#[$with_table:meta])*} $(,)?
    ) => {
        // the steps of a claim's owner, one line each: the step and its batch, the
        // item they take, and the `Owned` step it is
        $crate::stores::sql::common::methods::sql_store!(
            @impl $store, $db, $pool, [$($write)?],
            [complete, complete_batch, Completion, Complete],
            [release, release_batch, Release, Release]
        );

        impl $store {
            /// The store on `pool` and `table`, with a fresh gate of claims.
            fn new(pool: $pool, table: $crate::stores::sql::common::base::TableName) -> Self {
                $store {
                    claims: $crate::stores::sql::common::base::ClaimGate::for_pool(&pool),
                    pool,
                    sql: std::sync::Arc::new(Statements::new(table)),
                    $($($own: Default::default(),)*)?
                }
            }

            /// The store on `pool` and `table`, whose table and index it creates if they
            /// are missing.
            async fn open(
                pool: $pool,
                table: $crate::stores::sql::common::base::TableName,
            ) -> Result<Self, $crate::error::StoreError> {
                let store = Self::new(pool, table);
                store.migrate().await?;
                Ok(store)
            }

            $(#[$from_pool])*
            pub fn from_pool(pool: $pool) -> Self {
                Self::new(pool, $crate::stores::sql::common::base::TableName::default_table())
            }

            $(#[$with_table])*
            pub fn with_table(mut self, table: &str) -> Result<Self, $crate::error::StoreError> {
                let table = $crate::stores::sql::common::base::TableName::parse(table)?;
                self.sql = std::sync::Arc::new(Statements::new(table));
                Ok(self)
            }

            $(
                /// Opens a pool with the settings `pool` on `options` as
                /// [`connect`](Self::connect) opens its own, touching no schema: the first
                /// connection is opened directly (bounded by the pool's acquire timeout), so
                /// a refused connection, a bad password or an unknown host is an error at
                /// once, with the driver's error as its source (kind
                /// [`StoreErrorKind::Unavailable`](crate::error::StoreErrorKind::Unavailable)
                /// for a server that cannot be reached), rather than the pool's timeout
                /// after it has retried for the whole acquire timeout. The pool does not
                /// ping a connection before each use. For [`from_pool`](Self::from_pool)
                /// with pool settings of one's own.
                pub async fn open_pool(
                    pool: $pool_options,
                    options: $options,
                ) -> Result<$pool, $crate::error::StoreError> {
                    $crate::stores::sql::common::base::open_pool(pool, options, $connecting).await
                }
            )?
        }
    };
    (
        @impl $store:ident, $db:ty, $pool:ty, [$($write:ident)?],
        $([$step:ident, $batch:ident, $item:ident, $owned:ident]),*
    ) => {
        impl $store {
            /// The pool this store uses.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// The table name, as given.
            pub fn table(&self) -> String {
                self.sql.steps.table.display()
            }

            /// Spawns a task that deletes expired records every `every`
            /// (see [`purge_expired`](crate::store::admin::StoreAdmin::purge_expired)); abort the returned handle to stop
            /// it. Fails outside a Tokio runtime.
            pub fn spawn_sweeper(
                &self,
                every: std::time::Duration,
            ) -> Result<tokio::task::JoinHandle<()>, $crate::error::StoreError> {
                $crate::stores::sql::common::methods::spawn_sweeper(self.clone(), every)
            }
        }

        impl std::fmt::Debug for $store {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($store))
                    .field("table", &self.sql.steps.table)
                    .field("pool", &self.pool)
                    .finish()
            }
        }

        impl $crate::stores::sql::common::steps::SqlStore for $store {
            type Db = $db;

            fn pool(&self) -> &$pool {
                &self.pool
            }

            fn steps(&self) -> &$crate::stores::sql::common::steps::StepSql {
                &self.sql.steps
            }

            fn claims(&self) -> &$crate::stores::sql::common::base::ClaimGate {
                &self.claims
            }

            $(
                fn write<'q>(
                    &'q self,
                    op: &'static str,
                    q: $crate::stores::sql::common::steps::SqlQuery<'q, $db>,
                ) -> impl std::future::Future<Output = Result<u64, $crate::error::StoreError>>
                       + Send
                       + 'q {
                    self.$write(op, q)
                }
            )?
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn claim(
                &self,
                req: &$crate::store::ClaimRequest<'_>,
            ) -> Result<$crate::store::ClaimOutcome, $crate::error::StoreError> {
                let reqs = std::slice::from_ref(req);
                let _slot = $crate::stores::sql::common::steps::Steps::enter(self, reqs).await?;
                self.claim_unguarded(req).await
            }

            $(
                async fn $step(
                    &self,
                    item: &$crate::store::$item<'_>,
                ) -> Result<$crate::store::Fence, $crate::error::StoreError> {
                    let w = $crate::stores::sql::common::row::Owned::$owned(*item);
                    $crate::stores::sql::common::steps::Steps::apply(self, w).await
                }

                async fn $batch(
                    &self,
                    items: &[$crate::store::$item<'_>],
                ) -> Result<Vec<$crate::store::Fence>, $crate::error::StoreError> {
                    let batch = $crate::stores::sql::common::row::OwnedBatch::new::<$db, _>(
                        stringify!($batch),
                        items,
                        $crate::stores::sql::common::row::Owned::$owned,
                    )?;
                    self.apply_many(&batch).await
                }
            )*

            async fn renew(
                &self,
                key: &$crate::key::RecordKey,
                token: $crate::store::Token,
                lease: std::time::Duration,
            ) -> Result<$crate::store::Fence, $crate::error::StoreError> {
                let w = $crate::stores::sql::common::row::Owned::Renew { key, token, lease };
                $crate::stores::sql::common::steps::Steps::apply(self, w).await
            }

            async fn claim_batch(
                &self,
                reqs: &[$crate::store::ClaimRequest<'_>],
            ) -> Result<Vec<$crate::store::ClaimOutcome>, $crate::error::StoreError> {
                let _slot = $crate::stores::sql::common::steps::Steps::enter(self, reqs).await?;
                self.claim_many(reqs).await
            }

            fn as_admin(&self) -> Option<&dyn $crate::store::admin::StoreAdmin> {
                Some(self)
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::admin::StoreAdmin for $store {
            async fn inspect(
                &self,
                key: &$crate::key::RecordKey,
            ) -> Result<Option<$crate::store::Record>, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::inspect(self, key).await
            }

            async fn forget(
                &self,
                key: &$crate::key::RecordKey,
            ) -> Result<bool, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::forget(self, key).await
            }

            async fn purge_expired(&self) -> Result<u64, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::purge_expired(self).await
            }

            async fn scan(
                &self,
                filter: &$crate::store::scan::ScanFilter,
                cursor: Option<&$crate::store::scan::ScanCursor>,
                limit: usize,
            ) -> Result<$crate::store::scan::ScanPage, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::scan(self, filter, cursor, limit).await
            }

            async fn stats(
                &self,
                scope: Option<&str>,
                poisoned_at: Option<u32>,
            ) -> Result<Vec<$crate::store::scan::ScopeStats>, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::stats(self, scope, poisoned_at).await
            }

            async fn force_release(
                &self,
                key: &$crate::key::RecordKey,
            ) -> Result<$crate::store::scan::AdminOutcome, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::admin(self, key, false).await
            }

            async fn reset_attempts(
                &self,
                key: &$crate::key::RecordKey,
            ) -> Result<$crate::store::scan::AdminOutcome, $crate::error::StoreError> {
                $crate::stores::sql::common::steps::Steps::admin(self, key, true).await
            }
        }
    };
}
pub(crate) use sql_store;
