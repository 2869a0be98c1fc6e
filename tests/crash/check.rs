//! The checker: reads the histories, the driver's fault log and the final broker and
//! store state, and checks every key.

use crate::Mode;
use crate::driver::Profile;
use crate::history::Line;
use idempotent_runtime::store::{Record, RecordState};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::Duration;

/// A fault the driver injected on the store side, on the host clock (µs).
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: &'static str,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug)]
pub struct FinalState {
    pub pending: u64,
    pub ack_pending: u64,
    pub deliveries: u64,
    pub records: HashMap<String, Option<Record>>,
    /// Transactional modes: the effect rows' tokens per order.
    pub effects: Option<HashMap<String, Vec<u64>>>,
}

pub struct Input<'a> {
    pub mode: Mode,
    pub lease_us: u64,
    pub orders: &'a [String],
    pub messages: usize,
    pub duplicates: usize,
    pub planned_failures: usize,
    pub planned_panics: usize,
    pub lines: &'a [Line],
    /// `kill -9` of a worker: its pid and when.
    pub kills: &'a [(u32, u64)],
    pub faults: &'a [Fault],
    /// Workers stopped at the end of the run, and when.
    pub stopped: &'a [u32],
    pub stopped_at: u64,
    pub final_state: FinalState,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Why a key ran again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The body returned the planned error (released, retried).
    HandlerFailed,
    /// The body panicked as planned (released, retried).
    Panicked,
    /// The process running the body was killed.
    Killed,
    /// A store fault: the completion, release or commit did not reach the store.
    StoreFault,
    /// Nothing explains it.
    Unexplained,
}

/// One execution of a body: its claim and what became of it.
#[derive(Clone, Debug)]
struct Exec {
    token: u64,
    pid: u32,
    start: u64,
    /// `E`, `F` or `P` and when.
    end: Option<(char, u64)>,
    /// The handler's outcome for this execution and when.
    outcome: Option<(String, u64)>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub mode: Option<Mode>,
    pub messages: usize,
    pub duplicates: usize,
    pub planned_failures: usize,
    pub planned_panics: usize,
    pub kills: usize,
    pub kills_mid_body: usize,
    pub store_faults: BTreeMap<&'static str, usize>,
    pub deliveries: u64,
    pub executions: usize,
    pub replays: usize,
    pub in_progress: usize,
    pub reexecutions: BTreeMap<Reason, usize>,
    pub overlaps_after_store_fault: usize,
    pub lost: usize,
    pub double_effects: usize,
    pub elapsed: Duration,
    pub violations: Vec<String>,
}

impl Report {
    pub fn unexplained(&self) -> usize {
        self.reexecutions
            .get(&Reason::Unexplained)
            .copied()
            .unwrap_or(0)
    }

    fn explained(&self) -> usize {
        self.reexecutions
            .iter()
            .filter(|(r, _)| **r != Reason::Unexplained)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "messages {} ({} duplicates resent), planned failures {}, planned panics {}",
            self.messages, self.duplicates, self.planned_failures, self.planned_panics
        );
        let _ = writeln!(
            s,
            "faults: {} kill -9 ({} mid-body), {:?}",
            self.kills, self.kills_mid_body, self.store_faults
        );
        let _ = writeln!(
            s,
            "deliveries {}, executions {}, replays {}, in-progress naks {}",
            self.deliveries, self.executions, self.replays, self.in_progress
        );
        let _ = writeln!(
            s,
            "re-executions {:?}; overlaps after a lease lost to a store fault {}",
            self.reexecutions, self.overlaps_after_store_fault
        );
        let _ = writeln!(
            s,
            "lost {}, double effects {}, run time {:.1} s",
            self.lost,
            self.double_effects,
            self.elapsed.as_secs_f64()
        );
        if self.violations.is_empty() {
            s.push_str("OK: every invariant holds\n");
        } else {
            let _ = writeln!(s, "{} VIOLATIONS:", self.violations.len());
            for v in self.violations.iter().take(50) {
                let _ = writeln!(s, "  - {v}");
            }
        }
        s
    }
}

