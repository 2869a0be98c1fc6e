//! The commands.

use crate::connect::{self, Backend};
use crate::output::{self, ItemPrinter, hex, state_name, unhex};
use crate::{ChangeArgs, Cli, CliError, Command, Confirm, Format, KeyArgs, Outcome, StateArg};
use idempotent_runtime::store::{AdminOutcome, DEFAULT_PAGE, RecordState, ScanCursor, ScanFilter};
use idempotent_runtime::{KeyBuilder, RecordKey, StoreError};
use std::io::{self, BufRead, IsTerminal, Write};

/// Runs the command of `cli`.
pub(crate) async fn run(cli: &Cli) -> Result<Outcome, CliError> {
    let json = cli.format == Format::Json;
    match &cli.command {
        Command::Key(k) => key(cli, k, json).await,
        Command::Schema(_) => {
            let b = open(cli).await?;
            let Some(stmts) = b.schema() else {
                return Err(CliError(
                    "this store has no schema: Redis keeps each record under its own key".into(),
                ));
            };
            let mut out = io::stdout().lock();
            for s in stmts {
                writeln!(out, "{};\n", s.trim_end().trim_end_matches(';'))?;
            }
            Ok(Outcome::Found)
        }
        Command::Migrate => {
            let b = open(cli).await?;
            if !b
                .migrate()
                .await
                .map_err(|e| connect::explain(e, &cli.table, true))?
            {
                return Err(CliError(
                    "this store has no schema to migrate: Redis keeps each record under its own key"
                        .into(),
                ));
            }
            println!("the table `{}` is ready", cli.table);
            Ok(Outcome::Found)
        }
        Command::Inspect(k) => {
            let b = open(cli).await?;
            let key = record_key(k)?;
            match b
                .admin()
                .map_err(|e| fail(cli, &b, e))?
                .inspect(&key)
                .await
                .map_err(|e| fail(cli, &b, e))?
            {
                Some(r) => {
                    output::record(&mut io::stdout().lock(), &key, &r, json)?;
                    Ok(Outcome::Found)
                }
                None => {
                    eprintln!(
                        "no record for {}: the next delivery of this message runs the handler",
                        shown(&key)
                    );
                    Ok(Outcome::NotFound)
                }
            }
        }
        Command::List(a) => {
            let mut f = ScanFilter::new();
            f.scope = a.scope.clone();
            f.state = a.state.map(state);
            f.min_attempts = a.min_attempts;
            f.lease_expired = a.lease_expired;
            f.older_than = a.older_than;
            list(cli, &f, a.limit, None).await
        }
        Command::Stuck(a) => {
            let mut f = ScanFilter::new().lease_expired();
            f.scope = a.scope.clone();
            f.older_than = a.older_than;
            list(cli, &f, a.limit, None).await
        }
        Command::Poisoned(a) => {
            let mut f = ScanFilter::new().min_attempts(a.max_attempts);
            f.scope = a.scope.clone();
            list(cli, &f, a.limit, Some(a.max_attempts)).await
        }
        Command::Stats(a) => {
            let b = open(cli).await?;
            let (rows, skipped) = b
                .stats(a.scope.as_deref(), Some(a.max_attempts))
                .await
                .map_err(|e| fail(cli, &b, e))?;
            let mut out = io::stdout().lock();
            if rows.is_empty() {
                if !json {
                    eprintln!("no records");
                }
            } else {
                output::stats(&mut out, &rows, json)?;
            }
            output::skipped(&mut out, skipped, &cli.prefix, json)?;
            Ok(if rows.is_empty() {
                Outcome::NotFound
            } else {
                Outcome::Found
            })
        }
        Command::Outbox(o) => crate::outbox::run(cli, o).await,
        Command::Forget(c) => change(cli, c, Change::Forget).await,
        Command::Release(c) => change(cli, c, Change::Release).await,
        Command::ResetAttempts(c) => change(cli, c, Change::Reset).await,
        Command::Purge(p) => {
            let b = open(cli).await?;
            if !b.is_sql() {
                println!("nothing to purge: Redis deletes each record when its expiry passes");
                return Ok(Outcome::Found);
            }
            if p.confirm.dry_run {
                println!(
                    "would delete the expired records of the table `{}` (dry run: nothing deleted)",
                    cli.table
                );
                return Ok(Outcome::Found);
            }
            confirm(
                &p.confirm,
                &format!("delete the expired records of the table `{}`?", cli.table),
            )?;
            let n = b
                .admin()
                .map_err(|e| fail(cli, &b, e))?
                .purge_expired()
                .await
                .map_err(|e| fail(cli, &b, e))?;
            if json {
                println!("{{\"purged\":{n}}}");
            } else {
                println!("purged {n} expired records");
            }
            Ok(Outcome::Found)
        }
    }
}

