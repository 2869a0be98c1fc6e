//! The examples' error path, shared with `mod support;`: a server that does not answer
//! within a few seconds is reported in one sentence, on standard error, naming the
//! address tried and what to start there; any other error is printed by its `Display`
//! (never its `Debug`), and the program exits with status 1.

// each example uses the servers it needs, not all of them
#![allow(dead_code)]

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

/// How long an example waits for a server's first answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A server an example needs: what it is, where it was looked for, what to start.
pub struct Server<'a> {
    /// What it is, for the sentence: `"Redis"`.
    pub name: &'static str,
    /// The address tried (a URL's password is not printed).
    pub addr: &'a str,
    /// What to do about it: what to start there, or which setting to change.
    pub start: &'static str,
}

impl<'a> Server<'a> {
    pub fn redis(addr: &'a str) -> Self {
        Server {
            name: "Redis",
            addr,
            start: "start one there (`redis-server`) or set IDEMPOTENT_REDIS_URL",
        }
    }

    pub fn mysql(addr: &'a str) -> Self {
        Server {
            name: "MySQL/MariaDB",
            addr,
            start: "start one there with the database `test` (`mariadbd`) or set IDEMPOTENT_MYSQL_URL",
        }
    }

    pub fn postgres(addr: &'a str) -> Self {
        Server {
            name: "PostgreSQL",
            addr,
            start: "start one there with the database `test` or set IDEMPOTENT_POSTGRES_URL",
        }
    }

    /// Awaits `connect` for at most [`CONNECT_TIMEOUT`]; its error, or its silence,
    /// becomes the sentence.
    pub async fn reach<T, E: Display>(
        &self,
        connect: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        let cause = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => e.to_string().replace('\n', " "),
            Err(_) => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        };
        Err(format!(
            "cannot reach {} at {} ({cause}): {}",
            self.name,
            without_password(self.addr),
            self.start
        ))
    }
}

/// `scheme://user:password@host…` without the password.
fn without_password(addr: &str) -> String {
    if let Some((scheme, rest)) = addr.split_once("://")
        && let Some((user_info, host)) = rest.split_once('@')
        && let Some((user, _)) = user_info.split_once(':')
        && !user_info.contains('/')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    addr.to_owned()
}

/// Prints `e` as the program's one line of error and exits with status 1.
pub fn fail(e: impl Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}

/// The end of an example's `main`: the exit code it chose, or its error through [`fail`].
pub fn exit<E: Display>(result: Result<ExitCode, E>) -> ExitCode {
    result.unwrap_or_else(|e| fail(e))
}