/// The figures of every mode as a Markdown table.
pub fn table(p: &Profile, reports: &[(Mode, Report)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "profile {}: {} workers, {} orders, {:.0} % resent, {:.0} % failing and {:.0} % panicking once, a kill every {}-{} ms",
        p.name,
        p.workers,
        p.orders,
        p.duplicates * 100.0,
        p.failures * 100.0,
        p.panics * 100.0,
        p.kill_every_ms.0,
        p.kill_every_ms.1
    );
    s.push_str("\n| | ");
    s.push_str(
        &reports
            .iter()
            .map(|(m, _)| m.name())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    s.push_str(" |\n|---|");
    s.push_str(&"---|".repeat(reports.len()));
    s.push('\n');
    let row = |s: &mut String, name: &str, f: &dyn Fn(&Report) -> String| {
        let _ = write!(s, "| {name} |");
        for (_, r) in reports {
            let _ = write!(s, " {} |", f(r));
        }
        s.push('\n');
    };
    let n = |r: &Report, k: Reason| r.reexecutions.get(&k).copied().unwrap_or(0);
    row(&mut s, "messages published", &|r| r.messages.to_string());
    row(&mut s, "duplicates sent (new Nats-Msg-Id)", &|r| {
        r.duplicates.to_string()
    });
    row(
        &mut s,
        "orders failing / panicking on first delivery",
        &|r| format!("{} / {}", r.planned_failures, r.planned_panics),
    );
    row(&mut s, "`kill -9` of a worker (mid-body)", &|r| {
        format!("{} ({})", r.kills, r.kills_mid_body)
    });
    row(&mut s, "Redis restarts", &|r| {
        r.store_faults
            .get("redis-restart")
            .copied()
            .unwrap_or(0)
            .to_string()
    });
    row(&mut s, "connection cuts", &|r| {
        r.store_faults
            .get("connections-cut")
            .copied()
            .unwrap_or(0)
            .to_string()
    });
    row(&mut s, "deliveries", &|r| r.deliveries.to_string());
    row(&mut s, "executions (bodies started)", &|r| {
        r.executions.to_string()
    });
    row(&mut s, "replays of a completed key", &|r| {
        r.replays.to_string()
    });
    row(
        &mut s,
        "re-executions after a handler error / panic",
        &|r| {
            format!(
                "{} / {}",
                n(r, Reason::HandlerFailed),
                n(r, Reason::Panicked)
            )
        },
    );
    row(&mut s, "re-executions after a kill / a store fault", &|r| {
        format!("{} / {}", n(r, Reason::Killed), n(r, Reason::StoreFault))
    });
    row(&mut s, "re-executions explained (total)", &|r| {
        r.explained().to_string()
    });
    row(&mut s, "**unexplained re-executions**", &|r| {
        format!("**{}**", r.unexplained())
    });
    row(&mut s, "**lost**", &|r| format!("**{}**", r.lost));
    row(&mut s, "**double effects (tx modes)**", &|r| {
        if r.mode.is_some_and(Mode::is_tx) {
            format!("**{}**", r.double_effects)
        } else {
            "n/a".to_owned()
        }
    });
    row(&mut s, "invariant violations", &|r| {
        r.violations.len().to_string()
    });
    row(&mut s, "run time", &|r| {
        format!("{:.0} s", r.elapsed.as_secs_f64())
    });
    s
}

fn field<T: std::str::FromStr>(l: &Line, i: usize) -> T {
    l.fields
        .get(i)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("malformed history line {l:?}"))
}

