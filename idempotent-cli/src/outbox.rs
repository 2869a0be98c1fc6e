//! `idempotent outbox …`: the transactional outbox table of an SQL store, through the
//! runtime's `OutboxStore` and its SQL handles (which never create the table, except
//! for `outbox migrate`).

use crate::commands::{confirm, open};
use crate::connect::{self, Backend};
use crate::duration::{compact, human};
use crate::output::{self, hex};
use crate::{Cli, CliError, Format, OutboxArgs, OutboxCommand, OutboxListArgs, Outcome};
use idempotent_runtime::outbox::{OutboxRow, OutboxStats, OutboxStore, RowStatus, Uuid};
use idempotent_runtime::{RecordKey, StoreError};
use serde::Serialize;
use std::io::{self, Write};
use std::time::Duration;

/// Rows one page of `outbox list` reads.
const PAGE: usize = 1000;
/// Rows one statement of `outbox purge` deletes.
const PURGE_BATCH: usize = 1000;
/// The longest last error the table form prints, in characters.
const ERROR_CHARS: usize = 80;

/// The outbox table of an SQL store.
enum OutboxBackend {
    #[cfg(feature = "mysql")]
    MySql(idempotent_runtime::MySqlOutbox),
    #[cfg(feature = "postgres")]
    Postgres(idempotent_runtime::PostgresOutbox),
    #[cfg(feature = "sqlite")]
    Sqlite(idempotent_runtime::SqliteOutbox),
}

impl OutboxBackend {
    /// The outbox table `table` on the pool of `b`; a Redis store has none.
    fn of(b: &Backend, table: &str) -> Result<Self, CliError> {
        let bad_name = |e: StoreError| CliError(format!("--outbox-table: {e}"));
        match b {
            #[cfg(feature = "mysql")]
            Backend::MySql(s) => Ok(OutboxBackend::MySql(
                idempotent_runtime::MySqlOutbox::new(s.pool().clone(), table).map_err(bad_name)?,
            )),
            #[cfg(feature = "postgres")]
            Backend::Postgres(s) => Ok(OutboxBackend::Postgres(
                idempotent_runtime::PostgresOutbox::new(s.pool().clone(), table)
                    .map_err(bad_name)?,
            )),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(s) => Ok(OutboxBackend::Sqlite(
                idempotent_runtime::SqliteOutbox::new(s.pool().clone(), table).map_err(bad_name)?,
            )),
            #[allow(unreachable_patterns)]
            _ => {
                let _ = (table, bad_name);
                Err(not_sql())
            }
        }
    }

    /// The store type whose `outbox` method opens (and creates) the table.
    fn store_type(&self) -> &'static str {
        match self {
            #[cfg(feature = "mysql")]
            OutboxBackend::MySql(_) => "MySqlStore",
            #[cfg(feature = "postgres")]
            OutboxBackend::Postgres(_) => "PostgresStore",
            #[cfg(feature = "sqlite")]
            OutboxBackend::Sqlite(_) => "SqliteStore",
            #[allow(unreachable_patterns)]
            _ => unreachable!("an outbox exists only with its feature"),
        }
    }

    fn store(&self) -> &dyn OutboxStore {
        match self {
            #[cfg(feature = "mysql")]
            OutboxBackend::MySql(o) => o,
            #[cfg(feature = "postgres")]
            OutboxBackend::Postgres(o) => o,
            #[cfg(feature = "sqlite")]
            OutboxBackend::Sqlite(o) => o,
            #[allow(unreachable_patterns)]
            _ => unreachable!("an outbox exists only with its feature"),
        }
    }

    async fn row(&self, id: Uuid) -> Result<Option<OutboxRow>, StoreError> {
        match self {
            #[cfg(feature = "mysql")]
            OutboxBackend::MySql(o) => o.row(id).await,
            #[cfg(feature = "postgres")]
            OutboxBackend::Postgres(o) => o.row(id).await,
            #[cfg(feature = "sqlite")]
            OutboxBackend::Sqlite(o) => o.row(id).await,
            #[allow(unreachable_patterns)]
            _ => {
                let _ = id;
                unreachable!("an outbox exists only with its feature")
            }
        }
    }

    async fn count_sent(&self, older_than: Duration) -> Result<u64, StoreError> {
        match self {
            #[cfg(feature = "mysql")]
            OutboxBackend::MySql(o) => o.count_sent(older_than).await,
            #[cfg(feature = "postgres")]
            OutboxBackend::Postgres(o) => o.count_sent(older_than).await,
            #[cfg(feature = "sqlite")]
            OutboxBackend::Sqlite(o) => o.count_sent(older_than).await,
            #[allow(unreachable_patterns)]
            _ => {
                let _ = older_than;
                unreachable!("an outbox exists only with its feature")
            }
        }
    }

    fn schema(&self) -> Vec<String> {
        match self {
            #[cfg(feature = "mysql")]
            OutboxBackend::MySql(o) => o.schema(),
            #[cfg(feature = "postgres")]
            OutboxBackend::Postgres(o) => o.schema(),
            #[cfg(feature = "sqlite")]
            OutboxBackend::Sqlite(o) => o.schema(),
            #[allow(unreachable_patterns)]
            _ => unreachable!("an outbox exists only with its feature"),
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "mysql")]
            OutboxBackend::MySql(o) => o.migrate().await,
            #[cfg(feature = "postgres")]
            OutboxBackend::Postgres(o) => o.migrate().await,
            #[cfg(feature = "sqlite")]
            OutboxBackend::Sqlite(o) => o.migrate().await,
            #[allow(unreachable_patterns)]
            _ => unreachable!("an outbox exists only with its feature"),
        }
    }
}

