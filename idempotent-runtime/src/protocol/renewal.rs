//! The lease renewal of a running body.

use super::claim::{CURRENT_CLAIM, Claim};
use crate::key::RecordKey;
use crate::store::{Fence, Store, Token};
use futures_util::FutureExt;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

async fn renew_loop(store: &dyn Store, key: &RecordKey, token: Token, lease: Duration) {
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        match store.renew(key, token, lease).await {
            Ok(Fence::Held) => {}
            Ok(Fence::Lost) => {
                tracing::error!(
                    scope = key.scope(),
                    "lease lost while the handler runs: another execution may have taken the key over"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed; retrying at the next tick");
            }
        }
    }
}

/// The lease renewal of a running body, every third of the lease. It starts when the
/// body first yields: a handler that finishes at once never arms a timer, and its
/// future does not carry one.
pub(crate) struct Renewal<'a> {
    store: &'a dyn Store,
    key: &'a RecordKey,
    token: Token,
    lease: Duration,
    state: RenewalState<'a>,
}

enum RenewalState<'a> {
    NotStarted,
    Running(Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
    /// The lease was lost: nothing more to renew.
    Stopped,
}

impl<'a> Renewal<'a> {
    pub(crate) fn new(
        store: &'a dyn Store,
        key: &'a RecordKey,
        token: Token,
        lease: Duration,
    ) -> Self {
        Renewal {
            store,
            key,
            token,
            lease,
            state: RenewalState::NotStarted,
        }
    }

    /// Drives the renewal while the body is pending.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) {
        if let RenewalState::NotStarted = self.state {
            self.state = RenewalState::Running(Box::pin(renew_loop(
                self.store, self.key, self.token, self.lease,
            )));
        }
        if let RenewalState::Running(f) = &mut self.state
            && f.as_mut().poll(cx).is_ready()
        {
            self.state = RenewalState::Stopped;
        }
    }
}

/// Runs the body under `claim`: visible to [`current_claim`], with the lease renewed
/// every third of it, and panics caught.
pub(crate) async fn run_body<T, E, Fut>(
    store: &dyn Store,
    key: &RecordKey,
    claim: Claim,
    lease: Duration,
    body: Fut,
) -> std::thread::Result<Result<T, E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut renewal = Renewal::new(store, key, claim.token, lease);
    let mut body = pin!(CURRENT_CLAIM.scope(claim, AssertUnwindSafe(body).catch_unwind()));
    poll_fn(|cx| match body.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => {
            renewal.poll(cx);
            Poll::Pending
        }
    })
    .await
}
