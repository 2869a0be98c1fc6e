//! `idempotent`: the operator's command for the dedup records of `idempotent-runtime`
//! stores. Finds stuck, poisoned and expired records, shows what a store holds for a
//! message, and fixes one message (release its claim, reset its attempts, forget it).
//! `idempotent outbox …` does the same for the transactional outbox of an SQL store.
//!
//! Exit codes: 0 found / done, 1 not found (no record or outbox row, or none matched), 2 error
//! (bad arguments, bad URL, unreachable store, missing table), 3 the record's state does
//! not allow the change (nothing changed).

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

mod commands;
mod connect;
mod duration;
mod outbox;
mod output;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::process::ExitCode;
use std::time::Duration;

/// Inspect and repair the dedup records of idempotent consumers.
#[derive(Debug, Parser)]
#[command(name = "idempotent", version, about, long_about = None)]
pub(crate) struct Cli {
    /// The store: redis://host:6379, rediss://…, redis+cluster://host1:7000,host2:7001
    /// (or several redis:// URLs separated by commas),
    /// redis+sentinel://host1:26379,host2:26379/master-name, mysql://user@host/db,
    /// postgres://user@host/db, sqlite://path/to/dedup.db
    #[arg(
        long,
        env = "IDEMPOTENT_STORE_URL",
        global = true,
        hide_env_values = true
    )]
    pub(crate) store: Option<String>,

    /// The dedup table of an SQL store.
    #[arg(
        long,
        env = "IDEMPOTENT_TABLE",
        global = true,
        default_value = idempotent_shared::DEFAULT_TABLE
    )]
    pub(crate) table: String,

    /// The key prefix of a Redis store.
    #[arg(
        long,
        env = "IDEMPOTENT_PREFIX",
        global = true,
        default_value = "idem:"
    )]
    pub(crate) prefix: String,

    /// Output: aligned tables for people, or JSON (one object per line) for scripts.
    #[arg(long, value_enum, global = true, default_value_t = Format::Table)]
    pub(crate) format: Format,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns, durations in human units.
    Table,
    /// One JSON object per line (jq-friendly), durations in milliseconds.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the record key of a message as the attribute encodes it (no store needed).
    Key(KeyArgs),
    /// Show the record of one message.
    Inspect(KeyArgs),
    /// List records, with filters.
    List(ListArgs),
    /// List claims whose holder stopped renewing (in progress, lease run out).
    Stuck(StuckArgs),
    /// List records a claim with `max_attempts` refuses (dead-lettered messages).
    Poisoned(PoisonedArgs),
    /// Count records per scope and state.
    Stats(StatsArgs),
    /// Delete the record of one message: its next delivery runs the handler again.
    Forget(ChangeArgs),
    /// Free a stuck claim now: the next delivery runs, and a holder still running is fenced out.
    Release(ChangeArgs),
    /// Un-poison a message: its attempts restart at zero.
    ResetAttempts(ChangeArgs),
    /// Delete expired records (SQL stores; Redis expires records by itself).
    Purge(PurgeArgs),
    /// Create the dedup table (and the MySQL claim procedure) if missing.
    Migrate,
    /// Show the statements `migrate` runs.
    Schema(SchemaArgs),
    /// The transactional outbox of an SQL store: its rows per destination, its pending
    /// and dead messages; retry a dead message, purge sent ones.
    Outbox(OutboxArgs),
}

/// The outbox commands and their table.
#[derive(Debug, Args)]
pub(crate) struct OutboxArgs {
    /// The outbox table (as the application's `…Store::outbox(table)` names it).
    #[arg(
        long,
        env = "IDEMPOTENT_OUTBOX_TABLE",
        global = true,
        default_value = idempotent_shared::DEFAULT_OUTBOX_TABLE
    )]
    pub(crate) outbox_table: String,

    #[command(subcommand)]
    pub(crate) command: OutboxCommand,
}

/// An outbox command.
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// Per destination: pending rows, the age of the oldest, dead rows, sent rows not yet purged.
    Stats,
    /// List the pending, dead or sent rows, in emission order.
    List(OutboxListArgs),
    /// Put a dead row back to pending: the relay publishes it again, its attempts from zero.
    Retry(OutboxRetryArgs),
    /// Delete the sent rows sent more than `--older-than` ago.
    Purge(OutboxPurgeArgs),
    /// Create the outbox table and its indexes if missing.
    Migrate,
    /// Show the statements `outbox migrate` runs.
    Schema(SchemaArgs),
}

/// Options of `outbox list`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("status").required(true).args(["pending", "dead", "sent"])))]
pub(crate) struct OutboxListArgs {
    /// The rows waiting to be published (claimed by a relay or not).
    #[arg(long)]
    pub(crate) pending: bool,
    /// The rows that failed too often: waiting for `outbox retry`.
    #[arg(long)]
    pub(crate) dead: bool,
    /// The rows published and not yet purged.
    #[arg(long)]
    pub(crate) sent: bool,
    /// Print at most this many rows.
    #[arg(long)]
    pub(crate) limit: Option<u64>,
}

