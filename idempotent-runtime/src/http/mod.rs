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
//!     // `route_layer`: only requests that matched a route are deduplicated; others get
//!     // the router's own 404 or 405
//!     .route_layer(
//!         IdempotencyLayer::new(store)
//!             .required() // POST and PATCH need the header
//!             // each client's keys are its own (an API key, a tenant, a user)
//!             .client_identity(|req| {
//!                 req.headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
//!             }),
//!     );
//! // axum::serve(listener, app).await?;
//! # let _: Router = app;
//! # Ok(()) }
//! ```
//!
//! A layer must be told who the client is before it is a layer: either
//! [`client_identity`](IdempotencyLayer::client_identity) or, for a service whose
//! callers all trust each other, [`shared_key_space`](IdempotencyLayer::shared_key_space).
//! Without one of them it does not compile:
//!
//! ```compile_fail
//! use idempotent_runtime::{MemoryStore, http::IdempotencyLayer};
//!
//! fn serve<L: tower::Layer<()>>(_layer: L) {}
//! serve(IdempotencyLayer::new(MemoryStore::new())); // no decision on client identity
//! ```
//!
//! ```
//! # use idempotent_runtime::{MemoryStore, http::IdempotencyLayer};
//! # fn serve<L: tower::Layer<()>>(_layer: L) {}
//! serve(IdempotencyLayer::new(MemoryStore::new()).shared_key_space()); // compiles
//! ```
//!
//! A request with a key is read in full (up to [`max_request_body`]), fingerprinted,
//! and its record key `(scope, client, key)` claimed in the store with a lease and a
//! fencing token; the inner service runs while the lease is renewed, and its response
//! is recorded (status, headers, body and trailers, as raw bytes) or, for statuses
//! that a retry may change (5xx, 408, 429, 401, 403 and 405 by default), the claim is
//! released. A retry with the same key gets the recorded response again, marked with
//! `Idempotent-Replayed: true`. The layer's own answers are `application/problem+json`
//! (RFC 9457) with a stable `code` member:
//!
//! | situation | status | `code` |
//! | --- | --- | --- |
//! | key required and absent | 400 | `idempotency_key_missing` |
//! | key repeated, empty, too long, not ASCII, not a string | 400 | `idempotency_key_repeated`, `…_empty`, `…_too_long`, `…_not_ascii`, `…_malformed` |
//! | request body over the cap | 413 | `request_body_too_large` |
//! | the client identity function names no client ([`Anonymous::Reject`], the default) | 401 | `idempotency_client_unidentified` |
//! | the first request with this key is still running | 409 + `Retry-After` | `idempotency_key_in_use` |
//! | same key, other method, path, content type or body | 422 | `idempotency_key_reused` |
//! | `max_attempts` failed attempts | 422 | `idempotency_key_exhausted` |
//! | store unreachable (fail closed) | 503 + `Retry-After` | `idempotency_store_unavailable` |
//!
//! Responses stream to the client as the service produces them while they are
//! recorded; the record is complete when the body has ended. The inner service keeps
//! running when the client disconnects (the request runs in a task of its own), so the
//! response is recorded and the retry gets it.
//!
//! [`max_request_body`]: IdempotencyLayer::max_request_body

#[cfg(feature = "axum")]
mod axum_support;
mod cached;
mod config;
mod fingerprint;
mod identity;
mod key;
mod problem;
mod service;

#[cfg(feature = "axum")]
pub use axum_support::IdempotencyKey;
pub use cached::{BoxError, ResponseBody};
pub use config::{BODY_OMITTED, KeyPolicy, REPLAYED};
pub use identity::{
    Anonymous, IdentityDecided, IdentityDecision, IdentityUndecided, client_digest,
};
pub use key::{IDEMPOTENCY_KEY, KeyError, parse_key};
pub use service::{Idempotent, ResponseFuture};

use crate::protocol::{OnInProgress, OnStoreError, Settings, StoreHandle};
use crate::store::Store;
use config::{Clients, Config, FingerprintRule, ScopeRule};
use http::header::{HeaderName, SET_COOKIE};
use http::{Method, StatusCode, request};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// Response headers a layer never records nor replays unless told otherwise:
/// `Set-Cookie` (a session handed to the first caller is not handed to whoever sends
/// the key again). [`IdempotencyLayer::skip_header`] adds to the list; hop-by-hop
/// headers (`Connection`, `Transfer-Encoding`, …) are never recorded either.
pub const SKIPPED_BY_DEFAULT: [HeaderName; 1] = [SET_COOKIE];

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

