//! Who the client is: each client's keys are its own, and a layer is not a layer until
//! it was told how to tell clients apart (or that every caller is trusted).

use http::StatusCode;
use sha2::{Digest, Sha256};

/// The state of an [`IdempotencyLayer`](super::IdempotencyLayer) that has no decision
/// on client identity yet: it is not a [`tower::Layer`] until
/// [`client_identity`](super::IdempotencyLayer::client_identity) or
/// [`shared_key_space`](super::IdempotencyLayer::shared_key_space) is called.
#[derive(Clone, Copy, Debug)]
pub struct IdentityUndecided(());

/// The state of an [`IdempotencyLayer`](super::IdempotencyLayer) that knows how keys
/// are scoped to clients: a [`tower::Layer`].
#[derive(Clone, Copy, Debug)]
pub struct IdentityDecided(());

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::IdentityDecided {}
}

/// Implemented by the builder states in which an
/// [`IdempotencyLayer`](super::IdempotencyLayer) is a [`tower::Layer`]: only
/// [`IdentityDecided`]. Sealed.
#[diagnostic::on_unimplemented(
    message = "this `IdempotencyLayer` has no decision on client identity, so it is not a layer yet",
    label = "no decision on client identity",
    note = "call `.client_identity(|req| …)` so that each client (API key, tenant, user) has keys of its own, or `.shared_key_space()` if every caller is trusted to read every other caller's responses"
)]
pub trait IdentityDecision: sealed::Sealed {}

impl IdentityDecision for IdentityDecided {}

/// What the layer does with a request that carries an `Idempotency-Key` but whose
/// client the [`client_identity`](super::IdempotencyLayer::client_identity) function
/// cannot name (it returned `None` or an empty string). Such a request is never
/// answered from, nor recorded in, anyone's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Anonymous {
    /// Answer with this status and an `application/problem+json` body whose `code` is
    /// `idempotency_client_unidentified`, without running the service. The default, with
    /// 401 Unauthorized.
    Reject(StatusCode),
    /// Run the service without deduplication: a retry runs it again.
    Process,
}

impl Default for Anonymous {
    fn default() -> Self {
        Anonymous::Reject(StatusCode::UNAUTHORIZED)
    }
}

/// The client's part of a record key: the first 16 bytes of SHA-256 over
/// `idempotent-http-client`, a zero byte and the identity, in lowercase hex (32
/// characters). Identities are often secrets (API keys); records keep this digest,
/// never the identity itself. A record of the layer is found under
/// `RecordKey::new(scope, &(client_digest(identity).as_str(), key))`, or under
/// `RecordKey::new(scope, key)` in a shared key space.
///
/// ```
/// use idempotent_runtime::http::client_digest;
///
/// assert_eq!(client_digest("sk_live_51HxA").len(), 32);
/// assert_ne!(client_digest("sk_live_51HxA"), client_digest("sk_live_51HxB"));
/// ```
pub fn client_digest(identity: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"idempotent-http-client\0");
    h.update(identity.as_bytes());
    let digest = h.finalize();
    let mut hex = String::with_capacity(32);
    for b in &digest[..16] {
        use std::fmt::Write;
        // writing to a String cannot fail
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_hides_the_identity_and_tells_clients_apart() {
        let a = client_digest("sk_live_51HxA");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!a.contains("sk_live"));
        assert_eq!(a, client_digest("sk_live_51HxA"));
        assert_ne!(a, client_digest("sk_live_51HxB"));
    }
}
