//! Reading the `Idempotency-Key` header: a Structured Field Item (RFC 9651) whose bare
//! item is a String, at most once per request.

use http::HeaderMap;
use http::header::HeaderName;
use sfv::visitor::{ItemVisitor, ParameterVisitor};
use sfv::{BareItemFromInput, KeyRef, Parser};
use std::convert::Infallible;
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
    /// The value is not one Structured Field Item whose bare item is a String (`"…"`)
    /// or a token (see [`parse_key`]).
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
/// The header is parsed as a Structured Field Item (RFC 9651), as the draft defines
/// it: its bare item is a String (`"8e03978e-40d5"`, with `\"` and `\\` escapes), and
/// parameters after it (`"8e03978e-40d5";v=1`) are allowed and ignored. Two forms
/// without quotes, as many clients send keys, are accepted too: an Item whose bare item
/// is a Token (`ab12-cd34`, which starts with a letter or `*`), and, as a leniency
/// beyond the grammar, a run of token characters (letters, digits, ``!#$%&'*+-.^_`|~``,
/// `:` and `/`) that starts with a digit (`8e03978e-40d5`, as UUIDs often do), with
/// the same optional parameters. Anything else is refused: other kinds of items, a list
/// of keys (a second member after a comma), broken parameters, trailing characters.
/// `max_len` bounds the key's length in bytes.
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

/// A character of an sf-token after its first: `tchar`, `:` or `/`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b)
}

/// What the bare item of the value is.
enum Bare {
    /// A String or a Token: a key.
    Key(String),
    /// Another kind of item (a number, a Boolean, a Byte Sequence, a Date, a Display
    /// String): not a key.
    Other,
}

/// How far the parse of the value got.
#[derive(Default)]
struct Progress {
    /// Set once the bare item is parsed.
    bare_item: bool,
    /// Set once its parameters are parsed, so the whole Item is.
    item: bool,
}

/// Reads the bare item and records how far the parse got; the parameters are validated
/// by the parser and otherwise ignored.
struct ItemReader<'p>(&'p mut Progress);

impl<'de> ItemVisitor<'de> for ItemReader<'_> {
    type Out = Bare;
    type Error = Infallible;

    fn bare_item(
        self,
        bare_item: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Bare>, Infallible> {
        self.0.bare_item = true;
        let bare = match bare_item {
            BareItemFromInput::String(s) => Bare::Key(s.as_str().to_owned()),
            BareItemFromInput::Token(t) => Bare::Key(t.as_str().to_owned()),
            _ => Bare::Other,
        };
        Ok(ParameterReader {
            progress: self.0,
            bare,
        })
    }
}

struct ParameterReader<'p> {
    progress: &'p mut Progress,
    bare: Bare,
}

impl<'de> ParameterVisitor<'de> for ParameterReader<'_> {
    type Out = Bare;
    type Error = Infallible;

    fn parameter(
        &mut self,
        _key: &'de KeyRef,
        _value: BareItemFromInput<'de>,
    ) -> Result<(), Infallible> {
        Ok(())
    }

    fn finish(self) -> Result<Bare, Infallible> {
        self.progress.item = true;
        Ok(self.bare)
    }
}

