//! Dedup keys: the [`KeyPart`] trait and the unambiguous, bounded [`RecordKey`] encoding.
//!
//! # Encoding
//!
//! A key is a list of one or more parts (a tuple key such as `(msg.topic, msg.id)` has
//! one part per element). The stored bytes are:
//!
//! - one part that does not start with a zero byte: the part's bytes as they are, so
//!   `"order-17"` is stored as `order-17` and reads naturally in the store;
//! - one part that starts with a zero byte: `00 00` followed by the part;
//! - several parts: `00 01` followed, for each part, by its length in decimal, `:`, and
//!   its bytes (`("a:b", "c")` is `00 01 3:a:b1:c`, `("a", "b:c")` is `00 01 1:a3:b:c`);
//! - any encoding longer than [`MAX_KEY_BYTES`]: `00 02` followed by the 32-byte
//!   SHA-256 of the encoding above.
//!
//! The three forms cannot collide with each other, so the encoding is injective up to
//! SHA-256 collisions. Every byte is data: stores pass keys as bound parameters or
//! binary-safe arguments, never as syntax.

use crate::error::Error;
use crate::inline::InlineBuf;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

/// Encoded keys longer than this many bytes are replaced by their SHA-256 hash.
pub const MAX_KEY_BYTES: usize = 128;

/// Scopes longer than this many bytes are shortened (with a hash suffix that keeps them distinct).
pub const MAX_SCOPE_BYTES: usize = idempotent_shared::MAX_SCOPE_BYTES;

/// A value that can be (part of) an idempotency key.
///
/// Implemented for strings, byte strings, integers, `char`, `bool`, tuples of key parts
/// (each element is one part of a composite key), `Option` (`None` is
/// [`Error::MissingKey`]) and references and smart pointers to any of these.
/// Implement it for your own id types by writing their bytes:
///
/// ```
/// use idempotent_runtime::{KeyPart, KeyBuilder};
///
/// struct OrderId(u64);
///
/// impl KeyPart for OrderId {
///     fn write_key(&self, key: &mut KeyBuilder) {
///         self.0.write_key(key)
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    label = "the key expression has type `{Self}`",
    note = "keys are strings, byte strings, integers, `char`, `bool`, tuples or `Option`s of those",
    note = "for an id type of your own, implement `idempotent_runtime::KeyPart` for it, or use a field or method that returns one of the types above"
)]
pub trait KeyPart {
    /// Appends this value to the key as one part (tuples append one part per element).
    fn write_key(&self, key: &mut KeyBuilder);
}

/// Collects the parts of a key; see [`KeyPart`].
///
/// Keys up to 64 bytes are collected without allocating.
pub struct KeyBuilder {
    // the parts: the first one raw while it is the only one, then every part
    // length-prefixed (`len:bytes`)
    bytes: InlineBuf<64>,
    parts: usize,
    missing: bool,
}

/// `n` in decimal, written at the end of `buf` (at least 20 bytes long).
fn decimal(mut n: usize, buf: &mut [u8]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

impl Default for KeyBuilder {
    fn default() -> Self {
        KeyBuilder {
            bytes: InlineBuf::new(),
            parts: 0,
            missing: false,
        }
    }
}

impl fmt::Debug for KeyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBuilder")
            .field("parts", &self.parts)
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

impl KeyBuilder {
    /// An empty key.
    pub fn new() -> Self {
        Self::default()
    }

    fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    fn extend_len_prefixed(&mut self, part: &[u8]) {
        let mut digits = [0u8; 21];
        self.bytes.extend(decimal(part.len(), &mut digits));
        self.bytes.extend(b":");
        self.bytes.extend(part);
    }

    /// Appends one part. An empty part marks the key as missing.
    pub fn push(&mut self, part: &[u8]) {
        if part.is_empty() {
            self.missing = true;
        }
        if self.parts == 1 {
            // the first part was stored raw; prefix it with its length, in place
            let first = self.bytes().len();
            let mut digits = [0u8; 22];
            let n = decimal(first, &mut digits[..21]).len();
            let prefix = &mut digits[21 - n..];
            prefix[n] = b':';
            self.bytes.prepend(&prefix[..=n]);
        }
        if self.parts == 0 {
            self.bytes.extend(part);
        } else {
            self.extend_len_prefixed(part);
        }
        self.parts += 1;
    }

    /// Marks the key as missing (an `Option` that is `None`).
    pub fn missing(&mut self) {
        self.missing = true;
    }

    /// Finishes the key into its stored encoding under `scope`.
    pub fn finish(self, scope: &str) -> Result<RecordKey, Error> {
        let mut key = RecordKey::EMPTY;
        self.finish_into(scope, &mut key)?;
        Ok(key)
    }

    /// [`Error::MissingKey`] if [`finish`](Self::finish) would fail.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.missing || self.parts == 0 {
            return Err(Error::MissingKey);
        }
        Ok(())
    }

    /// As [`finish`](Self::finish), into `key` where it lies (moving a finished key
    /// costs more than writing it in place).
    pub(crate) fn finish_into(&self, scope: &str, key: &mut RecordKey) -> Result<(), Error> {
        self.check()?;
        let body = self.bytes();
        let prefix: &[u8] = match (self.parts, body.first()) {
            (1, Some(0)) => &[0, 0],
            (1, _) => &[],
            _ => &[0, 1],
        };
        if prefix.len() + body.len() > MAX_KEY_BYTES {
            let mut h = Sha256::new();
            h.update(prefix);
            h.update(body);
            let digest = h.finalize();
            key.set(scope, &[&[0, 2], &digest]);
        } else {
            key.set(scope, &[prefix, body]);
        }
        Ok(())
    }
}

