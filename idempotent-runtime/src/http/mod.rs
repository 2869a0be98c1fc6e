//! HTTP: a [`tower`] layer for the `Idempotency-Key` request header
//! (IETF draft-ietf-httpapi-idempotency-key-header), on the same claim → run →
//! complete/release protocol and the same stores as message handlers.
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn app() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Router, routing::post};
//! use idempotent_runtime::http::IdempotencyLayer;
//! use idempotent_runtime::MemoryStore; // or RedisStore, PostgresStore, … to share records
//!
//! let store = MemoryStore::new();
//! let app = Router::new()
//!     .route("/orders", post(|| async { (axum::http::StatusCode::CREATED, "order 17") }))
//!     .layer(
//!         IdempotencyLayer::new(store)
//!             .required() // POST and PATCH need the header
//!             .client_identity(|req| {
//!                 req.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
//!             }),
//!     );
//! // axum::serve(listener, app).await?;
//! # let _: Router = app;
//! # Ok(()) }
//! ```
//!
//! A request with a key is read in full (up to [`max_request_body`]), fingerprinted,
//! and its record key `(scope, client identity, key)` claimed in the store with a lease
//! and a fencing token; the inner service runs while the lease is renewed, and its
//! response is recorded (status, headers and body, as raw bytes) or, for statuses that
//! a retry may change (5xx, 408, 429 by default), the claim is released. A retry with
//! the same key gets the recorded response again, marked with
//! `Idempotent-Replayed: true`. The layer's own answers are
//! `application/problem+json` (RFC 9457) with a stable `code` member:
//!
//! | situation | status | `code` |
//! | --- | --- | --- |
//! | key required and absent | 400 | `idempotency_key_missing` |
//! | key repeated, empty, too long, not ASCII, not a string | 400 | `idempotency_key_repeated`, `…_empty`, `…_too_long`, `…_not_ascii`, `…_malformed` |
//! | request body over the cap | 413 | `request_body_too_large` |
//! | the first request with this key is still running | 409 + `Retry-After` | `idempotency_key_in_use` |
//! | same key, other method, path or body | 422 | `idempotency_key_reused` |
//! | `max_attempts` failed attempts | 422 | `idempotency_key_exhausted` |
//! | store unreachable (fail closed) | 503 + `Retry-After` | `idempotency_store_unavailable` |
//!
//! The inner service keeps running when the client disconnects: the layer hands its
//! future to the runtime instead of dropping it, so the response is recorded and the
//! retry gets it.
//!
//! [`max_request_body`]: IdempotencyLayer::max_request_body

#[cfg(feature = "axum")]
mod axum_support;
mod cached;
mod fingerprint;
mod key;
mod problem;
mod service;

#[cfg(feature = "axum")]
pub use axum_support::IdempotencyKey;
pub use cached::{BoxError, ResponseBody};
pub use key::{IDEMPOTENCY_KEY, KeyError, parse_key};
pub use service::{Idempotent, ResponseFuture};

use crate::Store;
use crate::protocol::{OnInProgress, OnStoreError, Settings, StoreHandle};
use http::header::HeaderName;
use http::{Method, StatusCode, request};
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The response header that marks a replayed response: `Idempotent-Replayed: true`.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// On a replay whose body was over the cache cap when it was recorded:
/// `Idempotent-Body-Omitted: true`; the status and headers are the original ones, the
/// body is empty.
pub const BODY_OMITTED: HeaderName = HeaderName::from_static("idempotent-body-omitted");

/// Whether a request must, may or may not carry an `Idempotency-Key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyPolicy {
    /// A request without the header is refused with 400.
    Required,
    /// With the header the request is deduplicated; without it, it passes through.
    Optional,
    /// The header is ignored; the request passes through.
    Off,
}

type PolicyFn = dyn Fn(&request::Parts) -> KeyPolicy + Send + Sync;
type IdentityFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;
type FingerprintFn = dyn Fn(&request::Parts, &[u8]) -> Option<[u8; 32]> + Send + Sync;

