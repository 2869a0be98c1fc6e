// Doc comments, other attributes and visibility stay on the rewritten fn.
#![deny(missing_docs)]
//! Attributes and docs survive the rewrite.

use idempotent_runtime::{Error, idempotent};

/// A message.
pub struct Msg {
    /// Its id.
    pub id: String,
}

/// Handles a message once.
#[idempotent(key = "msg.id")]
#[must_use = "the outcome says whether to ack"]
#[inline]
#[cfg_attr(any(), cfg(any()))]
pub async fn handle(msg: &Msg) -> Result<u32, Error> {
    Ok(msg.id.len() as u32)
}

/// Only compiled where `cfg(any())` holds, which is nowhere: the attribute must not
/// make it visible.
#[cfg(any())]
#[idempotent(key = "msg.id")]
pub async fn never(msg: &Msg) -> Result<u32, Error> {
    missing_function(msg)
}

#[deny(unused_must_use)]
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let msg = Msg { id: "abc".into() };
    assert_eq!(handle(&msg).await.unwrap(), 3);
}