/// A scope and an encoded key: the identity of one dedup record.
///
/// Build one with [`RecordKey::new`] (any [`KeyPart`], encoded as the attribute does)
/// or [`RecordKey::from_encoded`] (bytes already in the stored encoding, e.g. read back
/// from a store).
#[derive(Clone)]
pub struct RecordKey {
    // [scope_len: u8][scope bytes][key bytes]: in `heap` if it is set, else in
    // `inline[..len]`. A plain struct, not an enum, so moving one is a straight copy.
    inline: [u8; INLINE_RECORD_KEY],
    len: usize,
    heap: Option<Box<[u8]>>,
}

/// Bytes of a [`RecordKey`] kept inline: a typical scope (a module path) and key fit,
/// so building one does not allocate.
const INLINE_RECORD_KEY: usize = 104;

impl RecordKey {
    /// Encodes `key` under `scope`. Fails with [`Error::MissingKey`] when the key is
    /// `None` or empty.
    pub fn new<K: KeyPart + ?Sized>(scope: &str, key: &K) -> Result<Self, Error> {
        let mut b = KeyBuilder::new();
        key.write_key(&mut b);
        b.finish(scope)
    }

    /// A record key from bytes already in the stored encoding (see the module docs).
    pub fn from_encoded(scope: &str, encoded: &[u8]) -> Self {
        Self::from_parts(scope, &[encoded])
    }

    /// No bytes: only a place to [`set`](Self::set) a key into.
    pub(crate) const EMPTY: RecordKey = RecordKey {
        heap: None,
        len: 0,
        inline: [0; INLINE_RECORD_KEY],
    };

    fn from_parts(scope: &str, parts: &[&[u8]]) -> Self {
        let mut key = Self::EMPTY;
        key.set(scope, parts);
        key
    }

    /// Sets scope length, scope and key parts: inline when they fit, else in one
    /// allocation of exactly the right size.
    fn set(&mut self, scope: &str, parts: &[&[u8]]) {
        let scope = bounded_scope(scope);
        let len = 1 + scope.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        if len <= INLINE_RECORD_KEY {
            self.heap = None;
            self.len = len;
            let bytes = &mut self.inline;
            bytes[0] = scope.len() as u8;
            let mut at = 1 + scope.len();
            bytes[1..at].copy_from_slice(scope.as_bytes());
            for p in parts {
                bytes[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            return;
        }
        let mut buf = Vec::with_capacity(len);
        buf.push(scope.len() as u8);
        buf.extend_from_slice(scope.as_bytes());
        for p in parts {
            buf.extend_from_slice(p);
        }
        self.heap = Some(buf.into_boxed_slice());
        self.len = len;
    }

    fn buf(&self) -> &[u8] {
        match &self.heap {
            None => &self.inline[..self.len],
            Some(b) => b,
        }
    }

    /// The scope (namespace) of the record.
    pub fn scope(&self) -> &str {
        let buf = self.buf();
        let n = buf[0] as usize;
        // built from a &str in `from_encoded`, cut on a char boundary by `bounded_scope`
        std::str::from_utf8(&buf[1..1 + n]).unwrap_or_default()
    }

    /// The encoded key bytes, at most [`MAX_KEY_BYTES`] long (plus two when hashed).
    pub fn key(&self) -> &[u8] {
        let buf = self.buf();
        let n = buf[0] as usize;
        &buf[1 + n..]
    }

    /// Scope and key in one unambiguous byte string (a length byte, the scope, the key);
    /// handy as a map key for in-process stores.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf()
    }

    /// Whether the key is the SHA-256 of an encoding that was too long.
    pub fn is_hashed(&self) -> bool {
        self.key().starts_with(&[0, 2])
    }
}

impl PartialEq for RecordKey {
    fn eq(&self, other: &Self) -> bool {
        self.buf() == other.buf()
    }
}

impl Eq for RecordKey {}

impl std::hash::Hash for RecordKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.buf().hash(state)
    }
}