#[derive(Clone)]
enum ScopeRule {
    MethodAndRoute,
    Fixed(Cow<'static, str>),
}

#[derive(Clone)]
enum FingerprintRule {
    MethodPathBody,
    Custom(Arc<FingerprintFn>),
    Off,
}

/// The configuration a layer and its services share.
#[derive(Clone)]
pub(crate) struct Config {
    store: StoreHandle,
    settings: Settings,
    policy: Arc<PolicyFn>,
    scope: ScopeRule,
    identity: Option<Arc<IdentityFn>>,
    fingerprint: FingerprintRule,
    release_on: fn(StatusCode) -> bool,
    max_key_len: usize,
    max_request_body: usize,
    max_cached_body: usize,
    skip_headers: Arc<[HeaderName]>,
}

/// The default policy: `Optional` for POST and PATCH, `Off` for the other methods
/// (safe methods, and PUT and DELETE, are idempotent by definition).
fn optional_on_unsafe(req: &request::Parts) -> KeyPolicy {
    if req.method == Method::POST || req.method == Method::PATCH {
        KeyPolicy::Optional
    } else {
        KeyPolicy::Off
    }
}

fn required_on_unsafe(req: &request::Parts) -> KeyPolicy {
    match optional_on_unsafe(req) {
        KeyPolicy::Optional => KeyPolicy::Required,
        p => p,
    }
}

/// The default release set: 5xx, 408 Request Timeout and 429 Too Many Requests.
pub fn release_on_server_error_timeout_or_throttle(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// A [`tower::Layer`] that makes a service idempotent under the `Idempotency-Key`
/// header; see the [module documentation](self).
///
/// Defaults: the key is optional on POST and PATCH and ignored on other methods;
/// records are kept 24 hours (`ttl`) with a 60 s lease renewed while the service runs;
/// the scope is the method and route; no client identity; the fingerprint is the
/// SHA-256 of the method, the path and query, the `Content-Type` and `Content-Encoding`
/// and the body, where a `multipart/form-data` body counts by its parts (each part's
/// name, filename, content type, other headers and bytes, in order), not by its
/// boundary, so a client's retry of one form matches; 5xx, 408 and 429 responses
/// release the key; keys up to 255 bytes; request bodies up to 1 MiB; response bodies
/// cached up to 64 KiB; store errors fail closed (503); a request whose key is in use
/// gets 409.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("settings", &self.settings)
            .field(
                "scope",
                &match &self.scope {
                    ScopeRule::MethodAndRoute => "method and route",
                    ScopeRule::Fixed(s) => s,
                },
            )
            .field("client_identity", &self.identity.is_some())
            .field("max_key_len", &self.max_key_len)
            .field("max_request_body", &self.max_request_body)
            .field("max_cached_body", &self.max_cached_body)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer keeping its records in `store` (any [`Store`]; an `Arc` of one to share it).
    pub fn new(store: impl Store + 'static) -> Self {
        Self::with_shared_store(Arc::new(store))
    }

    /// A layer on a store shared with other code.
    pub fn with_shared_store(store: Arc<dyn Store>) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                store: StoreHandle::Shared(store),
                settings: Settings {
                    ttl: Duration::from_secs(24 * 3600),
                    ..Settings::DEFAULT
                },
                policy: Arc::new(optional_on_unsafe),
                scope: ScopeRule::MethodAndRoute,
                identity: None,
                fingerprint: FingerprintRule::MethodPathBody,
                release_on: release_on_server_error_timeout_or_throttle,
                max_key_len: 255,
                max_request_body: 1024 * 1024,
                max_cached_body: crate::DEFAULT_MAX_OUTPUT_BYTES,
                skip_headers: Arc::new([]),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// POST and PATCH requests must carry the header (400 without it); other methods
    /// pass through.
    pub fn required(self) -> Self {
        self.with(|c| c.policy = Arc::new(required_on_unsafe))
    }

    /// Decides per request whether the header is required, optional or ignored (for
    /// example by path, or by an extension an earlier layer set).
    pub fn policy<F>(self, f: F) -> Self
    where
        F: Fn(&request::Parts) -> KeyPolicy + Send + Sync + 'static,
    {
        self.with(|c| c.policy = Arc::new(f))
    }

    /// Uses one scope for every request of this layer, instead of the method and route
    /// (`"POST /orders/{id}"`; the route is axum's matched path with the `axum`
    /// feature, otherwise the request's path). Give routes that share a scope the
    /// same scope explicitly, and keep it stable across releases: records are found by it.
    pub fn scope(self, scope: impl Into<Cow<'static, str>>) -> Self {
        let scope = scope.into();
        self.with(|c| c.scope = ScopeRule::Fixed(scope))
    }

    /// Who the client is (an API key, a tenant, an authenticated user), as the draft's
    /// security considerations ask: keys of different clients never share a record, so
    /// one client cannot read another's responses by reusing its key. `None` is an
    /// anonymous client; all anonymous clients share one key space.
    pub fn client_identity<F>(self, f: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| c.identity = Some(Arc::new(f)))
    }