fn parse_value(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    // the field value without the optional whitespace around it
    let start = raw.iter().position(|&b| !is_ows(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|&b| !is_ows(b))
        .map_or(start, |i| i + 1);
    let v = &raw[start..end];
    if !v.is_ascii() {
        return Err(KeyError::NotAscii);
    }
    if v.is_empty() {
        return Err(KeyError::Empty);
    }
    // The leniency: a bare key that starts with a digit is read as a number by the
    // grammar. Its run of token characters is the key; a one-letter token stands in
    // for it so that the parser checks what follows (parameters, nothing else).
    let digits_first;
    let (lenient, input) = if v[0].is_ascii_digit() {
        let n = v.iter().take_while(|&&b| is_token_char(b)).count();
        digits_first = [b"k".as_slice(), &v[n..]].concat();
        (Some(&v[..n]), digits_first.as_slice())
    } else {
        (None, v)
    };

    let mut progress = Progress::default();
    let key = match Parser::new(input).parse_item_with_visitor(ItemReader(&mut progress)) {
        Ok(bare) => match (lenient, bare) {
            // checked above: ASCII token characters
            (Some(run), _) => String::from_utf8_lossy(run).into_owned(),
            (None, Bare::Key(key)) => key,
            (None, Bare::Other) => {
                return Err(KeyError::Malformed {
                    reason: "the item is not a string (\"…\") nor a token",
                });
            }
        },
        Err(e) => return Err(refusal(input, &e, &progress)),
    };
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

/// Why `input` is not one Item, from where its parse stopped.
fn refusal(input: &[u8], e: &sfv::Error, progress: &Progress) -> KeyError {
    let at = e.index().unwrap_or(input.len()).min(input.len());
    if progress.item {
        // a whole Item, then more: a second list member, or garbage
        let rest = &input[at..];
        let next = rest.iter().position(|&b| !is_ows(b)).map(|i| rest[i]);
        return if next == Some(b',') {
            KeyError::Repeated
        } else {
            KeyError::Malformed {
                reason: "unexpected characters after the key",
            }
        };
    }
    if progress.bare_item {
        return KeyError::Malformed {
            reason: "a parameter after the key is not `;name` or `;name=value`",
        };
    }
    if input.first() == Some(&b'"') {
        return match input.get(at) {
            // the parser stops at a control character (such as a tab) in a string
            Some(&b) if b < 0x20 || b == 0x7f => KeyError::NotAscii,
            None => KeyError::Malformed {
                reason: "the closing quote is missing",
            },
            Some(_) => KeyError::Malformed {
                reason: "a backslash may only escape `\"` or `\\`",
            },
        };
    }
    KeyError::Malformed {
        reason: "a key is a string (\"…\") or a token",
    }
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

    fn key(v: &[u8]) -> String {
        match one(v) {
            Ok(Some(k)) => k,
            other => panic!("{:?} refused: {other:?}", String::from_utf8_lossy(v)),
        }
    }

    fn malformed(v: &[u8]) -> &'static str {
        match one(v) {
            Err(KeyError::Malformed { reason }) => reason,
            other => panic!("{:?} not malformed: {other:?}", String::from_utf8_lossy(v)),
        }
    }

    #[test]
    fn absent_header_is_no_key() {
        assert_eq!(parse_key(&HeaderMap::new(), 255).unwrap(), None);
    }

    #[test]
    fn strings_are_keys() {
        assert_eq!(key(b"\"abc-1\""), "abc-1");
        assert_eq!(key(b"\"8e03978e-40d5\""), "8e03978e-40d5");
        assert_eq!(key(b" \"a b\" "), "a b");
        assert_eq!(key(b"\t\"a\"\t"), "a");
        assert_eq!(key(b"\"a\\\"b\\\\c\""), "a\"b\\c");
        assert_eq!(key(b"\"a,b;c=d\""), "a,b;c=d");
        assert_eq!(key(b"\"~!@#$%^&*()\""), "~!@#$%^&*()");
    }

    #[test]
    fn parameters_are_ignored() {
        assert_eq!(key(b"\"k\";v=1"), "k");
        assert_eq!(key(b"\"k\"; v=1"), "k");
        assert_eq!(key(b"\"k\";a;b=?0;c=\"x;y\";d=tok;e=1.5;f=:aGk=:"), "k");
        assert_eq!(key(b"abc-1;v=1"), "abc-1");
        assert_eq!(key(b"8e03978e-40d5;v=1"), "8e03978e-40d5");
    }

    #[test]
    fn tokens_are_keys() {
        assert_eq!(key(b"abc-1"), "abc-1");
        assert_eq!(key(b"*star"), "*star");
        assert_eq!(key(b"Order/17:retry.2"), "Order/17:retry.2");
        assert_eq!(key(b"a!#$%&'*+-.^_`|~:/z"), "a!#$%&'*+-.^_`|~:/z");
    }

    #[test]
    fn bare_keys_may_start_with_a_digit() {
        assert_eq!(key(b"8e03978e-40d5"), "8e03978e-40d5");
        assert_eq!(
            key(b"123e4567-e89b-12d3-a456-426614174000"),
            "123e4567-e89b-12d3-a456-426614174000"
        );
        assert_eq!(key(b"42"), "42");
        assert_eq!(key(b"1.5"), "1.5");
        assert_eq!(key(b" 7/a:b "), "7/a:b");
    }

    #[test]
    fn lists_are_repeated_keys() {
        assert_eq!(one(b"\"a\", \"b\"").unwrap_err(), KeyError::Repeated);
        assert_eq!(
            one(b"\"q-1\";v=1, \"other\"").unwrap_err(),
            KeyError::Repeated
        );
        assert_eq!(one(b"\"a\"\t,\"b\"").unwrap_err(), KeyError::Repeated);
        assert_eq!(one(b"\"a\",").unwrap_err(), KeyError::Repeated);
        assert_eq!(one(b"a,b").unwrap_err(), KeyError::Repeated);
        assert_eq!(one(b"8e03, 9f04").unwrap_err(), KeyError::Repeated);
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("\"a\""));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("\"a\""));
        assert_eq!(parse_key(&h, 255).unwrap_err(), KeyError::Repeated);
    }

    #[test]
    fn broken_parameters_are_malformed() {
        let param = "a parameter after the key is not `;name` or `;name=value`";
        assert_eq!(malformed(b"\"r-1\";;;!!"), param);
        assert_eq!(malformed(b"\"k\";"), param);
        assert_eq!(malformed(b"\"k\";V=1"), param);
        assert_eq!(malformed(b"\"k\";v="), param);
        assert_eq!(malformed(b"\"k\";v=\"open"), param);
        assert_eq!(malformed(b"abc;!"), param);
        assert_eq!(malformed(b"8e03978e-40d5;;"), param);
    }

    #[test]
    fn trailing_characters_are_malformed() {
        let trailing = "unexpected characters after the key";
        assert_eq!(malformed(b"\"a\"x"), trailing);
        assert_eq!(malformed(b"\"a\" ;v=1"), trailing);
        assert_eq!(malformed(b"a b"), trailing);
        assert_eq!(malformed(b"abc=="), trailing);
        assert_eq!(malformed(b"8e03978e-40d5\"x\""), trailing);
        assert_eq!(malformed(b"8e03 9f04"), trailing);
    }

    #[test]
    fn broken_strings_are_malformed() {
        assert_eq!(malformed(b"\"abc"), "the closing quote is missing");
        assert_eq!(malformed(b"\"abc\\"), "the closing quote is missing");
        assert_eq!(
            malformed(b"\"a\\n\""),
            "a backslash may only escape `\"` or `\\`"
        );
        assert_eq!(one(b"\"a\tb\"").unwrap_err(), KeyError::NotAscii);
    }

    #[test]
    fn other_items_are_malformed() {
        let not_a_key = "the item is not a string (\"…\") nor a token";
        assert_eq!(malformed(b"?1"), not_a_key);
        assert_eq!(malformed(b":aGk=:"), not_a_key);
        assert_eq!(malformed(b"-5"), not_a_key);
        assert_eq!(malformed(b"@1700000000"), not_a_key);
        assert_eq!(malformed(b"%\"k\""), not_a_key);
        let not_an_item = "a key is a string (\"…\") or a token";
        assert_eq!(malformed(b"(\"a\" \"b\")"), not_an_item);
        assert_eq!(malformed(b"#abc"), not_an_item);
        assert_eq!(malformed(b"{8e03978e}"), not_an_item);
        assert_eq!(malformed(b";v=1"), not_an_item);
        assert_eq!(malformed(b"-x"), not_an_item);
    }

    #[test]
    fn empty_long_and_non_ascii_keys_are_refused() {
        assert_eq!(one(b"\"\"").unwrap_err(), KeyError::Empty);
        assert_eq!(one(b"\"\";v=1").unwrap_err(), KeyError::Empty);
        assert_eq!(one(b"").unwrap_err(), KeyError::Empty);
        assert_eq!(one(b"   ").unwrap_err(), KeyError::Empty);
        assert_eq!(
            one("\"caf\u{e9}\"".as_bytes()).unwrap_err(),
            KeyError::NotAscii
        );
        assert_eq!(one("caf\u{e9}".as_bytes()).unwrap_err(), KeyError::NotAscii);
        let long = format!("\"{}\"", "k".repeat(10_000));
        assert_eq!(
            one(long.as_bytes()).unwrap_err(),
            KeyError::TooLong {
                len: 10_000,
                max: 255
            }
        );
        let long = format!("8{}", "k".repeat(299));
        assert_eq!(
            one(long.as_bytes()).unwrap_err(),
            KeyError::TooLong { len: 300, max: 255 }
        );
        assert_eq!(key("k".repeat(255).as_bytes()).len(), 255);
    }

    #[test]
    fn every_refusal_names_its_code() {
        for (v, code) in [
            (
                b"\"q-1\";v=1, \"other\"".as_slice(),
                "idempotency_key_repeated",
            ),
            (b"\"r-1\";;;!!", "idempotency_key_malformed"),
            (b"\"\"", "idempotency_key_empty"),
        ] {
            assert_eq!(one(v).unwrap_err().code(), code);
        }
    }
}
