//! The protocol without the attribute: for closures, trait objects and code that
//! computes its key at run time.

use crate::error::Error;
use crate::key::{KeyBuilder, KeyPart, RecordKey};
use crate::protocol::batch::Batch;
use crate::protocol::{self, OnInProgress, OnStoreError, Settings, StoreHandle, StoreSource};
use crate::store::{Record, Store, admin_of};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The claim → run → complete/release protocol as a value, for code that cannot use
/// the attribute.
///
/// ```
/// use idempotent_runtime::{Error, Idempotency, MemoryStore};
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let payments = Idempotency::new("payments")
///     .store(MemoryStore::new())
///     .ttl(Duration::from_secs(24 * 3600))
///     .max_attempts(5);
///
/// let first: Result<u64, Error> = payments.run("pay-1", async { Ok(42) }).await;
/// let again: Result<u64, Error> = payments.run("pay-1", async { Ok(0) }).await;
/// assert_eq!(first.unwrap(), 42);
/// assert_eq!(again.unwrap(), 42); // the body did not run; the cached output came back
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Idempotency {
    scope: Cow<'static, str>,
    store: StoreChoice,
    settings: Settings,
}

#[derive(Clone, Debug)]
enum StoreChoice {
    Named(Cow<'static, str>),
    Handle(StoreHandle),
}

impl Idempotency {
    /// A handler scope on the `"memory"` store with the attribute's defaults
    /// (`ttl` 7 days, `lease` 60 s, unlimited attempts, fail closed, reject while in progress).
    pub fn new(scope: impl Into<Cow<'static, str>>) -> Self {
        Idempotency {
            scope: scope.into(),
            store: StoreChoice::Named(Cow::Borrowed(crate::registry::DEFAULT_STORE)),
            settings: Settings::DEFAULT,
        }
    }

    /// Uses `store`.
    pub fn store(self, store: impl Store + 'static) -> Self {
        self.shared_store(Arc::new(store))
    }

    /// Uses a store shared with other code.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = StoreChoice::Handle(StoreHandle::Shared(store));
        self
    }