    /// Chooses the request's fingerprint from its head and body (for example a hash of
    /// selected fields with [`crate::fingerprint`]); `None` disables the check for
    /// that request. The same key with another fingerprint gets 422.
    pub fn fingerprint<F>(self, f: F) -> Self
    where
        F: Fn(&request::Parts, &[u8]) -> Option<[u8; 32]> + Send + Sync + 'static,
    {
        self.with(|c| c.fingerprint = FingerprintRule::Custom(Arc::new(f)))
    }

    /// No fingerprint: the same key replays whatever the request.
    pub fn without_fingerprint(self) -> Self {
        self.with(|c| c.fingerprint = FingerprintRule::Off)
    }

    /// Which response statuses release the key so a retry runs the request again
    /// (default: [`release_on_server_error_timeout_or_throttle`]). Every other response
    /// is recorded and replayed.
    pub fn release_on(self, f: fn(StatusCode) -> bool) -> Self {
        self.with(|c| c.release_on = f)
    }

    /// How long a recorded response is kept (default 24 hours).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.settings.ttl = ttl)
    }

    /// How long a claim holds without renewal (default 60 s; renewed every third of it
    /// while the service runs). After a crash, retries get 409 until it expires.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|c| c.settings.lease = lease.max(Duration::from_millis(1)))
    }

    /// Refuse the key (422) after `n` released attempts (`n = 0` is taken as 1).
    pub fn max_attempts(self, n: u32) -> Self {
        self.with(|c| c.settings.max_attempts = Some(n.max(1)))
    }

    /// Store unreachable: [`OnStoreError::Fail`] answers 503 without running the
    /// service (the default), [`OnStoreError::Process`] runs it without deduplication.
    pub fn on_store_error(self, policy: OnStoreError) -> Self {
        self.with(|c| c.settings.on_store_error = policy)
    }

    /// Key in use by a running request: [`OnInProgress::Reject`] answers 409 with
    /// `Retry-After` (the default), [`OnInProgress::Wait`] waits (at most one lease)
    /// for its response.
    pub fn on_in_progress(self, policy: OnInProgress) -> Self {
        self.with(|c| c.settings.on_in_progress = policy)
    }

    /// Longest accepted key, in bytes (default 255).
    pub fn max_key_length(self, bytes: usize) -> Self {
        self.with(|c| c.max_key_len = bytes)
    }

    /// Largest request body of a request with a key, which the layer reads to
    /// fingerprint it (default 1 MiB; over it: 413).
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_body = bytes)
    }

    /// Largest response body recorded for replays (default 64 KiB). A longer body is
    /// streamed to the client as usual and its status and headers are recorded
    /// without it; replays then carry `Idempotent-Body-Omitted: true` and no body.
    pub fn max_cached_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_cached_body = bytes)
    }

    /// A response header never recorded nor replayed (hop-by-hop headers never are).
    pub fn skip_header(self, name: HeaderName) -> Self {
        self.with(|c| {
            let mut v = c.skip_headers.to_vec();
            v.push(name);
            c.skip_headers = v.into();
        })
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = Idempotent<S>;

    fn layer(&self, inner: S) -> Idempotent<S> {
        Idempotent::new(inner, self.config.clone())
    }
}

impl Config {
    /// The record scope of a request.
    fn scope_of(&self, req: &request::Parts) -> Cow<'static, str> {
        match &self.scope {
            ScopeRule::Fixed(s) => s.clone(),
            ScopeRule::MethodAndRoute => {
                #[cfg(feature = "axum")]
                if let Some(route) = req.extensions.get::<axum::extract::MatchedPath>() {
                    return Cow::Owned(format!("{} {}", req.method, route.as_str()));
                }
                Cow::Owned(format!("{} {}", req.method, req.uri.path()))
            }
        }
    }

    /// The fingerprint of a request with its body.
    fn fingerprint_of(&self, req: &request::Parts, body: &[u8]) -> Option<[u8; 32]> {
        match &self.fingerprint {
            FingerprintRule::Off => None,
            FingerprintRule::Custom(f) => f(req, body),
            FingerprintRule::MethodPathBody => Some(fingerprint::default_fingerprint(req, body)),
        }
    }
}