impl PartialOrd for RecordKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RecordKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.buf().cmp(other.buf())
    }
}

impl fmt::Debug for RecordKey {
    /// Shows the scope and the length of the key, never the key itself: keys are
    /// message data and may be personal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKey")
            .field("scope", &self.scope())
            .field("key_len", &self.key().len())
            .finish()
    }
}

impl fmt::Display for RecordKey {
    /// `scope/key` with the key's bytes escaped as in a Rust byte string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope(), self.key().escape_ascii())
    }
}

fn bounded_scope(scope: &str) -> Cow<'_, str> {
    if scope.len() <= MAX_SCOPE_BYTES {
        return Cow::Borrowed(scope);
    }
    let digest = Sha256::digest(scope.as_bytes());
    let mut cut = MAX_SCOPE_BYTES - 17;
    while !scope.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut s = String::with_capacity(MAX_SCOPE_BYTES);
    s.push_str(&scope[..cut]);
    s.push('~');
    for b in &digest[..8] {
        s.push_str(&format!("{b:02x}"));
    }
    Cow::Owned(s)
}

macro_rules! key_part_bytes {
    ($($t:ty => |$s:ident| $e:expr),* $(,)?) => {$(
        impl KeyPart for $t {
            fn write_key(&self, key: &mut KeyBuilder) {
                let $s = self;
                key.push($e)
            }
        }
    )*};
}

key_part_bytes! {
    str => |s| s.as_bytes(),
    String => |s| s.as_bytes(),
    [u8] => |s| s,
    Vec<u8> => |s| s.as_slice(),
}

impl<const N: usize> KeyPart for [u8; N] {
    fn write_key(&self, key: &mut KeyBuilder) {
        key.push(self)
    }
}

macro_rules! key_part_display {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn write_key(&self, key: &mut KeyBuilder) {
                let mut buf = [0u8; 48];
                let s = {
                    use std::io::Write;
                    let mut cur = std::io::Cursor::new(&mut buf[..]);
                    // integers, chars and bools fit in 48 bytes
                    let _ = write!(cur, "{}", self);
                    cur.position() as usize
                };
                key.push(&buf[..s])
            }
        }
    )*};
}

key_part_display!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, char, bool
);

impl<T: KeyPart + ?Sized> KeyPart for &T {
    fn write_key(&self, key: &mut KeyBuilder) {
        (**self).write_key(key)
    }
}

