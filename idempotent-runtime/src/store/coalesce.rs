//! Coalesced store calls, a group commit: [`Coalesced`] sends the single claims,
//! completions and releases that arrive while a call of the same step is in flight
//! to the inner store together, as one batch call, when that call returns.
//!
//! Inside, each kind of step has a lane. A step that finds its lane idle is sent at
//! once, as the single call it is, and copies nothing: a lone message waits for no
//! timer. A step that finds a call in flight queues an owned copy of its request and
//! waits. When the call in flight returns, the queued steps (up to 128, at most one
//! per record key, so that two steps of one key keep their order) go as one batch
//! call, made by the first of their callers; the others get their own answers from
//! it. Each answer, fence and error is the one the batch method gives for that step,
//! which is the one its single call would give.

use super::admin::StoreAdmin;
use super::types::{ClaimOutcome, ClaimRequest, Completion, Fence, Release, Token};
use super::{ImmediateStore, Store};
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use async_trait::async_trait;
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

/// The most steps one batch call carries.
pub(crate) const MAX_BATCH: usize = 128;

/// A request of a lane, owned so that it can wait in the queue of another task's call.
pub(crate) trait Queued: Send + 'static {
    /// The record the step is about.
    fn key(&self) -> &RecordKey;
}

/// What a queued step gets back: its answer, or the turn to make the next batch call.
enum Message<Q: Queued, A: Send + 'static> {
    Answer(Result<A, StoreError>),
    Lead(Leadership<Q, A>),
}

struct Waiter<Q: Queued, A: Send + 'static> {
    req: Q,
    tx: oneshot::Sender<Message<Q, A>>,
}

/// The queue of one kind of step, and whether a call of that kind is in flight.
struct State<Q: Queued, A: Send + 'static> {
    busy: bool,
    queue: Vec<Waiter<Q, A>>,
}

/// One kind of step's calls to a store, coalesced. Cheap to clone (one `Arc`).
pub(crate) struct Lane<Q: Queued, A: Send + 'static> {
    state: Arc<Mutex<State<Q, A>>>,
}

impl<Q: Queued, A: Send + 'static> Clone for Lane<Q, A> {
    fn clone(&self) -> Self {
        Lane {
            state: Arc::clone(&self.state),
        }
    }
}

impl<Q: Queued, A: Send + 'static> Default for Lane<Q, A> {
    fn default() -> Self {
        Lane {
            state: Arc::new(Mutex::new(State {
                busy: false,
                queue: Vec::new(),
            })),
        }
    }
}

impl<Q: Queued, A: Send + 'static> std::fmt::Debug for Lane<Q, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Lane")
            .field("busy", &st.busy)
            .field("queued", &st.queue.len())
            .finish()
    }
}

/// The turn to make a batch call for `own` and `others`: whoever holds it hands the
/// lane on when done, or when it is dropped unused (its task was cancelled before it
/// read it).
struct Leadership<Q: Queued, A: Send + 'static> {
    lane: Option<Lane<Q, A>>,
    own: Option<Q>,
    others: Vec<Waiter<Q, A>>,
}

impl<Q: Queued, A: Send + 'static> Drop for Leadership<Q, A> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            // never used: the others go back to the front of the queue, in order
            let others = std::mem::take(&mut self.others);
            lane.hand_on(others);
        }
    }
}