pub fn check(inp: &Input<'_>) -> Report {
    let mut r = Report {
        mode: Some(inp.mode),
        messages: inp.messages,
        duplicates: inp.duplicates,
        planned_failures: inp.planned_failures,
        planned_panics: inp.planned_panics,
        kills: inp.kills.len(),
        deliveries: inp.final_state.deliveries,
        elapsed: inp.elapsed,
        ..Report::default()
    };
    for f in inp.faults {
        *r.store_faults.entry(f.kind).or_default() += 1;
    }
    let v = &mut r.violations;
    if inp.timed_out {
        v.push(format!(
            "the broker still had work after {:.0} s",
            inp.elapsed.as_secs_f64()
        ));
    }
    let killed: HashMap<u32, u64> = inp.kills.iter().copied().collect();
    let fault_near = |from: u64, to: u64| {
        inp.faults
            .iter()
            .any(|f| f.end + 1_000_000 >= from && f.start <= to + 1_000_000)
    };

    // executions per key, from the histories
    let mut execs: HashMap<&str, Vec<Exec>> = HashMap::new();
    for l in inp.lines {
        let key = || l.fields[0].as_str();
        match l.kind.as_str() {
            "S" => execs.entry(key()).or_default().push(Exec {
                token: field(l, 1),
                pid: l.pid,
                start: l.at,
                end: None,
                outcome: None,
            }),
            "E" | "F" | "P" => {
                let token: u64 = field(l, 1);
                match execs
                    .get_mut(key())
                    .and_then(|es| es.iter_mut().find(|e| e.token == token && e.pid == l.pid))
                {
                    Some(e) => e.end = Some((l.kind.chars().next().unwrap(), l.at)),
                    None => v.push(format!("{} without a start: {l:?}", l.kind)),
                }
            }
            "O" => {
                let outcome: String = field(l, 1);
                let token: u64 = field(l, 2);
                match outcome.as_str() {
                    "replayed" => r.replays += 1,
                    "in_progress" => r.in_progress += 1,
                    _ => {}
                }
                if outcome != "replayed"
                    && token != 0
                    && let Some(e) = execs
                        .get_mut(key())
                        .and_then(|es| es.iter_mut().find(|e| e.token == token && e.pid == l.pid))
                {
                    // the first outcome (commit_failed is written before the error)
                    e.outcome.get_or_insert((outcome, l.at));
                }
            }
            _ => {}
        }
    }
    for (&pid, &at) in &killed {
        let mid = execs
            .values()
            .flatten()
            .any(|e| e.pid == pid && e.start <= at && e.end.is_none_or(|(_, t)| t > at));
        if mid {
            r.kills_mid_body += 1;
        }
    }

    let fs = &inp.final_state;
    if fs.pending != 0 || fs.ack_pending != 0 {
        v.push(format!(
            "the broker still has {} pending and {} unacknowledged messages",
            fs.pending, fs.ack_pending
        ));
    }
    for id in inp.orders {
        let mut es = execs.remove(id.as_str()).unwrap_or_default();
        es.sort_by_key(|e| e.token);
        r.executions += es.len();
        let rec = fs.records.get(id).cloned().flatten();
        // the execution whose completion is recorded
        let done = match &rec {
            Some(rec) if rec.state == RecordState::Completed => rec
                .output
                .as_deref()
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| o.parse::<u64>().ok()),
            _ => None,
        };
        let Some(done) = done else {
            r.lost += 1;
            v.push(format!(
                "{id}: lost: final record {rec:?} is not Completed with an execution's token ({} executions)",
                es.len()
            ));
            continue;
        };
        match es.iter().find(|e| e.token == done) {
            Some(e) if matches!(e.end, Some(('E', _))) => {}
            other => v.push(format!(
                "{id}: the completion (token {done}) belongs to no finished execution: {other:?}"
            )),
        }
        // G2: nothing started after the recorded completion
        for e in es.iter().filter(|e| e.token > done) {
            v.push(format!(
                "{id}: G2: execution with token {} started after the completion with token {done}",
                e.token
            ));
        }
        if let Some(acked) = es
            .iter()
            .find(|e| e.token == done)
            .and_then(|e| e.outcome.as_ref())
            .filter(|(o, _)| o == "executed" || o == "committed")
            .map(|(_, at)| *at)
        {
            for e in es.iter().filter(|e| e.start > acked) {
                v.push(format!(
                    "{id}: G2: execution (token {}) started after the completion was acknowledged",
                    e.token
                ));
            }
        }
        // G7: the effect exists once, written by the completed execution
        if let Some(effects) = &fs.effects {
            let rows = effects.get(id).map(Vec::as_slice).unwrap_or(&[]);
            if rows.len() != 1 {
                if rows.len() > 1 {
                    r.double_effects += 1;
                }
                v.push(format!(
                    "{id}: G7: {} effect rows (tokens {rows:?})",
                    rows.len()
                ));
            } else if rows[0] != done {
                v.push(format!(
                    "{id}: G7: the effect row has token {}, the completion {done}",
                    rows[0]
                ));
            }
        }
        // every execution after the first, explained by what became of the one before;
        // G1 on the pairs
        for pair in es.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let kill = killed.get(&a.pid).copied().filter(|&k| k >= a.start);
            let end = match (a.end, &a.outcome, kill) {
                (Some((_, t)), _, _) => Some(t),
                (None, Some((_, t)), _) => Some(*t),
                (None, None, Some(k)) => Some(k),
                (None, None, None) => None,
            };
            let reason = match (a.end.map(|e| e.0), a.outcome.as_ref().map(|o| o.0.as_str())) {
                (Some('F'), _) => Reason::HandlerFailed,
                (Some('P'), _) => Reason::Panicked,
                // killed mid-body, or after the body before its completion or commit
                _ if kill.is_some() && a.outcome.is_none() => Reason::Killed,
                (_, Some("store_error" | "commit_failed" | "error" | "executed" | "committed"))
                    if fault_near(a.start, b.start) =>
                {
                    Reason::StoreFault
                }
                _ if inp.mode.is_tx() && fault_near(a.start, b.start) => Reason::StoreFault,
                _ => Reason::Unexplained,
            };
            *r.reexecutions.entry(reason).or_default() += 1;
            if reason == Reason::Unexplained {
                v.push(format!(
                    "{id}: unexplained re-execution (token {}) after {a:?}",
                    b.token
                ));
            }
            // G1: the next execution starts after this one ended, unless its lease was
            // lost to a store fault
            let overlap = end.is_none_or(|t| t > b.start);
            if overlap {
                if fault_near(a.start, b.start) {
                    r.overlaps_after_store_fault += 1;
                } else {
                    v.push(format!(
                        "{id}: G1: executions {} and {} overlapped (first ended at {end:?}, second started at {})",
                        a.token, b.token, b.start
                    ));
                }
            }
            // G1 on the store's clock: a killed holder's lease ran out before the
            // takeover (tokens are the store's clock at the claim)
            if !inp.mode.is_tx() && reason == Reason::Killed && b.token < a.token + inp.lease_us {
                v.push(format!(
                    "{id}: G1: token {} taken over at {} µs by the store clock, before the killed holder's lease ({} µs) ran out",
                    a.token,
                    b.token - a.token,
                    inp.lease_us
                ));
            }
        }
        for e in &es {
            if e.end.is_none()
                && e.outcome.is_none()
                && !killed.contains_key(&e.pid)
                && !inp.stopped.contains(&e.pid)
            {
                v.push(format!("{id}: execution {} vanished: {e:?}", e.token));
            }
            if e.end.is_none()
                && inp.stopped.contains(&e.pid)
                && !killed.contains_key(&e.pid)
                && e.start < inp.stopped_at
                && e.outcome.is_none()
                && es.last().is_some_and(|l| l.token == e.token)
            {
                v.push(format!(
                    "{id}: execution {} still running at the end",
                    e.token
                ));
            }
        }
    }
    for key in execs.keys() {
        v.push(format!("execution of a key never published: {key}"));
    }
    r
}