/// Options of `outbox retry`.
#[derive(Debug, Args)]
pub(crate) struct OutboxRetryArgs {
    /// The message id of the dead row, as `outbox list --dead` prints it.
    pub(crate) id: String,
    #[command(flatten)]
    pub(crate) confirm: Confirm,
}

/// Options of `outbox purge`.
#[derive(Debug, Args)]
pub(crate) struct OutboxPurgeArgs {
    /// Delete sent rows (required: the only kind of outbox purge).
    #[arg(long, required = true)]
    pub(crate) sent: bool,
    /// Only the rows sent more than this long ago (`90s`, `5m`, `1h30m`, `7d`).
    #[arg(long, value_parser = duration::parse)]
    pub(crate) older_than: Duration,
    #[command(flatten)]
    pub(crate) confirm: Confirm,
}

/// A message's record key: its scope and key parts, or the encoded key in hex.
#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The handler's scope (`scope = "…"`, or by default the module path and the fn name, such as `my_app::orders::on_paid`).
    pub(crate) scope: String,
    /// The key: one part, or one argument per element of a tuple key.
    #[arg(required_unless_present = "hex", conflicts_with = "hex")]
    pub(crate) parts: Vec<String>,
    /// The encoded key in hex, as `list --format json` prints it in `key_hex` (for
    /// hashed keys, whose parts are not known).
    #[arg(long)]
    pub(crate) hex: Option<String>,
}

/// Filters of `list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only this scope.
    #[arg(long)]
    pub(crate) scope: Option<String>,
    /// Only this state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<StateArg>,
    /// Only records with at least this many attempts.
    #[arg(long)]
    pub(crate) min_attempts: Option<u32>,
    /// Only in-progress records whose lease ran out.
    #[arg(long)]
    pub(crate) lease_expired: bool,
    /// Only records whose latest claim is older than this (`90s`, `5m`, `1h30m`, `2d`).
    #[arg(long, value_parser = duration::parse)]
    pub(crate) older_than: Option<Duration>,
    /// Print at most this many records.
    #[arg(long)]
    pub(crate) limit: Option<u64>,
}

/// Options of `stuck`.
#[derive(Debug, Args)]
pub(crate) struct StuckArgs {
    /// Only this scope.
    #[arg(long)]
    pub(crate) scope: Option<String>,
    /// Only claims older than this.
    #[arg(long, value_parser = duration::parse)]
    pub(crate) older_than: Option<Duration>,
    /// Print at most this many records.
    #[arg(long)]
    pub(crate) limit: Option<u64>,
}

/// Options of `poisoned`.
#[derive(Debug, Args)]
pub(crate) struct PoisonedArgs {
    /// Only this scope.
    #[arg(long)]
    pub(crate) scope: Option<String>,
    /// The handler's `max_attempts` (records do not store it).
    #[arg(long, env = "IDEMPOTENT_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_attempts: u32,
    /// Print at most this many records.
    #[arg(long)]
    pub(crate) limit: Option<u64>,
}

/// Options of `stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// Only this scope.
    #[arg(long)]
    pub(crate) scope: Option<String>,
    /// The handlers' `max_attempts`, to count poisoned records.
    #[arg(long, env = "IDEMPOTENT_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_attempts: u32,
}

/// A change to one record.
#[derive(Debug, Args)]
pub(crate) struct ChangeArgs {
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    #[command(flatten)]
    pub(crate) confirm: Confirm,
}

/// Confirmation of a destructive command.
#[derive(Debug, Args)]
pub(crate) struct Confirm {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
    /// Show what would change, change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

/// Options of `purge`.
#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    /// Delete the records whose expiry has passed (required: the only kind of purge).
    #[arg(long, required = true)]
    pub(crate) expired: bool,
    #[command(flatten)]
    pub(crate) confirm: Confirm,
}

/// Options of `schema`.
#[derive(Debug, Args)]
pub(crate) struct SchemaArgs {
    /// Print the statements (the only action; kept for sqlx-cli / diesel_cli habits).
    #[arg(long, required = true)]
    pub(crate) print: bool,
}

/// A record state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StateArg {
    /// Claimed (lease live or run out).
    InProgress,
    /// The last attempt failed; claimable again.
    Released,
    /// Done; duplicates replay its output.
    Completed,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Found, or done.
    Found,
    /// No record, or nothing matched.
    NotFound,
    /// The record's state did not allow the change.
    Unchanged,
}

/// An error for the operator: what went wrong and what to do about it.
#[derive(Debug)]
pub(crate) struct CliError(pub(crate) String);

impl<T: std::fmt::Display> From<T> for CliError {
    fn from(e: T) -> Self {
        CliError(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(commands::run(&cli)) {
        Ok(Outcome::Found) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => ExitCode::from(1),
        Ok(Outcome::Unchanged) => ExitCode::from(3),
        Err(CliError(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