/// The default release set: the statuses after which a retry with the same key runs
/// the request again instead of getting the response replayed. 5xx (the server
/// failed), 408 Request Timeout and 429 Too Many Requests (try later), 401
/// Unauthorized and 403 Forbidden (the request was refused before it ran; a client
/// that refreshes its credentials retries with the same key; 405 Method Not Allowed,
/// a router's answer to a method its route does not take).
pub fn release_by_default(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || status == StatusCode::METHOD_NOT_ALLOWED
}

/// A [`tower::Layer`] that makes a service idempotent under the `Idempotency-Key`
/// header; see the [module documentation](self).
///
/// Built in two steps: [`new`](Self::new) and the settings, then a decision on client
/// identity ([`client_identity`](Self::client_identity) or
/// [`shared_key_space`](Self::shared_key_space)), which makes it a layer. Settings
/// are checked as they are given, by the rules of the attribute and of
/// [`Idempotency`](crate::Idempotency): a bad value panics while the service is built,
/// never at a request.
///
/// Defaults: the key is optional on POST and PATCH and ignored on other methods;
/// records are kept 24 hours (`ttl`) with a 60 s lease renewed while the service runs;
/// the scope is the method and the matched route; the fingerprint is the SHA-256 of
/// the method, the path and query, the `Content-Type` and `Content-Encoding` and the
/// body, where a `multipart/form-data` body counts by its parts (each part's name,
/// filename, content type, other headers and bytes, in order), not by its boundary,
/// so a client's retry of one form matches; 5xx, 408, 429, 401, 403 and 405 responses
/// release the key ([`release_by_default`]); `Set-Cookie` is not recorded
/// ([`SKIPPED_BY_DEFAULT`]); keys up to 255 bytes; request bodies up to 1 MiB;
/// response bodies recorded up to 64 KiB; store errors fail closed (503); a request
/// whose key is in use gets 409 with `Retry-After: 1`.
pub struct IdempotencyLayer<I = IdentityDecided> {
    config: Arc<Config>,
    identity: PhantomData<fn() -> I>,
}

impl<I> Clone for IdempotencyLayer<I> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            config: self.config.clone(),
            identity: PhantomData,
        }
    }
}

impl<I> fmt::Debug for IdempotencyLayer<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl IdempotencyLayer<IdentityUndecided> {
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
                clients: Clients::Shared,
                anonymous: Anonymous::default(),
                fingerprint: FingerprintRule::MethodPathBody,
                release_on: release_by_default,
                max_key_len: 255,
                max_request_body: 1024 * 1024,
                max_cached_body: crate::protocol::settings::DEFAULT_MAX_OUTPUT_BYTES,
                skip_headers: Arc::new(SKIPPED_BY_DEFAULT),
                retry_after: Duration::from_secs(1),
            }),
            identity: PhantomData,
        }
    }

    /// Who the client is (an API key, a tenant, an authenticated user): each client's
    /// keys are its own, so one client can neither read another's responses by
    /// sending its key nor take a key another will use. The identity is kept in
    /// records as a digest (16 bytes of SHA-256, in hex), never as given.
    ///
    /// A request whose identity is `None` (or empty) is never answered from anyone's
    /// records: it gets 401 by default, or what [`on_anonymous`](Self::on_anonymous)
    /// says. Place the layer after authentication, so the function reads what it
    /// established (an extension, a verified header).
    pub fn client_identity<F>(self, f: F) -> IdempotencyLayer<IdentityDecided>
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| {
            c.clients = Clients::Identified {
                identity: Arc::new(f),
                anonymous: c.anonymous,
            }
        })
        .decided()
    }

    /// One key space for every caller: a caller sending another's key gets the other's
    /// response. Only for services whose callers all trust each other (one internal
    /// client, a service behind a gateway that already scopes keys); otherwise use
    /// [`client_identity`](Self::client_identity).
    pub fn shared_key_space(self) -> IdempotencyLayer<IdentityDecided> {
        self.with(|c| c.clients = Clients::Shared).decided()
    }

    fn decided(self) -> IdempotencyLayer<IdentityDecided> {
        IdempotencyLayer {
            config: self.config,
            identity: PhantomData,
        }
    }
}