fn not_sql() -> CliError {
    CliError(
        "the outbox lives in an SQL store: give a mysql://, postgres:// or sqlite:// URL (the \
         database your transactional handlers write their outbox rows to); Redis and the \
         memory store have no outbox"
            .into(),
    )
}

/// A store error of an outbox command, with what to do about it.
fn explain(e: StoreError, table: &str, store_type: &str) -> CliError {
    if connect::missing_table(&e) {
        return CliError(format!(
            "the outbox table `{table}` does not exist: the application creates it when it \
             opens its outbox (`{store_type}::outbox(\"{table}\")`), or create \
             it with `idempotent outbox migrate` (`idempotent outbox schema --print` for your \
             DBA); or pass --outbox-table / IDEMPOTENT_OUTBOX_TABLE with the table your \
             handlers write to ({e})"
        ));
    }
    connect::explain(e, table, false)
}

/// Runs an outbox command.
pub(crate) async fn run(cli: &Cli, a: &OutboxArgs) -> Result<Outcome, CliError> {
    // refused before connecting: Redis has no outbox, whatever answers at the URL
    if let Some(url) = cli.store.as_deref() {
        let scheme = url
            .trim()
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        if scheme.is_some_and(|s| s.starts_with("redis") || s == "unix" || s == "memory") {
            return Err(not_sql());
        }
    }
    let b = open(cli).await?;
    let o = OutboxBackend::of(&b, &a.outbox_table)?;
    let table = a.outbox_table.as_str();
    let json = cli.format == Format::Json;
    let fail = |e| explain(e, table, o.store_type());
    match &a.command {
        OutboxCommand::Schema(_) => {
            let mut out = io::stdout().lock();
            for s in o.schema() {
                writeln!(out, "{};\n", s.trim_end().trim_end_matches(';'))?;
            }
            Ok(Outcome::Found)
        }
        OutboxCommand::Migrate => {
            o.migrate().await.map_err(fail)?;
            println!("the outbox table `{table}` is ready");
            Ok(Outcome::Found)
        }
        OutboxCommand::Stats => {
            let stats = o.store().stats().await.map_err(fail)?;
            if stats.destinations.is_empty() {
                if !json {
                    eprintln!("no rows in the outbox table `{table}`");
                }
                return Ok(Outcome::NotFound);
            }
            print_stats(&mut io::stdout().lock(), &stats, json)?;
            Ok(Outcome::Found)
        }
        OutboxCommand::List(l) => list(&o, l, table, json).await,
        OutboxCommand::Retry(r) => {
            let id = parse_id(&r.id)?;
            let Some(row) = o.row(id).await.map_err(fail)? else {
                eprintln!("no row {id} in the outbox table `{table}`");
                return Ok(Outcome::NotFound);
            };
            if row.status != RowStatus::Dead {
                let why = match row.status {
                    RowStatus::Pending => "it is waiting for the relay already",
                    _ => "it was published",
                };
                eprintln!(
                    "nothing changed: {id} is {} ({why}; only a dead row can be retried)",
                    row.status
                );
                return Ok(Outcome::Unchanged);
            }
            if r.confirm.dry_run {
                let mut out = io::stdout().lock();
                writeln!(
                    out,
                    "would put the dead row {id} back to pending (dry run: nothing changed)"
                )?;
                print_row(&mut out, &row, json)?;
                return Ok(Outcome::Found);
            }
            confirm(
                &r.confirm,
                &format!(
                    "put the dead row {id} ({}, {} attempt{}) back to pending?",
                    row.message.destination(),
                    row.attempts,
                    if row.attempts == 1 { "" } else { "s" }
                ),
            )?;
            if o.store().retry_dead(id).await.map_err(fail)? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"id": id.to_string(), "done": "retried"})
                    );
                } else {
                    println!(
                        "{id}: back to pending, due now, attempts from 0: a relay publishes it \
                         at its next pass"
                    );
                }
                return Ok(Outcome::Found);
            }
            match o.row(id).await.map_err(fail)? {
                Some(now) => {
                    eprintln!("nothing changed: {id} became {} meanwhile", now.status);
                    Ok(Outcome::Unchanged)
                }
                None => {
                    eprintln!("no row {id} in the outbox table `{table}` (it went away meanwhile)");
                    Ok(Outcome::NotFound)
                }
            }
        }
        OutboxCommand::Purge(p) => {
            let age = compact(p.older_than);
            if p.confirm.dry_run {
                let n = o.count_sent(p.older_than).await.map_err(fail)?;
                if json {
                    println!("{}", serde_json::json!({ "would_purge": n }));
                } else {
                    println!(
                        "would delete {n} sent row{} sent more than {age} ago from the outbox \
                         table `{table}` (dry run: nothing deleted)",
                        if n == 1 { "" } else { "s" }
                    );
                }
                return Ok(Outcome::Found);
            }
            confirm(
                &p.confirm,
                &format!("delete the rows of the outbox table `{table}` sent more than {age} ago?"),
            )?;
            let n = o
                .store()
                .purge_sent(p.older_than, PURGE_BATCH)
                .await
                .map_err(fail)?;
            if json {
                println!("{}", serde_json::json!({ "purged": n }));
            } else {
                println!(
                    "purged {n} sent row{} sent more than {age} ago",
                    if n == 1 { "" } else { "s" }
                );
            }
            Ok(Outcome::Found)
        }
    }
}

