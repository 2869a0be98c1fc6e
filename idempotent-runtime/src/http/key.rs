//! Reading the `Idempotency-Key` header: a Structured Field String (RFC 8941), at most
//! once per request.

use http::HeaderMap;
use http::header::HeaderName;
use std::fmt;

/// The `Idempotency-Key` request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Why an `Idempotency-Key` header was refused; each is answered with `400 Bad Request`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The header is absent and the route requires it.
    Missing,
    /// The header appears more than once, or holds a list (`"a", "b"`).
    Repeated,
    /// The key is the empty string.
    Empty,
    /// The key is longer than the configured maximum.
    TooLong {
        /// Length of the key, in bytes.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The key has characters outside printable ASCII.
    NotAscii,
    /// The value is not a Structured Field String (`"…"`) nor a bare token.
    Malformed {
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl KeyError {
    /// A stable, machine-readable name of the problem (the `code` member of the
    /// `application/problem+json` body).
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::Missing => "idempotency_key_missing",
            KeyError::Repeated => "idempotency_key_repeated",
            KeyError::Empty => "idempotency_key_empty",
            KeyError::TooLong { .. } => "idempotency_key_too_long",
            KeyError::NotAscii => "idempotency_key_not_ascii",
            KeyError::Malformed { .. } => "idempotency_key_malformed",
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Missing => f.write_str(
                "this operation requires an Idempotency-Key header; send a unique value \
                 (for example a UUID) as a quoted string, and the same value on every retry",
            ),
            KeyError::Repeated => {
                f.write_str("the Idempotency-Key header must appear once and hold one key")
            }
            KeyError::Empty => f.write_str("the Idempotency-Key header is an empty string"),
            KeyError::TooLong { len, max } => write!(
                f,
                "the Idempotency-Key is {len} bytes long; at most {max} are accepted"
            ),
            KeyError::NotAscii => f.write_str(
                "the Idempotency-Key must be printable ASCII (a Structured Field String)",
            ),
            KeyError::Malformed { reason } => write!(
                f,
                "the Idempotency-Key is not a Structured Field String: {reason}"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// The key of a request: `Ok(None)` when the header is absent.
///
/// Accepted forms: the draft's Structured Field String (`"8e03978e-40d5"`, with `\"` and
/// `\\` escapes, optionally followed by parameters, which are ignored) and, as many
/// clients send it, a bare token of printable ASCII without quotes, spaces, commas or
/// semicolons (`8e03978e-40d5`). `max_len` bounds the key's length in bytes.
pub fn parse_key(headers: &HeaderMap, max_len: usize) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_value(value.as_bytes(), max_len).map(Some)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn parse_value(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    let start = raw.iter().position(|&b| !is_ows(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|&b| !is_ows(b))
        .map_or(start, |i| i + 1);
    let v = &raw[start..end];
    if v.iter().any(|&b| !b.is_ascii()) {
        return Err(KeyError::NotAscii);
    }
    if v.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = if v[0] == b'"' { quoted(v)? } else { bare(v)? };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(key)
}

/// An sf-string: `"` chars `"`, then optional parameters.
fn quoted(v: &[u8]) -> Result<String, KeyError> {
    let mut key = String::with_capacity(v.len());
    let mut i = 1;
    loop {
        let Some(&b) = v.get(i) else {
            return Err(KeyError::Malformed {
                reason: "the closing quote is missing",
            });
        };
        i += 1;
        match b {
            b'"' => break,
            b'\\' => match v.get(i) {
                Some(&e @ (b'"' | b'\\')) => {
                    key.push(char::from(e));
                    i += 1;
                }
                _ => {
                    return Err(KeyError::Malformed {
                        reason: "a backslash may only escape `\"` or `\\`",
                    });
                }
            },
            0x20..=0x7e => key.push(char::from(b)),
            _ => {
                return Err(KeyError::NotAscii);
            }
        }
    }
    let rest = &v[i..];
    let rest = &rest[rest.iter().position(|&b| !is_ows(b)).unwrap_or(rest.len())..];
    match rest.first() {
        None => Ok(key),
        // parameters of the item: allowed by RFC 8941, unused here
        Some(b';') => Ok(key),
        Some(b',') => Err(KeyError::Repeated),
        Some(_) => Err(KeyError::Malformed {
            reason: "unexpected characters after the closing quote",
        }),
    }
}

/// A bare token, as clients that do not quote send it.
fn bare(v: &[u8]) -> Result<String, KeyError> {
    for &b in v {
        match b {
            b',' => return Err(KeyError::Repeated),
            b'"' | b'\\' | b';' | b' ' | b'\t' => {
                return Err(KeyError::Malformed {
                    reason: "an unquoted key may not contain quotes, backslashes, semicolons or spaces",
                });
            }
            0x21..=0x7e => {}
            _ => return Err(KeyError::NotAscii),
        }
    }
    // checked: printable ASCII
    Ok(String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn one(v: &[u8]) -> Result<Option<String>, KeyError> {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
        parse_key(&h, 255)
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(one(b"\"abc-1\"").unwrap().unwrap(), "abc-1");
        assert_eq!(one(b" \"a b\" ").unwrap().unwrap(), "a b");
        assert_eq!(one(b"\"a\\\"b\\\\c\"").unwrap().unwrap(), "a\"b\\c");
        assert_eq!(one(b"\"k\";v=1").unwrap().unwrap(), "k");
        assert_eq!(one(b"8e03978e-40d5").unwrap().unwrap(), "8e03978e-40d5");
        assert_eq!(parse_key(&HeaderMap::new(), 255).unwrap(), None);
    }

    #[test]
    fn refused_forms() {
        assert_eq!(one(b"\"\"").unwrap_err(), KeyError::Empty);
        assert_eq!(one(b"   ").unwrap_err(), KeyError::Empty);
        assert_eq!(
            one("\"caf\u{e9}\"".as_bytes()).unwrap_err(),
            KeyError::NotAscii
        );
        assert_eq!(one(b"\"a\", \"b\"").unwrap_err(), KeyError::Repeated);
        assert_eq!(one(b"a,b").unwrap_err(), KeyError::Repeated);
        assert!(matches!(
            one(b"\"abc").unwrap_err(),
            KeyError::Malformed { .. }
        ));
        assert!(matches!(
            one(b"\"a\\n\"").unwrap_err(),
            KeyError::Malformed { .. }
        ));
        assert!(matches!(
            one(b"\"a\"x").unwrap_err(),
            KeyError::Malformed { .. }
        ));
        assert!(matches!(
            one(b"a b").unwrap_err(),
            KeyError::Malformed { .. }
        ));
        let long = format!("\"{}\"", "k".repeat(10_000));
        assert_eq!(
            one(long.as_bytes()).unwrap_err(),
            KeyError::TooLong {
                len: 10_000,
                max: 255
            }
        );
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("\"a\""));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("\"a\""));
        assert_eq!(parse_key(&h, 255).unwrap_err(), KeyError::Repeated);
    }
}