pub(crate) async fn open(cli: &Cli) -> Result<Backend, CliError> {
    let Some(url) = cli.store.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Err(CliError(
            "no store given: pass --store URL or set IDEMPOTENT_STORE_URL (redis://…, \
             redis+cluster://…, redis+sentinel://…, mysql://…, postgres://…, sqlite://…)"
                .into(),
        ));
    };
    connect::open(url.trim(), &cli.table, &cli.prefix).await
}

fn fail(cli: &Cli, b: &Backend, e: StoreError) -> CliError {
    connect::explain(e, &cli.table, b.is_sql())
}

fn state(s: StateArg) -> RecordState {
    match s {
        StateArg::InProgress => RecordState::InProgress,
        StateArg::Released => RecordState::Released,
        StateArg::Completed => RecordState::Completed,
    }
}

/// The record key of the arguments, encoded by the runtime exactly as the attribute
/// encodes a key of those parts.
fn record_key(k: &KeyArgs) -> Result<RecordKey, CliError> {
    if k.scope.is_empty() {
        return Err(CliError(
            "the scope is empty: give the handler's scope".into(),
        ));
    }
    if let Some(h) = &k.hex {
        let bytes = unhex(h).map_err(CliError)?;
        if bytes.is_empty() {
            return Err(CliError("--hex is empty: give the encoded key".into()));
        }
        return Ok(RecordKey::from_encoded(&k.scope, &bytes));
    }
    let mut b = KeyBuilder::new();
    for p in &k.parts {
        b.push(p.as_bytes());
    }
    b.finish(&k.scope).map_err(|_| {
        CliError("a key part is empty: every part of a key must have at least one byte".into())
    })
}

fn shown(key: &RecordKey) -> String {
    format!("{} / {}", key.scope(), key.readable_key())
}

async fn key(cli: &Cli, k: &KeyArgs, json: bool) -> Result<Outcome, CliError> {
    let key = record_key(k)?;
    let redis_key = match cli.store.as_deref().filter(|u| u.starts_with("redis")) {
        Some(_) => open(cli).await?.redis_key(&key),
        None => None,
    };
    let mut out = io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "scope": key.scope(),
            "key": key.readable_key(),
            "key_escaped": key.key().escape_ascii().to_string(),
            "key_hex": hex(key.key()),
            "hashed": key.is_hashed(),
            "redis_key": redis_key.as_ref().map(|k| k.escape_ascii().to_string()),
        });
        writeln!(out, "{v}")?;
    } else {
        let mut pairs = vec![
            ("scope", key.scope().to_owned()),
            ("key", key.key().escape_ascii().to_string()),
            ("key hex", hex(key.key())),
            (
                "hashed",
                if key.is_hashed() {
                    "yes (the encoding was over 128 bytes: SHA-256)".to_owned()
                } else {
                    "no".to_owned()
                },
            ),
        ];
        if let Some(r) = &redis_key {
            pairs.push(("redis key", r.escape_ascii().to_string()));
        }
        output::fields(&mut out, &pairs)?;
    }
    Ok(Outcome::Found)
}

/// Streams the records that pass `filter`, page by page.
async fn list(
    cli: &Cli,
    filter: &ScanFilter,
    limit: Option<u64>,
    poisoned_at: Option<u32>,
) -> Result<Outcome, CliError> {
    let b = open(cli).await?;
    let json = cli.format == Format::Json;
    let stdout = io::stdout().lock();
    let mut printer = ItemPrinter::new(io::BufWriter::with_capacity(1 << 16, stdout), json);
    let mut cursor: Option<ScanCursor> = None;
    let mut skipped = 0u64;
    let limit = limit.unwrap_or(u64::MAX);
    loop {
        let remaining = limit - printer.printed();
        let page_size = usize::try_from(remaining.min(DEFAULT_PAGE as u64)).unwrap_or(DEFAULT_PAGE);
        let page = b
            .admin()
            .map_err(|e| fail(cli, &b, e))?
            .scan(filter, cursor.as_ref(), page_size)
            .await
            .map_err(|e| fail(cli, &b, e))?;
        skipped = skipped.saturating_add(page.skipped);
        let mut items = page.items;
        if let Some(n) = poisoned_at {
            items.retain(|i| i.is_poisoned(n));
        }
        items.truncate(usize::try_from(remaining).unwrap_or(usize::MAX));
        if let Err(e) = printer.page(&items) {
            // a closed pipe (`| head`) ends the listing quietly
            if e.kind() == io::ErrorKind::BrokenPipe {
                return Ok(Outcome::Found);
            }
            return Err(e.into());
        }
        match page.next {
            Some(c) if printer.printed() < limit => cursor = Some(c),
            _ => break,
        }
    }
    let printed = printer.printed();
    if printed == 0 && !json {
        eprintln!("no matching records");
    }
    if let Err(e) = printer.finish(skipped, &cli.prefix)
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    if printed == 0 {
        return Ok(Outcome::NotFound);
    }
    Ok(Outcome::Found)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Forget,
    Release,
    Reset,
}