/// The lane's turn held by the caller making a call; handing on when dropped.
struct Turn<'a, Q: Queued, A: Send + 'static>(&'a Lane<Q, A>);

impl<Q: Queued, A: Send + 'static> Drop for Turn<'_, Q, A> {
    fn drop(&mut self) {
        self.0.hand_on(Vec::new());
    }
}

impl<Q: Queued, A: Send + 'static> Lane<Q, A> {
    /// Runs one step: `single()` at once if the lane is idle; otherwise queues
    /// `owned()` and waits for its answer from a batch call, or for the turn to make
    /// one with `batch`.
    pub(crate) async fn run<S, B>(
        &self,
        owned: impl FnOnce() -> Q,
        single: impl FnOnce() -> S,
        batch: impl FnOnce(Vec<Q>) -> B,
    ) -> Result<A, StoreError>
    where
        S: Future<Output = Result<A, StoreError>>,
        B: Future<Output = Result<Vec<A>, StoreError>>,
    {
        let rx = {
            let mut st = self.lock();
            if !st.busy {
                st.busy = true;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.queue.push(Waiter { req: owned(), tx });
                Some(rx)
            }
        };
        let Some(rx) = rx else {
            let _turn = Turn(self);
            return single().await;
        };
        match rx.await {
            Ok(Message::Answer(answer)) => answer,
            Ok(Message::Lead(mut lead)) => {
                lead.lane = None;
                let _turn = Turn(self);
                let own = lead.own.take().expect("a leadership carries its own step");
                let others = std::mem::take(&mut lead.others);
                Self::lead(own, others, batch).await
            }
            Err(_) => Err(cancelled()),
        }
    }

    /// Makes the batch call of `own` (first) and `others`, answers the others and
    /// returns the answer of `own`.
    async fn lead<B>(
        own: Q,
        others: Vec<Waiter<Q, A>>,
        batch: impl FnOnce(Vec<Q>) -> B,
    ) -> Result<A, StoreError>
    where
        B: Future<Output = Result<Vec<A>, StoreError>>,
    {
        let mut reqs = Vec::with_capacity(others.len() + 1);
        reqs.push(own);
        let mut txs = Vec::with_capacity(others.len());
        for w in others {
            reqs.push(w.req);
            txs.push(w.tx);
        }
        let n = reqs.len();
        match batch(reqs).await {
            Ok(answers) if answers.len() == n => {
                let mut answers = answers.into_iter();
                let own = answers.next().expect("one answer per step");
                for (tx, a) in txs.into_iter().zip(answers) {
                    // a caller that went away needs no answer
                    let _ = tx.send(Message::Answer(Ok(a)));
                }
                Ok(own)
            }
            Ok(answers) => {
                let e = || {
                    StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!(
                            "the store answered a batch of {n} steps with {} answers",
                            answers.len()
                        ),
                    )
                };
                for tx in txs {
                    let _ = tx.send(Message::Answer(Err(e())));
                }
                Err(e())
            }
            Err(e) => {
                let shared = Arc::new(e);
                for tx in txs {
                    let _ = tx.send(Message::Answer(Err(shared_error(&shared))));
                }
                // the others hold their clones only until they are dropped or read
                Err(match Arc::try_unwrap(shared) {
                    Ok(e) => e,
                    Err(shared) => shared_error(&shared),
                })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<Q, A>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends a call: `front` (steps of an unused leadership) goes back to the front of
    /// the queue; the queued steps of callers still waiting, up to [`MAX_BATCH`] and
    /// one per key, go to the first of them as the turn to make the next call; with
    /// none, the lane is idle.
    fn hand_on(&self, front: Vec<Waiter<Q, A>>) {
        let mut st = self.lock();
        if !front.is_empty() {
            let rest = std::mem::replace(&mut st.queue, front);
            st.queue.extend(rest);
        }
        loop {
            st.queue.retain(|w| !w.tx.is_closed());
            if st.queue.is_empty() {
                st.busy = false;
                return;
            }
            let mut keys = HashSet::new();
            let mut picked = Vec::new();
            let mut left = Vec::new();
            for w in st.queue.drain(..) {
                if picked.len() < MAX_BATCH && keys.insert(w.req.key().clone()) {
                    picked.push(w);
                } else {
                    left.push(w);
                }
            }
            st.queue = left;
            let mut picked = picked.into_iter();
            let first = picked.next().expect("the queue is not empty");
            let lead = Leadership {
                lane: Some(self.clone()),
                own: Some(first.req),
                others: picked.collect(),
            };
            match first.tx.send(Message::Lead(lead)) {
                // the call in flight is the first caller's now
                Ok(()) => return,
                Err(Message::Lead(mut lead)) => {
                    // that caller went away just now: the others go back, in order
                    lead.lane = None;
                    let others = std::mem::take(&mut lead.others);
                    let rest = std::mem::replace(&mut st.queue, others);
                    st.queue.extend(rest);
                }
                Err(Message::Answer(_)) => unreachable!("a leadership was sent"),
            }
        }
    }
}

fn cancelled() -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        "the batch call that carried this step was cancelled with the task that made it; \
         the step may or may not have been applied",
    )
}

