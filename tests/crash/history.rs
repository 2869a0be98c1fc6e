//! The histories: one append-only file per worker process (each line written and
//! fsynced before the worker goes on, so it survives `kill -9`), and the driver's own
//! log of the faults it injected.
//!
//! A line is `KIND key a b c`, space separated, with wall-clock microseconds (all
//! processes and the servers run on one host) and, where the store gives one, the
//! claim's fencing token, which is the store's clock in microseconds at the claim.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch by this host's clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

/// An append-only, fsynced history file.
#[derive(Debug)]
pub struct History {
    file: Mutex<File>,
}

impl History {
    /// Creates (or appends to) `path`.
    pub fn open(path: &Path) -> History {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("history file {}: {e}", path.display()));
        History {
            file: Mutex::new(file),
        }
    }

    /// Appends one event and fsyncs it; the line gets the current time appended.
    pub fn event(&self, kind: &str, fields: &[&dyn std::fmt::Display]) {
        let mut line = String::with_capacity(64);
        line.push_str(kind);
        for f in fields {
            line.push(' ');
            line.push_str(&f.to_string());
        }
        line.push(' ');
        line.push_str(&now_us().to_string());
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line.as_bytes()).expect("history write");
        file.sync_data().expect("history fsync");
    }
}

/// One parsed line: its kind, its fields, and its time (the last field).
#[derive(Clone, Debug)]
pub struct Line {
    pub kind: String,
    pub fields: Vec<String>,
    pub at: u64,
    /// The process that wrote it.
    pub pid: u32,
}

/// Reads every `history-<pid>.log` in `dir`. A torn last line (a process killed while
/// writing) is skipped.
pub fn read_all(dir: &Path) -> Vec<Line> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).expect("run directory") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("history-")
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("history file");
        for raw in text.split_inclusive('\n') {
            let Some(raw) = raw.strip_suffix('\n') else {
                continue; // torn
            };
            let mut parts: Vec<String> = raw.split(' ').map(str::to_owned).collect();
            let Some(at) = parts.pop().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if parts.is_empty() {
                continue;
            }
            let kind = parts.remove(0);
            lines.push(Line {
                kind,
                fields: parts,
                at,
                pid,
            });
        }
    }
    lines.sort_by_key(|l| l.at);
    lines
}