impl<T: KeyPart + ?Sized> KeyPart for &mut T {
    fn write_key(&self, key: &mut KeyBuilder) {
        (**self).write_key(key)
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Box<T> {
    fn write_key(&self, key: &mut KeyBuilder) {
        (**self).write_key(key)
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Arc<T> {
    fn write_key(&self, key: &mut KeyBuilder) {
        (**self).write_key(key)
    }
}

impl<T: KeyPart + ?Sized> KeyPart for Rc<T> {
    fn write_key(&self, key: &mut KeyBuilder) {
        (**self).write_key(key)
    }
}

impl<T: KeyPart + ?Sized + ToOwned> KeyPart for Cow<'_, T> {
    fn write_key(&self, key: &mut KeyBuilder) {
        (**self).write_key(key)
    }
}

impl<T: KeyPart> KeyPart for Option<T> {
    fn write_key(&self, key: &mut KeyBuilder) {
        match self {
            Some(v) => v.write_key(key),
            None => key.missing(),
        }
    }
}

macro_rules! key_part_tuple {
    ($($name:ident)+) => {
        impl<$($name: KeyPart),+> KeyPart for ($($name,)+) {
            #[allow(non_snake_case)]
            fn write_key(&self, key: &mut KeyBuilder) {
                let ($($name,)+) = self;
                $($name.write_key(key);)+
            }
        }
    };
}

key_part_tuple!(A);
key_part_tuple!(A B);
key_part_tuple!(A B C);
key_part_tuple!(A B C D);
key_part_tuple!(A B C D E);
key_part_tuple!(A B C D E F);
key_part_tuple!(A B C D E F G);
key_part_tuple!(A B C D E F G H);

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: KeyPart + ?Sized>(k: &K) -> Vec<u8> {
        RecordKey::new("s", k).unwrap().key().to_vec()
    }

    #[test]
    fn single_string_is_stored_as_is() {
        assert_eq!(enc("order-17"), b"order-17");
        assert_eq!(enc(&42u64), b"42");
    }

    #[test]
    fn composite_keys_are_unambiguous() {
        assert_ne!(enc(&("a:b", "c")), enc(&("a", "b:c")));
        assert_ne!(enc(&("ab", "c")), enc(&("a", "bc")));
        assert_eq!(enc(&("a:b", "c")), b"\x00\x013:a:b1:c");
        // a single part can never look like a composite or a hash
        assert_ne!(enc(b"\x00\x013:a:b1:c".as_slice()), enc(&("a:b", "c")));
        assert_eq!(enc(b"\x00\x01".as_slice()), b"\x00\x00\x00\x01");
    }

    #[test]
    fn composite_keys_of_any_length_use_the_same_encoding() {
        for first in [0usize, 1, 9, 10, 60, 61, 62, 63, 64, 65, 99, 100] {
            let a = "a".repeat(first);
            let mut want = b"\x00\x01".to_vec();
            want.extend_from_slice(format!("{first}:{a}2:bc").as_bytes());
            let got = RecordKey::new("s", &(a.as_str(), "bc"));
            if first == 0 {
                assert!(matches!(got, Err(Error::MissingKey)));
                continue;
            }
            let got = got.unwrap();
            if want.len() > MAX_KEY_BYTES {
                assert!(got.is_hashed());
                let hashed = RecordKey::from_parts("s", &[&[0, 2], &Sha256::digest(&want)]);
                assert_eq!(got, hashed);
            } else {
                assert_eq!(got.key(), want.as_slice(), "first part of {first} bytes");
            }
        }
    }

    #[test]
    fn long_record_keys_equal_their_inline_peers() {
        let scope = "m".repeat(MAX_SCOPE_BYTES);
        let long = RecordKey::new(&scope, "k").unwrap();
        let short = RecordKey::new("s", "k").unwrap();
        assert_eq!(long.scope(), scope);
        assert_eq!(long.key(), b"k");
        assert_eq!(long.clone(), long);
        assert_ne!(long, short);
        assert_eq!(
            RecordKey::from_encoded(long.scope(), long.key()).as_bytes(),
            long.as_bytes()
        );
    }

    #[test]
    fn scopes_are_separate() {
        let a = RecordKey::new("ab", "c").unwrap();
        let b = RecordKey::new("a", "bc").unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.scope(), "ab");
        assert_eq!(a.key(), b"c");
    }

    #[test]
    fn long_keys_are_hashed_to_a_bounded_length() {
        let long = "x".repeat(100_000);
        let k = RecordKey::new("s", long.as_str()).unwrap();
        assert!(k.is_hashed());
        assert_eq!(k.key().len(), 34);
        let other = format!("{}y", &long[1..]);
        assert_ne!(k, RecordKey::new("s", other.as_str()).unwrap());
        let exact = "x".repeat(MAX_KEY_BYTES);
        assert_eq!(enc(exact.as_str()), exact.as_bytes());
    }

    #[test]
    fn missing_and_empty_keys() {
        assert!(matches!(RecordKey::new("s", ""), Err(Error::MissingKey)));
        assert!(matches!(
            RecordKey::new("s", &None::<String>),
            Err(Error::MissingKey)
        ));
        assert!(matches!(
            RecordKey::new("s", &("a", "")),
            Err(Error::MissingKey)
        ));
        assert_eq!(enc(&Some("x")), b"x");
    }

    #[test]
    fn long_scopes_are_bounded_and_distinct() {
        let a = "m::".repeat(100) + "a";
        let b = "m::".repeat(100) + "b";
        let ka = RecordKey::new(&a, "k").unwrap();
        let kb = RecordKey::new(&b, "k").unwrap();
        assert!(ka.scope().len() <= MAX_SCOPE_BYTES);
        assert_ne!(ka.scope(), kb.scope());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = RecordKey::new("s", "secret-card-number").unwrap();
        assert!(!format!("{k:?}").contains("secret"));
    }
}