/// An error of a batch call, as each of its steps gets it.
fn shared_error(e: &Arc<StoreError>) -> StoreError {
    StoreError::with_source(e.kind(), e.to_string(), SharedError(Arc::clone(e)))
}

/// A batch call's error, shared by the steps it carried.
#[derive(Debug)]
struct SharedError(Arc<StoreError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// A claim, owned.
pub(crate) struct OwnedClaim {
    key: RecordKey,
    lease: Duration,
    ttl: Duration,
    fingerprint: Option<Box<[u8]>>,
    max_attempts: Option<u32>,
}

impl OwnedClaim {
    pub(crate) fn new(req: &ClaimRequest<'_>) -> Self {
        OwnedClaim {
            key: req.key.clone(),
            lease: req.lease,
            ttl: req.ttl,
            fingerprint: req.fingerprint.map(Box::from),
            max_attempts: req.max_attempts,
        }
    }

    pub(crate) fn request(&self) -> ClaimRequest<'_> {
        ClaimRequest {
            key: &self.key,
            lease: self.lease,
            ttl: self.ttl,
            fingerprint: self.fingerprint.as_deref(),
            max_attempts: self.max_attempts,
        }
    }
}

impl Queued for OwnedClaim {
    fn key(&self) -> &RecordKey {
        &self.key
    }
}

/// A completion, owned.
pub(crate) struct OwnedCompletion {
    key: RecordKey,
    token: Token,
    output: Option<Box<[u8]>>,
    ttl: Duration,
}

impl OwnedCompletion {
    pub(crate) fn new(c: &Completion<'_>) -> Self {
        OwnedCompletion {
            key: c.key.clone(),
            token: c.token,
            output: c.output.map(Box::from),
            ttl: c.ttl,
        }
    }

    pub(crate) fn completion(&self) -> Completion<'_> {
        Completion {
            key: &self.key,
            token: self.token,
            output: self.output.as_deref(),
            ttl: self.ttl,
        }
    }
}

impl Queued for OwnedCompletion {
    fn key(&self) -> &RecordKey {
        &self.key
    }
}

/// A release, owned.
pub(crate) struct OwnedRelease {
    key: RecordKey,
    token: Token,
}

impl OwnedRelease {
    pub(crate) fn new(r: &Release<'_>) -> Self {
        OwnedRelease {
            key: r.key.clone(),
            token: r.token,
        }
    }

    pub(crate) fn release(&self) -> Release<'_> {
        Release {
            key: &self.key,
            token: self.token,
        }
    }
}

impl Queued for OwnedRelease {
    fn key(&self) -> &RecordKey {
        &self.key
    }
}

/// The three lanes of a store's single steps.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lanes {
    claims: Lane<OwnedClaim, ClaimOutcome>,
    completions: Lane<OwnedCompletion, Fence>,
    releases: Lane<OwnedRelease, Fence>,
}

impl Lanes {
    /// [`Store::claim`] of `store`, coalesced into [`Store::claim_batch`].
    pub(crate) async fn claim<S: Store + ?Sized>(
        &self,
        store: &S,
        req: &ClaimRequest<'_>,
    ) -> Result<ClaimOutcome, StoreError> {
        self.claims
            .run(
                || OwnedClaim::new(req),
                || store.claim(req),
                async |owned: Vec<OwnedClaim>| {
                    let reqs: Vec<_> = owned.iter().map(OwnedClaim::request).collect();
                    store.claim_batch(&reqs).await
                },
            )
            .await
    }