impl<I> IdempotencyLayer<I> {
    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Applies `f` to the settings and checks them with the rule every entry point
    /// uses; panics (at the caller's line) with its message when they are refused.
    #[track_caller]
    fn with_settings(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.config.settings;
        f(&mut settings);
        if let Err(e) = settings.check() {
            panic!("IdempotencyLayer: {e}");
        }
        Arc::make_mut(&mut self.config).settings = settings;
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

    /// Uses one scope for every request of this layer, instead of the method and
    /// route. The default scope is `"POST /orders/{id}"` with axum's matched route;
    /// outside an axum `Router` (plain tower or hyper) it is the method and `*`
    /// (`"POST *"`), so give such a service its own scope here. Give routes that
    /// share a scope the same scope explicitly, and keep it stable across releases:
    /// records are found by it.
    pub fn scope(self, scope: impl Into<Cow<'static, str>>) -> Self {
        let scope = scope.into();
        self.with(|c| c.scope = ScopeRule::Fixed(scope))
    }

    /// What a request with a key gets when the
    /// [`client_identity`](IdempotencyLayer::client_identity) function names no client
    /// (default: [`Anonymous::Reject`] with 401). Unused with a shared key space.
    pub fn on_anonymous(self, anonymous: Anonymous) -> Self {
        self.with(|c| {
            c.anonymous = anonymous;
            if let Clients::Identified { anonymous: a, .. } = &mut c.clients {
                *a = anonymous;
            }
        })
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
    /// (default: [`release_by_default`]). Every other response is recorded and
    /// replayed.
    pub fn release_on(self, f: fn(StatusCode) -> bool) -> Self {
        self.with(|c| c.release_on = f)
    }

    /// How long a recorded response is kept (default 24 hours).
    ///
    /// # Panics
    ///
    /// When `ttl` is zero or over [`MAX_TTL`](crate::MAX_TTL).
    #[track_caller]
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with_settings(|s| s.ttl = ttl)
    }

    /// How long a claim holds without renewal (default 60 s; renewed every third of it
    /// while the service runs). After a crash, retries get 409 until it expires.
    ///
    /// # Panics
    ///
    /// When `lease` is under [`MIN_LEASE`](crate::MIN_LEASE) or over
    /// [`MAX_TTL`](crate::MAX_TTL).
    #[track_caller]
    pub fn lease(self, lease: Duration) -> Self {
        self.with_settings(|s| s.lease = lease)
    }

    /// Refuse the key (422) after `n` released attempts.
    ///
    /// # Panics
    ///
    /// When `n` is 0 (the request would never run).
    #[track_caller]
    pub fn max_attempts(self, n: u32) -> Self {
        self.with_settings(|s| s.max_attempts = Some(n))
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

    /// The `Retry-After` of a 409 answer: how long a client should wait before it
    /// retries a request whose key is in use (default 1 s). Never more than the time
    /// left on the running request's lease; sent in whole seconds, at least 1.
    ///
    /// # Panics
    ///
    /// When `after` is zero.
    #[track_caller]
    pub fn retry_after(self, after: Duration) -> Self {
        assert!(
            !after.is_zero(),
            "IdempotencyLayer: a retry_after of zero would tell clients to retry at once; give at least 1 s"
        );
        self.with(|c| c.retry_after = after)
    }

    /// Longest accepted key, in bytes (default 255).
    ///
    /// # Panics
    ///
    /// When `bytes` is 0 (no key would be accepted).
    #[track_caller]
    pub fn max_key_length(self, bytes: usize) -> Self {
        assert!(
            bytes > 0,
            "IdempotencyLayer: a max_key_length of 0 would refuse every key; give at least 1"
        );
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

    /// A response header never recorded nor replayed, in addition to
    /// [`SKIPPED_BY_DEFAULT`] and the hop-by-hop headers.
    pub fn skip_header(self, name: HeaderName) -> Self {
        self.with(|c| {
            let mut v = c.skip_headers.to_vec();
            v.push(name);
            c.skip_headers = v.into();
        })
    }
}

impl<S, I: IdentityDecision> tower::Layer<S> for IdempotencyLayer<I> {
    type Service = Idempotent<S>;

    fn layer(&self, inner: S) -> Idempotent<S> {
        Idempotent::new(inner, self.config.clone())
    }
}
