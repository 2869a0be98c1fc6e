//! What a layer and the services it makes share: the layer's [`Config`] (the store,
//! the settings and the rules for keys, scopes, clients and fingerprints), and the
//! public names both use.

#[cfg(feature = "axum")]
use super::axum_support;
use super::fingerprint;
use super::identity::Anonymous;
use crate::protocol::{Settings, StoreHandle};
use http::header::HeaderName;
use http::{StatusCode, request};
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
pub(super) enum ScopeRule {
    MethodAndRoute,
    Fixed(Cow<'static, str>),
}

#[derive(Clone)]
pub(super) enum FingerprintRule {
    MethodPathBody,
    Custom(Arc<FingerprintFn>),
    Off,
}

/// Whose keys a record belongs to.
#[derive(Clone)]
pub(crate) enum Clients {
    /// Every caller shares one key space.
    Shared,
    /// Each client named by the function has its own.
    Identified {
        identity: Arc<IdentityFn>,
        anonymous: Anonymous,
    },
}

/// The configuration a layer and its services share.
#[derive(Clone)]
pub(crate) struct Config {
    pub(super) store: StoreHandle,
    pub(super) settings: Settings,
    pub(super) policy: Arc<PolicyFn>,
    pub(super) scope: ScopeRule,
    pub(super) clients: Clients,
    /// `on_anonymous` as set, kept for a `client_identity` call that comes later
    pub(super) anonymous: Anonymous,
    pub(super) fingerprint: FingerprintRule,
    pub(super) release_on: fn(StatusCode) -> bool,
    pub(super) max_key_len: usize,
    pub(super) max_request_body: usize,
    pub(super) max_cached_body: usize,
    pub(super) skip_headers: Arc<[HeaderName]>,
    pub(super) retry_after: Duration,
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
            .field(
                "clients",
                &match &self.clients {
                    Clients::Shared => "one shared key space",
                    Clients::Identified { .. } => "identified",
                },
            )
            .field("max_key_len", &self.max_key_len)
            .field("max_request_body", &self.max_request_body)
            .field("max_cached_body", &self.max_cached_body)
            .field("retry_after", &self.retry_after)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The record scope of a request; `None` for a request an axum `Router` matched no
    /// route for (the router answers it, 404 or its fallback, and nothing is recorded).
    pub(super) fn scope_of(&self, req: &mut request::Parts) -> Option<Cow<'static, str>> {
        match &self.scope {
            ScopeRule::Fixed(s) => Some(s.clone()),
            ScopeRule::MethodAndRoute => {
                #[cfg(feature = "axum")]
                {
                    if let Some(route) = req.extensions.get::<axum::extract::MatchedPath>() {
                        return Some(Cow::Owned(format!("{} {}", req.method, route.as_str())));
                    }
                    if axum_support::inside_router(req) {
                        return None;
                    }
                }
                Some(Cow::Owned(format!("{} *", req.method)))
            }
        }
    }

    /// The fingerprint of a request with its body.
    pub(super) fn fingerprint_of(&self, req: &request::Parts, body: &[u8]) -> Option<[u8; 32]> {
        match &self.fingerprint {
            FingerprintRule::Off => None,
            FingerprintRule::Custom(f) => f(req, body),
            FingerprintRule::MethodPathBody => Some(fingerprint::default_fingerprint(req, body)),
        }
    }
}