    /// Uses the store registered under `name` (looked up on each run).
    pub fn store_named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.store = StoreChoice::Named(name.into());
        self
    }

    /// How long a completed key is remembered. The store keeps a record at least as
    /// long as its lease. Zero, or over [`MAX_TTL`](crate::MAX_TTL): every run returns
    /// [`Error::InvalidSettings`] without running anything.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// How long a claim holds without renewal (renewed every third of it while the
    /// body runs). At least [`MIN_LEASE`](crate::MIN_LEASE): with a shorter lease every
    /// run returns [`Error::InvalidSettings`] without running anything, since renewals
    /// could not keep up and duplicates would run the body again.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// Poison the key after `n` failed attempts. `n = 0` would never run the body:
    /// every run then returns [`Error::InvalidSettings`] without running anything.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = Some(n);
        self
    }

    /// What to do when the store is unreachable.
    pub fn on_store_error(mut self, policy: OnStoreError) -> Self {
        self.settings.on_store_error = policy;
        self
    }

    /// What to do when another execution holds the claim.
    pub fn on_in_progress(mut self, policy: OnInProgress) -> Self {
        self.settings.on_in_progress = policy;
        self
    }

    /// Cap on the cached output's serialized size for this scope.
    pub fn max_output_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_output_bytes = Some(bytes);
        self
    }

    /// The settings in effect.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The scope.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The record key of `key` in this scope: what the store holds the message's
    /// record under, for [`Store`] methods and the `idempotent` command.
    pub fn record_key<K: KeyPart + ?Sized>(&self, key: &K) -> Result<RecordKey, Error> {
        RecordKey::new(&self.scope, key)
    }

    /// The record of `key` in this scope as the store holds it now, or `None` if there
    /// is none (never claimed, forgotten, or expired). Fails with
    /// [`StoreErrorKind::Rejected`](crate::StoreErrorKind::Rejected) on a store without
    /// operator actions ([`Store::as_admin`]).
    ///
    /// An `#[idempotent]` handler's records are under its scope: the `scope` argument,
    /// or by default `module_path!()::fn_name`, so `Idempotency::new("my_app::orders::on_paid")
    /// .store_named("redis")` reads the records of `on_paid` in `my_app::orders`.
    ///
    /// ```
    /// use idempotent_runtime::store::RecordState;
    /// use idempotent_runtime::{Error, Idempotency, MemoryStore};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let payments = Idempotency::new("payments").store(MemoryStore::new());
    /// payments.run("pay-1", async { Ok::<_, Error>(42) }).await.unwrap();
    ///
    /// let record = payments.inspect("pay-1").await.unwrap().expect("recorded");
    /// assert_eq!((record.state, record.attempts), (RecordState::Completed, 1));
    /// assert!(payments.forget("pay-1").await.unwrap()); // the next delivery runs again
    /// assert_eq!(payments.inspect("pay-1").await.unwrap(), None);
    /// # });
    /// ```
    pub async fn inspect<K: KeyPart + ?Sized>(&self, key: &K) -> Result<Option<Record>, Error> {
        let key = self.record_key(key)?;
        let store = self.resolve_store()?;
        admin_of(store.get())
            .map_err(Error::Store)?
            .inspect(&key)
            .await
            .map_err(Error::Store)
    }

    /// Deletes the record of `key` in this scope whatever its state, so that the next
    /// delivery of the message runs the body again; returns whether there was one. A
    /// holder still running is fenced out: its completion is refused. Fails as
    /// [`inspect`](Self::inspect) does on a store without operator actions.
    pub async fn forget<K: KeyPart + ?Sized>(&self, key: &K) -> Result<bool, Error> {
        let key = self.record_key(key)?;
        let store = self.resolve_store()?;
        admin_of(store.get())
            .map_err(Error::Store)?
            .forget(&key)
            .await
            .map_err(Error::Store)
    }

    /// Runs `body` at most once per `key` (until the record expires).
    pub async fn run<K, T, E, Fut>(&self, key: &K, body: Fut) -> Result<T, E>
    where
        K: KeyPart + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_inner(key, None, body).await
    }

    /// Like [`run`](Self::run), and a later message with the same key but a different
    /// `fingerprint` gets [`Error::FingerprintMismatch`] instead of the cached output.
    pub async fn run_with_fingerprint<K, F, T, E, Fut>(
        &self,
        key: &K,
        fingerprint: &F,
        body: Fut,
    ) -> Result<T, E>
    where
        K: KeyPart + ?Sized,
        F: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        let fp = crate::fingerprint::fingerprint(fingerprint)?;
        self.run_inner(key, Some(Ok(fp)), body).await
    }

    pub(crate) fn resolve_store(&self) -> Result<StoreHandle, Error> {
        match &self.store {
            StoreChoice::Handle(h) => Ok(h.clone()),
            StoreChoice::Named(name) => protocol::lookup_store(name).map(StoreHandle::Static),
        }
    }

    pub(crate) fn scope_cow(&self) -> &Cow<'static, str> {
        &self.scope
    }

    fn run_inner<K, T, E, Fut>(
        &self,
        key: &K,
        fingerprint: Option<Result<[u8; 32], Error>>,
        body: Fut,
    ) -> impl Future<Output = Result<T, E>>
    where
        K: KeyPart + ?Sized,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut builder = KeyBuilder::new();
        key.write_key(&mut builder);
        let store = match &self.store {
            StoreChoice::Handle(h) => StoreSource::Handle(h),
            StoreChoice::Named(name) => StoreSource::Named(name),
        };
        protocol::run(
            &self.settings,
            (&self.scope).into(),
            builder,
            fingerprint,
            store,
            body,
        )
    }
}

