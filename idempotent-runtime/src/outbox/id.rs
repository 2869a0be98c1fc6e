//! The ids of outgoing messages: UUIDv5 of the incoming message's record key and the
//! emission, so that a re-execution emits the same ids.

use crate::key::RecordKey;
use uuid::Uuid;

/// The UUIDv5 namespace of outgoing message ids:
/// `77741b8b-a043-55f7-8cac-064b87894063`, which is itself the UUIDv5 of the URL
/// `https://docs.rs/idempotent-runtime/outbox` in the standard URL namespace.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x7774_1b8b_a043_55f7_8cac_064b_8789_4063);

/// Which emission of an execution a message is: the `n`-th unnamed one
/// ([`Outbox::emit`](super::Outbox::emit), counted from 0) or a named one
/// ([`Outbox::emit_named`](super::Outbox::emit_named)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emission<'a> {
    /// The position among the execution's unnamed emissions, from 0.
    Position(u32),
    /// The name the handler gave the emission.
    Named(&'a str),
}

/// The id of a message emitted by the execution of `key` (scope and key as the store
/// records them) as `emission`.
///
/// The id is the UUIDv5 ([RFC 9562](https://www.rfc-editor.org/rfc/rfc9562#section-5.5))
/// in [`NAMESPACE`] of these bytes, so that another service can compute it:
///
/// | bytes | what |
/// | --- | --- |
/// | 4, big-endian | length of the scope |
/// | scope | the handler's scope, UTF-8 |
/// | 4, big-endian | length of the key |
/// | key | the encoded key ([`RecordKey::key`]; the text of a one-part string key) |
/// | 1 | `0` for a position, `1` for a name |
/// | 4, big-endian, or the name | the position, or the name's UTF-8 bytes |
///
/// ```
/// use idempotent_runtime::RecordKey;
/// use idempotent_runtime::outbox::{Emission, message_id};
///
/// let key = RecordKey::new("orders", "o-17").unwrap();
/// let first = message_id(&key, Emission::Position(0));
/// assert_eq!(first, message_id(&key, Emission::Position(0))); // stable
/// assert_ne!(first, message_id(&key, Emission::Position(1)));
/// assert_ne!(first, message_id(&key, Emission::Named("charge")));
/// assert_eq!(first.get_version_num(), 5);
/// ```
pub fn message_id(key: &RecordKey, emission: Emission<'_>) -> Uuid {
    let (scope, key) = (key.scope().as_bytes(), key.key());
    let mut name = Vec::with_capacity(4 + scope.len() + 4 + key.len() + 1 + 4);
    for part in [scope, key] {
        name.extend_from_slice(&len32(part).to_be_bytes());
        name.extend_from_slice(part);
    }
    match emission {
        Emission::Position(n) => {
            name.push(0);
            name.extend_from_slice(&n.to_be_bytes());
        }
        Emission::Named(n) => {
            name.push(1);
            name.extend_from_slice(n.as_bytes());
        }
    }
    Uuid::new_v5(&NAMESPACE, &name)
}

/// Scopes and keys are bounded far below 4 GiB ([`MAX_SCOPE_BYTES`](crate::MAX_SCOPE_BYTES),
/// [`MAX_KEY_BYTES`](crate::MAX_KEY_BYTES) before hashing).
fn len32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).expect("scopes and keys are bounded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_the_documented_url_derivation() {
        let derived = Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            b"https://docs.rs/idempotent-runtime/outbox",
        );
        assert_eq!(NAMESPACE, derived);
    }

    #[test]
    fn ids_follow_the_documented_bytes() {
        let key = RecordKey::new("pay", "o-1").unwrap();
        let mut name = Vec::new();
        name.extend_from_slice(&3u32.to_be_bytes());
        name.extend_from_slice(b"pay");
        name.extend_from_slice(&3u32.to_be_bytes());
        name.extend_from_slice(b"o-1");
        name.push(0);
        name.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            message_id(&key, Emission::Position(2)),
            Uuid::new_v5(&NAMESPACE, &name)
        );
        // the same id computed apart from this crate (Python's hashlib, RFC 9562 §5.5)
        assert_eq!(
            message_id(&key, Emission::Position(2)).to_string(),
            "8c2bbde2-46ee-5514-be1e-57498dfb4199"
        );
    }

    #[test]
    fn scope_key_and_emission_cannot_run_into_each_other() {
        let a = RecordKey::new("ab", "c").unwrap();
        let b = RecordKey::new("a", "bc").unwrap();
        assert_ne!(
            message_id(&a, Emission::Position(0)),
            message_id(&b, Emission::Position(0))
        );
        assert_ne!(
            message_id(&a, Emission::Named("\0\0\0\0")),
            message_id(&a, Emission::Position(0))
        );
    }
}
