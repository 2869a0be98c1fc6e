//! The claim a running body sees through [`current_claim`].

use crate::store::Token;
use std::borrow::Cow;

/// The claim under which the current handler runs; see [`current_claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claim {
    /// The handler's scope.
    pub scope: Cow<'static, str>,
    /// The fencing token of this claim: strictly greater than the token of every earlier
    /// claim of the same key, so downstream writes can be fenced with it.
    pub token: Token,
    /// 1 on the first attempt, 2 on the first retry, …
    pub attempt: u32,
}

impl Claim {
    /// Whether an earlier attempt on this key failed, crashed or was cancelled.
    pub fn is_retry(&self) -> bool {
        self.attempt > 1
    }
}

tokio::task_local! {
    pub(crate) static CURRENT_CLAIM: Claim;
}

/// The claim the calling handler runs under, or `None` outside an idempotent handler
/// (and when deduplication is disabled or skipped by `on_store_error = "process"`).
///
/// ```
/// use idempotent_runtime::{current_claim, idempotent, Error};
///
/// #[idempotent(key = "id")]
/// async fn handle(id: &str) -> Result<u32, Error> {
///     let claim = current_claim().expect("runs under a claim");
///     Ok(claim.attempt)
/// }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// assert_eq!(handle("m-1").await.unwrap(), 1);
/// # });
/// ```
pub fn current_claim() -> Option<Claim> {
    CURRENT_CLAIM.try_with(Claim::clone).ok()
}