    /// [`Store::complete`] of `store`, coalesced into [`Store::complete_batch`].
    pub(crate) async fn complete<S: Store + ?Sized>(
        &self,
        store: &S,
        c: &Completion<'_>,
    ) -> Result<Fence, StoreError> {
        self.completions
            .run(
                || OwnedCompletion::new(c),
                || store.complete(c),
                async |owned: Vec<OwnedCompletion>| {
                    let items: Vec<_> = owned.iter().map(OwnedCompletion::completion).collect();
                    store.complete_batch(&items).await
                },
            )
            .await
    }

    /// [`Store::release`] of `store`, coalesced into [`Store::release_batch`].
    pub(crate) async fn release<S: Store + ?Sized>(
        &self,
        store: &S,
        r: &Release<'_>,
    ) -> Result<Fence, StoreError> {
        self.releases
            .run(
                || OwnedRelease::new(r),
                || store.release(r),
                async |owned: Vec<OwnedRelease>| {
                    let items: Vec<_> = owned.iter().map(OwnedRelease::release).collect();
                    store.release_batch(&items).await
                },
            )
            .await
    }
}

/// A store whose single claims, completions and releases are coalesced: those that
/// arrive while a call of the same step is in flight go to the inner store together,
/// as one [`claim_batch`](Store::claim_batch), [`complete_batch`](Store::complete_batch)
/// or [`release_batch`](Store::release_batch) call, when it returns (a group commit).
///
/// A step that finds no call of its kind in flight goes at once, as the single call
/// it is: a lone message waits for nothing. A batch call carries at most 128 steps,
/// and at most one step per record key, so two steps of one key keep their order. Each
/// step gets the answer, fence or error that the batch method gives for it. Renewals,
/// batch calls and operator actions go to the inner store as they are.
///
/// It pays where the inner store's batch methods take many keys in one round trip or
/// one statement (the Redis and SQL stores) and many tasks or consumers share the
/// store; an in-process store that answers at once ([`Store::as_immediate`]) is used
/// at once, as without the wrapper.
///
/// A task dropped while its step waits in the queue leaves the step out. A task
/// dropped while it makes a batch call for others (its future cancelled, say by a
/// timeout) ends that call: the others' steps fail with a retryable
/// [`StoreErrorKind::Unavailable`] error, as after a lost reply (the step may or may
/// not have been applied; the protocol's fences make either safe).
///
/// ```
/// use idempotent_runtime::MemoryStore;
/// use idempotent_runtime::store::coalesce::Coalesced;
///
/// let store = Coalesced::new(MemoryStore::new());
/// # let _ = store;
/// ```
#[derive(Debug)]
pub struct Coalesced<S> {
    inner: S,
    lanes: Lanes,
}

impl<S: Store> Coalesced<S> {
    /// Coalesces the single steps of `inner`, with one call of each kind in flight at
    /// a time.
    pub fn new(inner: S) -> Self {
        Coalesced {
            inner,
            lanes: Lanes::default(),
        }
    }

    /// The inner store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The inner store, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

#[async_trait]
impl<S: Store> Store for Coalesced<S> {
    async fn claim(&self, req: &ClaimRequest<'_>) -> Result<ClaimOutcome, StoreError> {
        self.lanes.claim(&self.inner, req).await
    }

    async fn complete(&self, c: &Completion<'_>) -> Result<Fence, StoreError> {
        self.lanes.complete(&self.inner, c).await
    }

    async fn release(&self, r: &Release<'_>) -> Result<Fence, StoreError> {
        self.lanes.release(&self.inner, r).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<Fence, StoreError> {
        self.inner.renew(key, token, lease).await
    }

    fn as_immediate(&self) -> Option<&dyn ImmediateStore> {
        self.inner.as_immediate()
    }

    fn as_admin(&self) -> Option<&dyn StoreAdmin> {
        self.inner.as_admin()
    }

    async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        self.inner.claim_batch(reqs).await
    }

    async fn complete_batch(&self, items: &[Completion<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.inner.complete_batch(items).await
    }

    async fn release_batch(&self, items: &[Release<'_>]) -> Result<Vec<Fence>, StoreError> {
        self.inner.release_batch(items).await
    }
}