/// A message id from the command line.
fn parse_id(s: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        CliError(format!(
            "`{s}` is not a message id: give the id as `idempotent outbox list --dead` prints \
             it (a UUID such as 6f1c2a4e-0d3b-5c7e-9a41-2b8f0e6d1c55)"
        ))
    })
}

/// Streams the rows of one status, page by page.
async fn list(
    o: &OutboxBackend,
    l: &OutboxListArgs,
    table: &str,
    json: bool,
) -> Result<Outcome, CliError> {
    let status = if l.pending {
        RowStatus::Pending
    } else if l.dead {
        RowStatus::Dead
    } else {
        RowStatus::Sent
    };
    let limit = l.limit.unwrap_or(u64::MAX);
    let stdout = io::stdout().lock();
    let mut printer = RowPrinter::new(io::BufWriter::with_capacity(1 << 16, stdout), json);
    let mut after = None;
    while printer.printed < limit {
        let want = usize::try_from((limit - printer.printed).min(PAGE as u64)).unwrap_or(PAGE);
        let page = o
            .store()
            .list(status, after, want)
            .await
            .map_err(|e| explain(e, table, o.store_type()))?;
        if let Err(e) = printer.page(&page.rows) {
            // a closed pipe (`| head`) ends the listing quietly
            if e.kind() == io::ErrorKind::BrokenPipe {
                return Ok(Outcome::Found);
            }
            return Err(e.into());
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let printed = printer.printed;
    if let Err(e) = printer.out.flush()
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    if printed == 0 {
        if !json {
            eprintln!("no {status} rows in the outbox table `{table}`");
        }
        return Ok(Outcome::NotFound);
    }
    Ok(Outcome::Found)
}

/// A row as JSON.
#[derive(Serialize)]
struct RowJson<'a> {
    id: String,
    seq: i64,
    destination: &'a str,
    status: &'static str,
    attempts: u32,
    age_ms: u64,
    due_in_ms: Option<u64>,
    leased_by: Option<&'a str>,
    last_error: Option<&'a str>,
    origin_scope: &'a str,
    origin_key: String,
    origin_key_hex: String,
    ordering_key: Option<&'a str>,
    payload_bytes: usize,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn origin(r: &OutboxRow) -> RecordKey {
    RecordKey::from_encoded(&r.origin_scope, &r.origin_key)
}

fn row_json(r: &OutboxRow) -> RowJson<'_> {
    RowJson {
        id: r.message.id().to_string(),
        seq: r.seq,
        destination: r.message.destination(),
        status: r.status.as_str(),
        attempts: r.attempts,
        age_ms: ms(r.age),
        due_in_ms: (r.status == RowStatus::Pending).then(|| ms(r.due_in)),
        leased_by: r.leased_by.as_deref(),
        last_error: r.last_error.as_deref(),
        origin_scope: &r.origin_scope,
        origin_key: origin(r).readable_key(),
        origin_key_hex: hex(&r.origin_key),
        ordering_key: r.message.ordering_key(),
        payload_bytes: r.message.payload().len(),
    }
}

/// The status column: a pending row's relay, when one holds it.
fn status_text(r: &OutboxRow) -> String {
    match &r.leased_by {
        Some(relay) => format!("{} (claimed by {relay})", r.status),
        None => r.status.to_string(),
    }
}

fn due_text(r: &OutboxRow) -> String {
    match r.status {
        RowStatus::Pending if r.due_in.is_zero() => "now".to_owned(),
        RowStatus::Pending => human(r.due_in),
        _ => "-".to_owned(),
    }
}

/// A last error on one line, cut to [`ERROR_CHARS`] characters.
fn error_text(e: Option<&str>) -> String {
    let Some(e) = e else {
        return "-".to_owned();
    };
    let one_line: String = e
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_debug().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if one_line.chars().count() <= ERROR_CHARS {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(ERROR_CHARS - 1).collect();
    cut.push('…');
    cut
}

const ROW_HEADERS: [&str; 9] = [
    "ID",
    "DESTINATION",
    "STATUS",
    "ATTEMPTS",
    "AGE",
    "DUE IN",
    "ORIGIN SCOPE",
    "ORIGIN KEY",
    "LAST ERROR",
];

fn row_cells(r: &OutboxRow) -> Vec<String> {
    vec![
        r.message.id().to_string(),
        r.message.destination().to_owned(),
        status_text(r),
        r.attempts.to_string(),
        human(r.age),
        due_text(r),
        r.origin_scope.clone(),
        origin(r).readable_key(),
        error_text(r.last_error.as_deref()),
    ]
}

/// Prints rows page by page: a header once, columns aligned to the widest value seen
/// so far (so a listing of any length holds one page at a time).
struct RowPrinter<W: Write> {
    out: W,
    json: bool,
    widths: Vec<usize>,
    printed: u64,
}

impl<W: Write> RowPrinter<W> {
    fn new(out: W, json: bool) -> Self {
        RowPrinter {
            out,
            json,
            widths: ROW_HEADERS.iter().map(|h| h.len()).collect(),
            printed: 0,
        }
    }

    fn page(&mut self, rows: &[OutboxRow]) -> io::Result<()> {
        if self.json {
            for r in rows {
                serde_json::to_writer(&mut self.out, &row_json(r))?;
                self.out.write_all(b"\n")?;
            }
            self.printed += rows.len() as u64;
            return Ok(());
        }
        let cells: Vec<Vec<String>> = rows.iter().map(row_cells).collect();
        for c in &cells {
            for (w, v) in self.widths.iter_mut().zip(c) {
                *w = (*w).max(v.chars().count());
            }
        }
        if self.printed == 0 && !cells.is_empty() {
            let header: Vec<String> = ROW_HEADERS.iter().map(|h| (*h).to_owned()).collect();
            output::write_row(&mut self.out, &self.widths, &header)?;
        }
        for c in &cells {
            output::write_row(&mut self.out, &self.widths, c)?;
        }
        self.printed += cells.len() as u64;
        Ok(())
    }
}

/// One row in full, for the dry run of `retry`.
fn print_row<W: Write>(out: &mut W, r: &OutboxRow, json: bool) -> io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, &row_json(r))?;
        return out.write_all(b"\n");
    }
    let mut pairs = vec![
        ("id", r.message.id().to_string()),
        ("destination", r.message.destination().to_owned()),
        ("status", status_text(r)),
        ("attempts", r.attempts.to_string()),
        ("age", human(r.age)),
        (
            "origin",
            format!("{} / {}", r.origin_scope, origin(r).readable_key()),
        ),
        (
            "last error",
            r.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ),
    ];
    if let Some(k) = r.message.ordering_key() {
        pairs.push(("ordering key", k.to_owned()));
    }
    pairs.push(("payload", format!("{} B", r.message.payload().len())));
    output::fields(out, &pairs)
}

/// Prints the statistics: one line per destination.
fn print_stats<W: Write>(out: &mut W, stats: &OutboxStats, json: bool) -> io::Result<()> {
    #[derive(Serialize)]
    struct StatsJson<'a> {
        destination: &'a str,
        pending: u64,
        oldest_pending_ms: Option<u64>,
        dead: u64,
        sent: u64,
    }
    if json {
        for d in &stats.destinations {
            serde_json::to_writer(
                &mut *out,
                &StatsJson {
                    destination: &d.destination,
                    pending: d.pending,
                    oldest_pending_ms: d.oldest_pending.map(ms),
                    dead: d.dead,
                    sent: d.sent,
                },
            )?;
            out.write_all(b"\n")?;
        }
        return out.flush();
    }
    let header = ["DESTINATION", "PENDING", "OLDEST PENDING", "DEAD", "SENT"];
    let rows: Vec<Vec<String>> = stats
        .destinations
        .iter()
        .map(|d| {
            vec![
                d.destination.clone(),
                d.pending.to_string(),
                d.oldest_pending.map_or_else(|| "-".to_owned(), human),
                d.dead.to_string(),
                d.sent.to_string(),
            ]
        })
        .collect();
    output::table(out, &header, &rows)?;
    out.flush()
}
