//! Fingerprints: the SHA-256 of a value's JSON serialization.

use crate::error::Error;
use serde::Serialize;
use sha2::{Digest, Sha256};

struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fingerprint of a value: SHA-256 of its JSON serialization. Equal values give
/// equal fingerprints; the value itself is never stored.
pub fn fingerprint<F: Serialize + ?Sized>(value: &F) -> Result<[u8; 32], Error> {
    let mut w = HashWriter(Sha256::new());
    serde_json::to_writer(&mut w, value).map_err(Error::Fingerprint)?;
    Ok(w.0.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn equal_values_equal_fingerprints() {
        assert_eq!(
            fingerprint(&(1, "a")).unwrap(),
            fingerprint(&(1, "a")).unwrap()
        );
        assert_ne!(
            fingerprint(&(1, "a")).unwrap(),
            fingerprint(&(2, "a")).unwrap()
        );
    }

    #[test]
    fn unserializable_is_an_error_not_a_panic() {
        let mut m = HashMap::new();
        m.insert((1, 2), 3);
        assert!(matches!(fingerprint(&m), Err(Error::Fingerprint(_))));
    }
}
