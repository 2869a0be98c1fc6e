//! Decoding the replies of the library's functions into the store's types.

use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::store::{ClaimOutcome, Fence, Record, RecordState, Token};
use redis::Value;
use std::time::Duration;

/// A function reply, split into its code and the rest.
struct Reply<'a> {
    key: &'a RecordKey,
    op: &'static str,
    items: Vec<Value>,
}

impl<'a> Reply<'a> {
    fn new(key: &'a RecordKey, op: &'static str, v: Value) -> Result<(i64, Self), StoreError> {
        let mut r = Reply {
            key,
            op,
            items: Vec::new(),
        };
        let Value::Array(items) = v else {
            return Err(r.unexpected());
        };
        r.items = items;
        let code = r.int(0)?;
        if code == 0 {
            let reason = match r.items.get(1) {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => "unreadable record".to_owned(),
            };
            return Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "the Redis key of a record in scope `{}` holds data that is not an \
                     idempotency record ({reason}); inspect it with `redis-cli` and delete it \
                     with `forget` if it is stale",
                    key.scope()
                ),
            ));
        }
        Ok((code, r))
    }

    fn unexpected(&self) -> StoreError {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!(
                "unexpected reply from the Redis {} function for a record in scope `{}`",
                self.op,
                self.key.scope()
            ),
        )
    }

    fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.items.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            _ => Err(self.unexpected()),
        }
    }

    fn uint<T: TryFrom<i64>>(&self, i: usize) -> Result<T, StoreError> {
        T::try_from(self.int(i)?).map_err(|_| self.unexpected())
    }

    fn bytes(&mut self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.items.get_mut(i) {
            Some(Value::BulkString(b)) => Ok(std::mem::take(b)),
            _ => Err(self.unexpected()),
        }
    }

    fn fence(self, code: i64) -> Result<Fence, StoreError> {
        match code {
            1 => Ok(Fence::Held),
            2 => Ok(Fence::Lost),
            _ => Err(self.unexpected()),
        }
    }
}

pub(super) fn claim_outcome(key: &RecordKey, v: Value) -> Result<ClaimOutcome, StoreError> {
    let v = match v {
        Value::Int(token) if token > 0 => {
            return Ok(ClaimOutcome::Acquired {
                token: Token(token.unsigned_abs()),
                attempt: 1,
            });
        }
        Value::BulkString(output) => {
            return Ok(ClaimOutcome::Completed {
                output: Some(output),
            });
        }
        v => v,
    };
    let (code, mut r) = Reply::new(key, "claim", v)?;
    Ok(match code {
        1 => ClaimOutcome::Acquired {
            token: Token(r.uint(1)?),
            attempt: r.uint(2)?,
        },
        2 => ClaimOutcome::Completed {
            output: if r.items.len() > 1 {
                Some(r.bytes(1)?)
            } else {
                None
            },
        },
        3 => ClaimOutcome::InProgress {
            retry_after: Duration::from_micros(r.uint(1)?),
        },
        4 => ClaimOutcome::Exhausted {
            attempts: r.uint(1)?,
        },
        5 => ClaimOutcome::FingerprintMismatch,
        _ => return Err(r.unexpected()),
    })
}

/// A fence reply: `1` held, `2` lost, or `{0, reason}` for data that is not a record.
pub(super) fn fence(key: &RecordKey, op: &'static str, v: Value) -> Result<Fence, StoreError> {
    match v {
        Value::Int(1) => Ok(Fence::Held),
        Value::Int(2) => Ok(Fence::Lost),
        v => {
            let (code, r) = Reply::new(key, op, v)?;
            r.fence(code)
        }
    }
}

pub(super) fn record(key: &RecordKey, v: Value) -> Result<Option<Record>, StoreError> {
    let (code, mut r) = Reply::new(key, "inspect", v)?;
    match code {
        2 => return Ok(None),
        1 => {}
        _ => return Err(r.unexpected()),
    }
    let state = match r.int(1)? {
        225 => RecordState::InProgress,
        226 => RecordState::Completed,
        227 => RecordState::Released,
        _ => return Err(r.unexpected()),
    };
    let mut rec = Record::new(state, r.uint(2)?, Token(r.uint(3)?));
    let left = r.int(4)?;
    rec.lease_remaining = u64::try_from(left).ok().map(Duration::from_micros);
    let pttl = r.int(5)?;
    rec.expires_in = u64::try_from(pttl).ok().map(Duration::from_millis);
    let fp = r.bytes(7)?;
    rec.fingerprint = (r.int(6)? == 1).then_some(fp);
    let out = r.bytes(9)?;
    rec.output = (r.int(8)? == 1).then_some(out);
    Ok(Some(rec))
}
