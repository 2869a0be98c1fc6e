//! What every SQL store has alike besides its statements: the accessors, the scan
//! and operator methods forwarded to [`common::scan`](crate::stores::sql::common::scan), and the
//! background sweeper.

use crate::error::StoreError;
use crate::error::StoreErrorKind;
use crate::store::admin::StoreAdmin;
use std::future::Future;
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

/// The methods every SQL store has alike (`pool`, `table`, `spawn_sweeper`) and its
/// `Debug`, for a store type with the fields `pool` (of type `$pool`) and `sql` (its
/// statements, which know the table).
macro_rules! store_accessors {
    ($store:ident, $pool:ty) => {
        impl $store {
            /// The pool this store uses.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// The table name, as given.
            pub fn table(&self) -> String {
                self.sql.table.display()
            }

            /// Spawns a task that deletes expired records every `every`
            /// (see [`purge_expired`](StoreAdmin::purge_expired)); abort the returned handle to stop
            /// it. Fails outside a Tokio runtime.
            pub fn spawn_sweeper(
                &self,
                every: std::time::Duration,
            ) -> Result<tokio::task::JoinHandle<()>, StoreError> {
                $crate::stores::sql::common::methods::spawn_sweeper(self.clone(), every)
            }
        }

        impl std::fmt::Debug for $store {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($store))
                    .field("table", &self.sql.table)
                    .field("pool", &self.pool)
                    .finish()
            }
        }
    };
}
pub(crate) use store_accessors;

/// The [`StoreAdmin`] methods every SQL store forwards to [`common::scan`](crate::stores::sql::common::scan) alike
/// (`scan`, `stats`, `force_release`, `reset_attempts`), for the `impl StoreAdmin` of a store
/// type with the field `pool` and the method `table`. Written as `#[async_trait]` writes
/// them (it does not see into a macro's output), so the signatures match the trait's.
macro_rules! scan_methods {
    () => {
        /// Keyset pagination on `(scope, message_id)` with the filter in the `WHERE`
        /// clause.
        fn scan<'life0, 'life1, 'life2, 'async_trait>(
            &'life0 self,
            filter: &'life1 $crate::store::scan::ScanFilter,
            cursor: Option<&'life2 $crate::store::scan::ScanCursor>,
            limit: usize,
        ) -> $crate::stores::sql::common::methods::StoreFuture<'async_trait, $crate::store::scan::ScanPage>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            'life2: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                $crate::stores::sql::common::scan::scan(&self.pool, &self.table(), filter, cursor, limit).await
            })
        }

        /// One `GROUP BY` statement.
        fn stats<'life0, 'life1, 'async_trait>(
            &'life0 self,
            scope: Option<&'life1 str>,
            poisoned_at: Option<u32>,
        ) -> $crate::stores::sql::common::methods::StoreFuture<'async_trait, Vec<$crate::store::scan::ScopeStats>>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                $crate::stores::sql::common::scan::stats(&self.pool, &self.table(), scope, poisoned_at).await
            })
        }

        $crate::stores::sql::common::methods::scan_methods!(admin force_release, false);
        $crate::stores::sql::common::methods::scan_methods!(admin reset_attempts, true);
    };
    (admin $name:ident, $reset:literal) => {
        fn $name<'life0, 'life1, 'async_trait>(
            &'life0 self,
            key: &'life1 $crate::key::RecordKey,
        ) -> $crate::stores::sql::common::methods::StoreFuture<'async_trait, $crate::store::scan::AdminOutcome>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                $crate::stores::sql::common::scan::admin(self, &self.pool, &self.table(), key, $reset).await
            })
        }
    };
}
pub(crate) use scan_methods;

/// The future a [`StoreAdmin`] method returns, as `#[async_trait]` writes it.
pub(crate) type StoreFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;