#[cfg(test)]
mod tests {
    //! The checker on hand-written histories: each broken invariant is reported.
    use super::*;

    const LEASE_US: u64 = 2_000_000;

    fn line(pid: u32, at: u64, kind: &str, fields: &[&str]) -> Line {
        Line {
            kind: kind.to_owned(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            at,
            pid,
        }
    }

    fn completed(token: u64) -> Option<Record> {
        let mut r = Record::new(
            RecordState::Completed,
            1,
            idempotent_runtime::Token::new(token),
        );
        r.output = Some(token.to_string().into_bytes());
        Some(r)
    }

    fn run(
        mode: Mode,
        lines: &[Line],
        kills: &[(u32, u64)],
        faults: &[Fault],
        record: Option<Record>,
        effects: Option<Vec<u64>>,
    ) -> Report {
        let orders = vec!["o1".to_owned()];
        check(&Input {
            mode,
            lease_us: LEASE_US,
            orders: &orders,
            messages: 1,
            duplicates: 0,
            planned_failures: 0,
            planned_panics: 0,
            lines,
            kills,
            faults,
            stopped: &[],
            stopped_at: u64::MAX,
            final_state: FinalState {
                pending: 0,
                ack_pending: 0,
                deliveries: 1,
                records: HashMap::from([("o1".to_owned(), record)]),
                effects: effects.map(|e| HashMap::from([("o1".to_owned(), e)])),
            },
            timed_out: false,
            elapsed: Duration::ZERO,
        })
    }

    /// A failed first attempt, a second killed mid-body, a third that completes.
    fn clean() -> Vec<Line> {
        vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(1, 150, "F", &["o1", "100"]),
            line(1, 160, "O", &["o1", "failed", "100"]),
            line(2, 200, "S", &["o1", "200", "2"]),
            line(3, 3_000_000, "S", &["o1", "2500000", "3"]),
            line(3, 3_000_100, "E", &["o1", "2500000"]),
            line(3, 3_000_200, "O", &["o1", "executed", "2500000"]),
            line(3, 3_000_300, "A", &["o1", "1"]),
        ]
    }

