//! Printing: aligned tables for people, one JSON object per line for scripts.

use crate::duration::human;
use idempotent_runtime::RecordKey;
use idempotent_runtime::store::{Record, RecordState, ScanItem, ScopeStats};
use serde::Serialize;
use std::io::{self, Write};
use std::time::Duration;

/// The name of a state, as printed and as `--state` takes it.
pub(crate) fn state_name(state: RecordState) -> &'static str {
    match state {
        RecordState::InProgress => "in-progress",
        RecordState::Completed => "completed",
        RecordState::Released => "released",
        _ => "unknown",
    }
}

/// Bytes as lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses hex (upper or lower case, even length).
pub(crate) fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return Err(format!("`{s}` is not hex: odd number of digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                .map_err(|_| format!("`{s}` is not hex: use the digits 0-9 and a-f"))
        })
        .collect()
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn opt_human(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), human)
}

/// A record of a scan as JSON.
#[derive(Serialize)]
struct ItemJson<'a> {
    scope: &'a str,
    key: String,
    key_hex: String,
    hashed: bool,
    state: &'static str,
    stuck: bool,
    attempts: u32,
    token: u64,
    lease_remaining_ms: Option<u64>,
    expires_in_ms: Option<u64>,
    claimed_ago_ms: Option<u64>,
    output_bytes: Option<u64>,
}

/// Prints scan results page by page: a header once, columns aligned to the widest
/// value seen so far (so a stream of any length holds one page at a time).
pub(crate) struct ItemPrinter<W: Write> {
    out: W,
    json: bool,
    widths: Vec<usize>,
    printed: u64,
}

const ITEM_HEADERS: [&str; 9] = [
    "SCOPE",
    "KEY",
    "STATE",
    "ATTEMPTS",
    "LEASE LEFT",
    "EXPIRES IN",
    "CLAIMED",
    "OUTPUT",
    "TOKEN",
];

impl<W: Write> ItemPrinter<W> {
    pub(crate) fn new(out: W, json: bool) -> Self {
        ItemPrinter {
            out,
            json,
            widths: ITEM_HEADERS.iter().map(|h| h.len()).collect(),
            printed: 0,
        }
    }

    /// Records printed so far.
    pub(crate) fn printed(&self) -> u64 {
        self.printed
    }