impl Idempotency {
    /// Runs `handler` once per distinct key of a batch of messages, in three round
    /// trips to the store however large the batch: one claim for every key, then,
    /// after the handlers ran (concurrently), one completion for the successes and
    /// one release for the failures.
    ///
    /// The results come back in the order of `messages`, each as
    /// [`run`](Self::run) would have returned it: the handler's output, a cached
    /// output for a key completed before, or an [`Error`]. A key that appears twice in
    /// the batch runs once; the later copies get the first one's output (or
    /// [`Error::InProgress`] if it failed, so they are redelivered and retried).
    ///
    /// If a handler panics, every claim of the batch is settled first, then the panic
    /// resumes. If the returned future is dropped, the claims of the handlers that did
    /// not finish are released.
    ///
    /// ```
    /// use idempotent_runtime::{Error, Idempotency};
    ///
    /// struct Msg { id: String, amount: u64 }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let ledger = Idempotency::new("ledger");
    /// let batch = vec![
    ///     Msg { id: "a".into(), amount: 1 },
    ///     Msg { id: "b".into(), amount: 2 },
    ///     Msg { id: "a".into(), amount: 1 }, // a send retry inside the same batch
    /// ];
    /// let results: Vec<Result<u64, Error>> = ledger
    ///     .run_batch(&batch, |m| m.id.clone(), |m| async move { Ok(m.amount * 100) })
    ///     .await;
    /// let amounts: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    /// assert_eq!(amounts, [100, 200, 100]);
    /// # });
    /// ```
    pub async fn run_batch<'m, M, K, T, E, KF, HF, Fut>(
        &self,
        messages: &'m [M],
        key_of: KF,
        handler: HF,
    ) -> Vec<Result<T, E>>
    where
        K: KeyPart,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        KF: Fn(&'m M) -> K,
        HF: Fn(&'m M) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let batch = Batch::prepared(
            self.scope_cow().clone(),
            self.settings(),
            || self.resolve_store(),
            messages,
            key_of,
            None,
        );
        Batch::drive(batch, messages, handler).await
    }

    /// Like [`run_batch`](Self::run_batch), with a fingerprint per message, as
    /// [`run_with_fingerprint`](Self::run_with_fingerprint) takes for one: a message
    /// whose key was claimed before with a different fingerprint (by an earlier batch,
    /// or by an earlier message of the same batch) gets [`Error::FingerprintMismatch`]
    /// instead of a cached output, and its handler does not run.
    ///
    /// ```
    /// use idempotent_runtime::{Error, Idempotency};
    ///
    /// struct Msg { id: &'static str, amount: u64 }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let ledger = Idempotency::new("ledger-fp");
    /// let batch = [Msg { id: "a", amount: 1 }, Msg { id: "a", amount: 2 }];
    /// let results: Vec<Result<u64, Error>> = ledger
    ///     .run_batch_with_fingerprint(&batch, |m| m.id, |m| m.amount, |m| async move { Ok(m.amount) })
    ///     .await;
    /// assert_eq!(*results[0].as_ref().unwrap(), 1);
    /// assert!(matches!(results[1], Err(Error::FingerprintMismatch)));
    /// # });
    /// ```
    pub async fn run_batch_with_fingerprint<'m, M, K, F, T, E, KF, FF, HF, Fut>(
        &self,
        messages: &'m [M],
        key_of: KF,
        fingerprint_of: FF,
        handler: HF,
    ) -> Vec<Result<T, E>>
    where
        K: KeyPart,
        F: Serialize,
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        KF: Fn(&'m M) -> K,
        FF: Fn(&'m M) -> F,
        HF: Fn(&'m M) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // used before the first await only: the batch's future does not hold it
        let batch = {
            let fingerprint_of = |m: &'m M| crate::fingerprint::fingerprint(&fingerprint_of(m));
            Batch::prepared(
                self.scope_cow().clone(),
                self.settings(),
                || self.resolve_store(),
                messages,
                key_of,
                Some(&fingerprint_of),
            )
        };
        Batch::drive(batch, messages, handler).await
    }
}
