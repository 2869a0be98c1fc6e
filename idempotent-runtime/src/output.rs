//! The output codec: how a handler's output is written to the store and read back.
//!
//! Two forms share the store's `output` column:
//!
//! - **JSON**, for every `Serialize + DeserializeOwned` output (the attribute, the manual
//!   API, batches): the value's JSON text, as is. An output whose `Serialize` fails is
//!   cached as the byte `0x01` and the serializer's message, so duplicates are told why
//!   (`NotReplayable::NotSerializable`).
//! - **Raw bytes**, for outputs that are bytes already (an HTTP response: status,
//!   headers and body): the tag byte [`RAW_TAG`] followed by the bytes, never base64 in
//!   JSON. JSON text never starts with that byte, so the two forms cannot be mistaken
//!   for each other: a JSON output read as raw, or raw bytes read as JSON, is
//!   [`Error::OutputNotReplayable`] instead of a wrong value.

use crate::error::{Error, NotReplayable};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::Write;

/// A serialized output: its first 64 bytes on the stack, so most outputs (`()`, ids,
/// small receipts) are cached without allocating.
pub(crate) type OutputBuf = crate::inline::InlineBuf<64>;

/// First byte of a cached output that holds no value but the reason it could not be
/// cached (JSON text never starts with it), followed by that reason in UTF-8.
const NOT_CACHED: u8 = 0x01;

/// Whether a serialized output fits the cache; warns when it does not.
pub(crate) fn fits(size: usize, cap: usize) -> bool {
    if size > cap {
        tracing::warn!(
            size,
            cap,
            "handler output is over the cache cap; duplicates will get OutputNotReplayable"
        );
        return false;
    }
    true
}

/// What is cached for an output that does not serialize: the marker and the reason,
/// so that duplicates are told why they get no value.
pub(crate) fn not_serializable(e: &serde_json::Error) -> Vec<u8> {
    tracing::warn!(error = %e, "handler output does not serialize; it is not cached");
    let mut v = vec![NOT_CACHED];
    v.extend_from_slice(e.to_string().as_bytes());
    v.truncate(1024);
    v
}

/// Serializes an output for the cache; `None` when it is over the cap. An output that
/// cannot be serialized is cached as the reason why (it is still returned to the caller).
pub(crate) fn encode_output<T: Serialize>(value: &T, cap: usize) -> Option<Vec<u8>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => fits(bytes.len(), cap).then_some(bytes),
        Err(e) => Some(not_serializable(&e)),
    }
}

/// The cached form of an output (see [`Output`]), in a buffer that stays on the stack
/// for small outputs; `None` when it is not cached.
pub(crate) fn encode_output_buf<T: Output>(value: &T, cap: usize) -> Option<OutputBuf> {
    let mut buf = OutputBuf::new();
    value.encode(&mut buf, cap).then_some(buf)
}

pub(crate) fn decode_output<T: DeserializeOwned>(output: Option<Vec<u8>>) -> Result<T, Error> {
    match output {
        None => Err(Error::OutputNotReplayable {
            reason: NotReplayable::TooLarge,
        }),
        Some(bytes) if bytes.first() == Some(&NOT_CACHED) => Err(Error::OutputNotReplayable {
            reason: NotReplayable::NotSerializable {
                message: String::from_utf8_lossy(&bytes[1..]).into_owned(),
            },
        }),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::OutputNotReplayable {
            reason: NotReplayable::Decode(e),
        }),
    }
}

/// First byte of a raw-bytes output.
pub(crate) const RAW_TAG: u8 = 0x00;

/// An output the protocol can cache and replay.
pub(crate) trait Output: Sized {
    /// Writes the cached form of `self` into `buf`; false (after logging why) when it is
    /// not cached. `cap` is the cap on the cached size in effect for the handler.
    fn encode(&self, buf: &mut OutputBuf, cap: usize) -> bool;

    /// Reads a cached output back; `None` is an output that was not cached.
    fn decode(cached: Option<Vec<u8>>) -> Result<Self, Error>;
}

impl<T: Serialize + DeserializeOwned> Output for T {
    #[inline]
    fn encode(&self, buf: &mut OutputBuf, cap: usize) -> bool {
        match serde_json::to_writer(&mut *buf, self) {
            Ok(()) => fits(buf.as_slice().len(), cap),
            Err(e) => {
                // cached as the reason, so duplicates are told why they get no value
                *buf = OutputBuf::new();
                let _ = buf.write_all(&not_serializable(&e));
                true
            }
        }
    }

    #[inline]
    fn decode(cached: Option<Vec<u8>>) -> Result<Self, Error> {
        decode_output(cached)
    }
}

/// Writes a raw-bytes output: the tag, then `parts` one after the other.
#[cfg_attr(not(feature = "tower"), allow(dead_code))]
pub(crate) fn write_raw(buf: &mut OutputBuf, parts: &[&[u8]]) {
    // an OutputBuf never fails a write
    let _ = buf.write_all(&[RAW_TAG]);
    for p in parts {
        let _ = buf.write_all(p);
    }
}

/// The bytes of a raw-bytes output, or why it cannot be replayed (`None`: it was not
/// cached; no tag: it was written by another codec).
#[cfg_attr(not(feature = "tower"), allow(dead_code))]
pub(crate) fn read_raw(cached: Option<&[u8]>) -> Result<&[u8], Error> {
    match cached {
        None => Err(Error::OutputNotReplayable {
            reason: NotReplayable::TooLarge,
        }),
        Some([RAW_TAG, rest @ ..]) => Ok(rest),
        Some(_) => Err(not_replayable("the cached output is not raw bytes")),
    }
}

/// [`Error::OutputNotReplayable`] for a cached output that does not decode.
#[cfg_attr(not(feature = "tower"), allow(dead_code))]
pub(crate) fn not_replayable(why: &str) -> Error {
    Error::OutputNotReplayable {
        reason: NotReplayable::Decode(<serde_json::Error as serde::de::Error>::custom(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_json_are_told_apart() {
        let mut buf = OutputBuf::new();
        write_raw(&mut buf, &[b"ab", b"c"]);
        assert_eq!(read_raw(Some(buf.as_slice())).unwrap(), b"abc");
        // JSON read as raw, raw read as JSON: errors, never a wrong value
        assert!(read_raw(Some(b"\"abc\"")).is_err());
        assert!(<String as Output>::decode(Some(buf.as_slice().to_vec())).is_err());
        assert!(matches!(
            read_raw(None),
            Err(Error::OutputNotReplayable {
                reason: NotReplayable::TooLarge
            })
        ));
    }

    #[test]
    fn json_outputs_round_trip() {
        let mut buf = OutputBuf::new();
        assert!(Output::encode(&(1u32, "x".to_owned()), &mut buf, 1024));
        let back: (u32, String) = Output::decode(Some(buf.as_slice().to_vec())).unwrap();
        assert_eq!(back, (1, "x".to_owned()));
        let mut small = OutputBuf::new();
        assert!(!Output::encode(&"too long".to_owned(), &mut small, 3));
    }
}