/// Asks for confirmation on the terminal unless `--yes`.
pub(crate) fn confirm(c: &Confirm, question: &str) -> Result<(), CliError> {
    if c.yes {
        return Ok(());
    }
    if !io::stdin().is_terminal() {
        return Err(CliError(format!(
            "refusing to {} without confirmation: stdin is not a terminal; pass --yes (or \
             --dry-run to see what would change)",
            question.trim_end_matches('?')
        )));
    }
    eprint!("{question} [y/N] ");
    io::stderr().flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CliError("cancelled: nothing changed".into()))
    }
}

async fn change(cli: &Cli, c: &ChangeArgs, what: Change) -> Result<Outcome, CliError> {
    let key = record_key(&c.key)?;
    let b = open(cli).await?;
    let store = b.admin().map_err(|e| fail(cli, &b, e))?;
    let Some(before) = store.inspect(&key).await.map_err(|e| fail(cli, &b, e))? else {
        eprintln!("no record for {}", shown(&key));
        return Ok(Outcome::NotFound);
    };
    let stuck_or_released = before.state == RecordState::Released
        || (before.state == RecordState::InProgress && before.lease_remaining.is_none());
    let allowed = match what {
        Change::Forget => true,
        Change::Release => before.state == RecordState::InProgress,
        Change::Reset => stuck_or_released,
    };
    let verb = match what {
        Change::Forget => "forget",
        Change::Release => "release the claim of",
        Change::Reset => "reset the attempts of",
    };
    if !allowed {
        let why = match what {
            Change::Release => "only an in-progress claim can be released",
            _ => {
                "only a released record, or a claim past its lease, can be reset (wait for the lease, or `release` it first)"
            }
        };
        eprintln!(
            "nothing changed: {} is {} ({why})",
            shown(&key),
            state_name(before.state)
        );
        return Ok(Outcome::Unchanged);
    }
    if c.confirm.dry_run {
        let mut out = io::stdout().lock();
        writeln!(
            out,
            "would {verb} {} (dry run: nothing changed)",
            shown(&key)
        )?;
        output::record(&mut out, &key, &before, cli.format == Format::Json)?;
        return Ok(Outcome::Found);
    }
    confirm(
        &c.confirm,
        &format!(
            "{verb} {} ({}, {} attempt{})?",
            shown(&key),
            state_name(before.state),
            before.attempts,
            if before.attempts == 1 { "" } else { "s" }
        ),
    )?;
    let result = match what {
        Change::Forget => {
            if store.forget(&key).await.map_err(|e| fail(cli, &b, e))? {
                AdminOutcome::Applied
            } else {
                AdminOutcome::NotFound
            }
        }
        Change::Release => store
            .force_release(&key)
            .await
            .map_err(|e| fail(cli, &b, e))?,
        Change::Reset => store
            .reset_attempts(&key)
            .await
            .map_err(|e| fail(cli, &b, e))?,
    };
    let done = match what {
        Change::Forget => "forgot it: the next delivery runs the handler again",
        Change::Release => {
            "released the claim: the next delivery runs the handler; a holder still running is fenced out"
        }
        Change::Reset => "reset its attempts to 0: the next delivery runs as attempt 1",
    };
    match result {
        AdminOutcome::Applied => {
            if cli.format == Format::Json {
                let v = serde_json::json!({
                    "scope": key.scope(),
                    "key": key.readable_key(),
                    "key_hex": hex(key.key()),
                    "done": match what { Change::Forget => "forgotten", Change::Release => "released", Change::Reset => "attempts_reset" },
                });
                println!("{v}");
            } else {
                println!("{}: {done}", shown(&key));
            }
            Ok(Outcome::Found)
        }
        AdminOutcome::NotFound => {
            eprintln!("no record for {} (it went away meanwhile)", shown(&key));
            Ok(Outcome::NotFound)
        }
        AdminOutcome::Unchanged { state } => {
            eprintln!(
                "nothing changed: {} became {} meanwhile",
                shown(&key),
                state_name(state)
            );
            Ok(Outcome::Unchanged)
        }
        _ => Err(CliError(
            "the store answered with an unknown outcome".into(),
        )),
    }
}