    #[test]
    fn a_clean_history_passes_and_each_rerun_has_its_reason() {
        let r = run(
            Mode::Redis,
            &clean(),
            &[(2, 300)],
            &[],
            completed(2_500_000),
            None,
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.executions, 3);
        assert_eq!(r.reexecutions.get(&Reason::HandlerFailed), Some(&1));
        assert_eq!(r.reexecutions.get(&Reason::Killed), Some(&1));
        assert_eq!(r.kills_mid_body, 1);
    }

    #[test]
    fn an_execution_after_the_completion_breaks_g2() {
        let mut h = clean();
        h.push(line(4, 4_000_000, "S", &["o1", "4000000", "4"]));
        h.push(line(4, 4_000_100, "E", &["o1", "4000000"]));
        let r = run(
            Mode::Redis,
            &h,
            &[(2, 300)],
            &[],
            completed(2_500_000),
            None,
        );
        assert!(
            r.violations.iter().any(|v| v.contains("G2")),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn overlapping_executions_break_g1() {
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(2, 200, "S", &["o1", "200", "2"]),
            line(1, 300, "F", &["o1", "100"]),
            line(2, 400, "E", &["o1", "200"]),
            line(2, 500, "O", &["o1", "executed", "200"]),
        ];
        let r = run(Mode::Redis, &h, &[], &[], completed(200), None);
        assert!(
            r.violations.iter().any(|v| v.contains("G1")),
            "{:?}",
            r.violations
        );
        // the same overlap beside a store fault is counted, not a violation
        let fault = Fault {
            kind: "redis-restart",
            start: 150,
            end: 180,
        };
        let r = run(Mode::Redis, &h, &[], &[fault], completed(200), None);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.overlaps_after_store_fault, 1);
    }

    #[test]
    fn a_takeover_before_a_killed_holders_lease_ran_out_breaks_g1() {
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(2, 1_000, "S", &["o1", "900000", "2"]),
            line(2, 1_100, "E", &["o1", "900000"]),
            line(2, 1_200, "O", &["o1", "executed", "900000"]),
        ];
        let r = run(Mode::Redis, &h, &[(1, 500)], &[], completed(900_000), None);
        assert!(
            r.violations.iter().any(|v| v.contains("lease")),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn a_key_not_completed_is_lost() {
        let h = vec![line(1, 100, "S", &["o1", "100", "1"])];
        let r = run(Mode::Redis, &h, &[(1, 200)], &[], None, None);
        assert_eq!(r.lost, 1);
        assert!(!r.violations.is_empty());
    }

    #[test]
    fn two_effect_rows_break_g7() {
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(1, 200, "E", &["o1", "100"]),
            line(1, 300, "O", &["o1", "committed", "100"]),
        ];
        let r = run(Mode::PgTx, &h, &[], &[], completed(100), Some(vec![100]));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        let r = run(
            Mode::PgTx,
            &h,
            &[],
            &[],
            completed(100),
            Some(vec![100, 100]),
        );
        assert_eq!(r.double_effects, 1);
        assert!(
            r.violations.iter().any(|v| v.contains("G7")),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn an_unexplained_rerun_is_reported() {
        // the first execution completed and was acknowledged; nothing explains a second
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(1, 200, "E", &["o1", "100"]),
            line(1, 300, "O", &["o1", "executed", "100"]),
            line(2, 5_000, "S", &["o1", "5000", "2"]),
            line(2, 5_100, "E", &["o1", "5000"]),
            line(2, 5_200, "O", &["o1", "executed", "5000"]),
        ];
        let r = run(Mode::Redis, &h, &[], &[], completed(5_000), None);
        assert_eq!(r.unexplained(), 1, "{:?}", r.violations);
    }
}
