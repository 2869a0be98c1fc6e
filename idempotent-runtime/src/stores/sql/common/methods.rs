//! What every SQL store has alike besides its steps: the accessors and the background
//! sweeper.

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
                self.sql.steps.table.display()
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
                    .field("table", &self.sql.steps.table)
                    .field("pool", &self.pool)
                    .finish()
            }
        }
    };
}
pub(crate) use store_accessors;