    /// Prints one page.
    pub(crate) fn page(&mut self, items: &[ScanItem]) -> io::Result<()> {
        if self.json {
            for i in items {
                serde_json::to_writer(&mut self.out, &item_json(i))?;
                self.out.write_all(b"\n")?;
            }
            self.printed += items.len() as u64;
            return Ok(());
        }
        let rows: Vec<[String; 9]> = items.iter().map(item_row).collect();
        for r in &rows {
            for (w, c) in self.widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        if self.printed == 0 && !rows.is_empty() {
            let header: Vec<String> = ITEM_HEADERS.iter().map(|h| (*h).to_owned()).collect();
            write_row(&mut self.out, &self.widths, &header)?;
        }
        for r in &rows {
            write_row(&mut self.out, &self.widths, r)?;
        }
        self.printed += rows.len() as u64;
        Ok(())
    }

    /// Ends the listing: says that the scan left out `skipped` keys under `prefix`
    /// that are not records (see [`skipped`]), and flushes the output.
    pub(crate) fn finish(mut self, skipped: u64, prefix: &str) -> io::Result<()> {
        self::skipped(&mut self.out, skipped, prefix, self.json)
    }
}

/// Ends the output of a scan that left out `skipped` keys under the Redis `prefix`
/// because they hold no record: when there are any, in JSON a last line
/// `{"skipped":N}` on `out` (a record's line always has `key`, a statistics line
/// `scope`), and once `out` is flushed, a sentence on stderr.
pub(crate) fn skipped<W: Write>(
    out: &mut W,
    skipped: u64,
    prefix: &str,
    json: bool,
) -> io::Result<()> {
    if skipped > 0 && json {
        serde_json::to_writer(&mut *out, &serde_json::json!({ "skipped": skipped }))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if skipped > 0 {
        let (keys, are) = if skipped == 1 {
            ("key", "is not a record")
        } else {
            ("keys", "are not records")
        };
        eprintln!(
            "skipped {skipped} {keys} under the prefix `{p}` that {are} (another program's \
             keys, or records of a store whose prefix begins with `{p}`)",
            p = prefix.escape_debug()
        );
    }
    Ok(())
}

fn item_json(i: &ScanItem) -> ItemJson<'_> {
    ItemJson {
        scope: i.key.scope(),
        key: i.key.readable_key(),
        key_hex: hex(i.key.key()),
        hashed: i.key.is_hashed(),
        state: state_name(i.state),
        stuck: i.is_stuck(),
        attempts: i.attempts,
        token: i.token.get(),
        lease_remaining_ms: ms(i.lease_remaining),
        expires_in_ms: ms(i.expires_in),
        claimed_ago_ms: ms(Some(i.claimed_ago)),
        output_bytes: i.output_size,
    }
}

fn item_row(i: &ScanItem) -> [String; 9] {
    let state = if i.is_stuck() {
        "in-progress (lease expired)".to_owned()
    } else {
        state_name(i.state).to_owned()
    };
    [
        i.key.scope().to_owned(),
        i.key.readable_key(),
        state,
        i.attempts.to_string(),
        opt_human(i.lease_remaining),
        opt_human(i.expires_in),
        format!("{} ago", human(i.claimed_ago)),
        i.output_size
            .map_or_else(|| "-".to_owned(), |n| format!("{n} B")),
        i.token.to_string(),
    ]
}

/// Writes one row, columns separated by two spaces, the last one unpadded.
pub(crate) fn write_row<W: Write>(
    out: &mut W,
    widths: &[usize],
    cells: &[String],
) -> io::Result<()> {
    let mut line = String::new();
    for (n, (w, c)) in widths.iter().zip(cells).enumerate() {
        if n + 1 == cells.len() {
            line.push_str(c);
        } else {
            line.push_str(c);
            for _ in c.chars().count()..*w {
                line.push(' ');
            }
            line.push_str("  ");
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// Prints statistics.
pub(crate) fn stats<W: Write>(out: &mut W, rows: &[ScopeStats], json: bool) -> io::Result<()> {
    #[derive(Serialize)]
    struct StatsJson<'a> {
        scope: &'a str,
        state: &'static str,
        count: u64,
        oldest_claim_ms: Option<u64>,
        past_lease: u64,
        poisoned: u64,
    }
    if json {
        for s in rows {
            serde_json::to_writer(
                &mut *out,
                &StatsJson {
                    scope: &s.scope,
                    state: state_name(s.state),
                    count: s.count,
                    oldest_claim_ms: ms(s.oldest_claim),
                    past_lease: s.past_lease,
                    poisoned: s.poisoned,
                },
            )?;
            out.write_all(b"\n")?;
        }
        return out.flush();
    }
    let header = [
        "SCOPE",
        "STATE",
        "COUNT",
        "OLDEST CLAIM",
        "PAST LEASE",
        "POISONED",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            vec![
                s.scope.clone(),
                state_name(s.state).to_owned(),
                s.count.to_string(),
                opt_human(s.oldest_claim),
                s.past_lease.to_string(),
                s.poisoned.to_string(),
            ]
        })
        .collect();
    table(out, &header, &cells)?;
    out.flush()
}

/// Prints a whole table, aligned.
pub(crate) fn table<W: Write>(
    out: &mut W,
    header: &[&str],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    write_row(out, &widths, &header)?;
    for r in rows {
        write_row(out, &widths, r)?;
    }
    Ok(())
}

/// Prints name/value pairs, names aligned.
pub(crate) fn fields<W: Write>(out: &mut W, pairs: &[(&str, String)]) -> io::Result<()> {
    let w = pairs.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (n, v) in pairs {
        writeln!(out, "{n:<w$}  {v}")?;
    }
    Ok(())
}

/// The record of one message, for `inspect` and the confirmations.
pub(crate) fn record<W: Write>(
    out: &mut W,
    key: &RecordKey,
    r: &Record,
    json: bool,
) -> io::Result<()> {
    let output_text = r
        .output
        .as_ref()
        .map(|o| String::from_utf8_lossy(o).into_owned());
    if json {
        #[derive(Serialize)]
        struct RecordJson<'a> {
            scope: &'a str,
            key: String,
            key_hex: String,
            hashed: bool,
            state: &'static str,
            stuck: bool,
            attempts: u32,
            token: u64,
            lease_remaining_ms: Option<u64>,
            expires_in_ms: Option<u64>,
            fingerprint_hex: Option<String>,
            output: Option<String>,
            output_bytes: Option<usize>,
        }
        serde_json::to_writer(
            &mut *out,
            &RecordJson {
                scope: key.scope(),
                key: key.readable_key(),
                key_hex: hex(key.key()),
                hashed: key.is_hashed(),
                state: state_name(r.state),
                stuck: r.state == RecordState::InProgress && r.lease_remaining.is_none(),
                attempts: r.attempts,
                token: r.token.get(),
                lease_remaining_ms: ms(r.lease_remaining),
                expires_in_ms: ms(r.expires_in),
                fingerprint_hex: r.fingerprint.as_deref().map(hex),
                output: output_text,
                output_bytes: r.output.as_ref().map(Vec::len),
            },
        )?;
        return out.write_all(b"\n");
    }
    let state = match r.state {
        RecordState::InProgress if r.lease_remaining.is_none() => {
            "in-progress, lease expired: the holder stopped; the next delivery takes it over"
        }
        RecordState::InProgress => "in-progress: a consumer holds the claim",
        RecordState::Completed => "completed: duplicates replay the cached output",
        RecordState::Released => "released: the last attempt failed; the next delivery retries",
        _ => "unknown",
    };
    let mut pairs = vec![
        ("scope", key.scope().to_owned()),
        ("key", key.readable_key()),
        ("key hex", hex(key.key())),
        ("state", state.to_owned()),
        ("attempts", r.attempts.to_string()),
        ("token", r.token.to_string()),
        ("lease left", opt_human(r.lease_remaining)),
        ("expires in", opt_human(r.expires_in)),
    ];
    if let Some(fp) = &r.fingerprint {
        pairs.push(("fingerprint", hex(fp)));
    }
    match (&r.output, output_text) {
        (Some(o), Some(text)) => pairs.push(("output", format!("{text} ({} B)", o.len()))),
        _ if r.state == RecordState::Completed => pairs.push(("output", "(not cached)".to_owned())),
        _ => {}
    }
    fields(out, &pairs)
}
