//! Cleanup of a claim whose handler future is dropped before the protocol finished.

use super::handle::{Scope, StoreAt};
use super::telemetry::{Outcome, record};
use crate::key::RecordKey;
use crate::store::{self, Completion, Release, Token};
use std::time::Duration;

/// What a dropped (cancelled) handler future leaves behind, and how to clean it up.
pub(crate) enum Pending {
    /// Nothing: the protocol finished.
    Nothing,
    /// The body was running: release the claim so a redelivery can retry at once.
    Release,
    /// The body succeeded but its completion was not recorded yet: record it, so the
    /// work that happened is not run again.
    Complete {
        output: Option<Vec<u8>>,
        ttl: Duration,
    },
}

/// Cleans up a claim whose handler future is dropped before the protocol finished.
pub(crate) struct CancelGuard<'a> {
    store: StoreAt<'a>,
    key: &'a RecordKey,
    scope: Scope<'a>,
    token: Token,
    pub(crate) pending: Pending,
}

impl<'a> CancelGuard<'a> {
    /// A guard that releases the claim if dropped before [`disarm`](Self::disarm).
    pub(crate) fn new(
        store: StoreAt<'a>,
        key: &'a RecordKey,
        scope: Scope<'a>,
        token: Token,
    ) -> Self {
        CancelGuard {
            store,
            key,
            scope,
            token,
            pending: Pending::Release,
        }
    }

    /// From now on a drop records this completion instead of releasing.
    pub(crate) fn completing(&mut self, output: Option<Vec<u8>>, ttl: Duration) {
        self.pending = Pending::Complete { output, ttl };
    }

    /// The protocol finished; nothing to clean up.
    pub(crate) fn disarm(&mut self) {
        self.pending = Pending::Nothing;
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        let pending = std::mem::replace(&mut self.pending, Pending::Nothing);
        if matches!(pending, Pending::Nothing) {
            return;
        }
        record(Outcome::Cancelled, self.scope);
        // Without a runtime to run the cleanup on, the lease expires on its own.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.to_handle();
        let key = self.key.clone();
        let token = self.token;
        rt.spawn(async move {
            let store = store.get();
            let r = match pending {
                Pending::Complete { output, ttl } => {
                    let c = Completion {
                        key: &key,
                        token,
                        output: output.as_deref(),
                        ttl,
                    };
                    store::complete(store, &c).await
                }
                _ => {
                    let r = Release { key: &key, token };
                    store::release(store, &r).await
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not clean up a cancelled claim; it frees when its lease expires");
            }
        });
    }
}
