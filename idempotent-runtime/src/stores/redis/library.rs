//! The function library (`library.lua`), loaded with `FUNCTION LOAD` and called with
//! `FCALL`: the names of its functions, and one call of one of them.

use super::{Conn, RedisStore, redis_error};
use crate::error::StoreError;
use redis::{Cmd, RedisError, Script, Value};
use std::sync::LazyLock;

/// The Lua library loaded with `FUNCTION LOAD`: the record layout (see [`RedisStore`]),
/// the server clock and one function per protocol step. `$V` stands for the version
/// of the library (a hash of this text), so that processes running different versions
/// of the store each call their own functions.
///
/// Every function reads the key with one `GET` and writes it with at most one `SET`;
/// `TIME` is read only when a decision needs the clock (not for a duplicate of a
/// completed key), and `PTTL` only where a record's expiry may only grow (a takeover,
/// a renewal) or is reported (inspect).
const LIBRARY: &str = include_str!("library.lua");

/// A protocol step: one function of the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Claim,
    Complete,
    Release,
    Renew,
    Inspect,
    ClaimMany,
    CompleteMany,
    ReleaseMany,
}

impl Op {
    /// The name given to `FCALL`.
    pub(super) fn function(self) -> &'static str {
        &LIB.functions[self as usize]
    }

    pub(super) fn what(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Renew => "renew",
            Op::Inspect => "inspect",
            Op::ClaimMany => "claim_many",
            Op::CompleteMany => "complete_many",
            Op::ReleaseMany => "release_many",
        }
    }
}

/// The library with its version filled in, and the names of its functions.
struct Library {
    code: String,
    functions: [String; 8],
}

static LIB: LazyLock<Library> = LazyLock::new(|| {
    // the first 16 hex digits of the SHA-1 of the template name this version
    let script = Script::new(LIBRARY);
    let version = &script.get_hash()[..16];
    let code = LIBRARY.replace("$V", version);
    let functions = [
        Op::Claim,
        Op::Complete,
        Op::Release,
        Op::Renew,
        Op::Inspect,
        Op::ClaimMany,
        Op::CompleteMany,
        Op::ReleaseMany,
    ]
    .map(|op| format!("idempotent_{version}_{}", op.what()));
    Library { code, functions }
});

/// Whether a server error says that a function of the library is not loaded.
pub(super) fn function_missing(code: &str, detail: Option<&str>) -> bool {
    code == "ERR" && detail.is_some_and(|d| d.starts_with("Function not found"))
}

impl RedisStore {
    /// The `FCALL` of `op` on `key`; the caller appends up to four arguments, `extra`
    /// bytes in all.
    pub(super) fn fcall(op: Op, key: &[u8], extra: usize) -> Cmd {
        let name = op.function();
        let mut cmd = Cmd::with_capacity(8, 5 + name.len() + 1 + key.len() + extra + 64);
        cmd.arg("FCALL").arg(name).arg(1).arg(key);
        cmd
    }

    async fn query(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// Runs one function call, loading the library when the server does not know the
    /// function (a new or restarted server, a flushed library, a new cluster node).
    async fn call(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        match self.query(cmd).await {
            Err(e) if function_missing(e.code().unwrap_or(""), e.detail()) => {
                self.load().await?;
                self.query(cmd).await
            }
            v => v,
        }
    }

    /// Loads the function library (`FUNCTION LOAD REPLACE`; on a cluster, on every
    /// master).
    pub(super) async fn load(&self) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(LIB.code.as_str());
        let _: Value = match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await?,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await?,
        };
        Ok(())
    }

    /// Runs one call of `op` and maps a failure to a [`StoreError`].
    pub(super) async fn run(&self, op: Op, cmd: &Cmd) -> Result<Value, StoreError> {
        self.call(cmd).await.map_err(|e| {
            let what = match op {
                Op::Claim => "claim failed",
                Op::Complete => "complete failed",
                Op::Release => "release failed",
                Op::Renew => "renew failed",
                Op::Inspect => "inspect failed",
                Op::ClaimMany => "claim batch failed",
                Op::CompleteMany => "complete batch failed",
                Op::ReleaseMany => "release batch failed",
            };
            if e.detail()
                .is_some_and(|d| d.contains("unknown command 'FCALL'"))
            {
                return redis_error(e, &format!("{what} (the store needs Redis 7.0 or later)"));
            }
            redis_error(e, what)
        })
    }
}
