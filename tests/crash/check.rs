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

/// A Redis failover the driver caused (failover modes), on the host clock (µs), which
/// is also the servers' clock and so the clock of the claims' tokens.
#[derive(Clone, Debug, Default)]
pub struct Failover {
    /// The replication link cut: from here the master acknowledges writes that the
    /// replica never gets.
    pub partitioned_at: u64,
    /// The master killed (after the SIGKILL returned): every claim the old master made
    /// has a smaller token, every claim of the promoted replica a larger one.
    pub killed_at: u64,
    /// The driver asked Sentinel to promote the replica: nothing was written on the
    /// promoted replica before, so a completion acknowledged earlier was acknowledged
    /// by the old master.
    pub promoting_at: u64,
    /// Sentinel names the promoted replica as the master.
    pub promoted_at: u64,
    /// The promoted replica is the master Sentinel names, with a replica of its own.
    pub ready_at: u64,
    /// What the replica held of each order's record when the master died, read between
    /// the kill and the promotion: its state and token, `None` when it had no record.
    pub survived: HashMap<String, Option<(RecordState, u64)>>,
}

impl Failover {
    /// The failover's window: from the partition until the new master is ready.
    fn window(&self) -> (u64, u64) {
        (self.partitioned_at, self.ready_at)
    }
}

/// How a failover lost what an execution wrote on the old master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailoverLoss {
    /// The claim was on the old master only.
    Claim,
    /// The completion, acknowledged by the old master, was on it only.
    Completion,
    /// The completion was not recorded (`unrecorded`, `lease_lost`) while the failover
    /// was under way; the promoted replica holds the claim.
    Unrecorded,
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
    /// Failover modes: whether the store waited for a replica's acknowledgement
    /// (`with_replica_ack`): then nothing it acknowledged may be lost in a failover.
    pub replica_ack: bool,
    /// The Redis failovers (failover modes).
    pub failovers: &'a [Failover],
    /// `kill -9` of a worker: its pid and when the signal was sent (the worker runs no
    /// code after that).
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
    /// A failover lost the earlier execution's claim: the promoted replica did not
    /// have it.
    FailoverClaimLost,
    /// A failover lost the earlier execution's completion, acknowledged by the old
    /// master before the promoted replica had it.
    FailoverCompletionLost,
    /// The earlier execution's completion was not recorded (`unrecorded`,
    /// `lease_lost`) while a failover was under way.
    FailoverUnrecorded,
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
    pub failovers: usize,
    /// Overlapping executions after a failover lost the first one's claim.
    pub overlaps_after_failover: usize,
    /// Orders whose body finished once but whose record a failover lost (claim or
    /// completion on the old master only, or the completion not recorded during the
    /// failover) and that no later delivery ran again: their final record is not
    /// Completed.
    pub unrecorded_after_failover: usize,
    pub lost: usize,
    pub double_effects: usize,
    pub elapsed: Duration,
    pub violations: Vec<String>,
    /// `pg-outbox`: the report of stage 2, the payments.
    pub downstream: Option<Box<Report>>,
    /// Lines printed after the figures (`pg-outbox`: the outbox and the relays).
    pub notes: Vec<String>,
}

impl Report {
    /// No invariant broken, here or downstream.
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.downstream.as_ref().is_none_or(|d| d.ok())
    }

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

    fn count(&self, r: Reason) -> usize {
        self.reexecutions.get(&r).copied().unwrap_or(0)
    }

    /// Re-executions a failover explains (claim lost, completion lost, completion not
    /// recorded).
    pub fn explained_by_failover(&self) -> usize {
        self.count(Reason::FailoverClaimLost)
            + self.count(Reason::FailoverCompletionLost)
            + self.count(Reason::FailoverUnrecorded)
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.downstream {
            s.push_str("stage 1 (orders):\n");
            s.push_str(&self.render_own());
            s.push_str("stage 2 (payments):\n");
            s.push_str(&d.render());
        } else {
            s.push_str(&self.render_own());
        }
        for n in &self.notes {
            let _ = writeln!(s, "{n}");
        }
        s
    }

    fn render_own(&self) -> String {
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
        if self.failovers > 0 {
            let _ = writeln!(
                s,
                "failovers {}: re-executions explained by a failover {} (claim lost {}, \
                 acknowledged completion lost {}, completion not recorded {}); orders done \
                 once whose record a failover lost {}; overlaps after a lost claim {}",
                self.failovers,
                self.explained_by_failover(),
                self.count(Reason::FailoverClaimLost),
                self.count(Reason::FailoverCompletionLost),
                self.count(Reason::FailoverUnrecorded),
                self.unrecorded_after_failover,
                self.overlaps_after_failover
            );
        }
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
    // a pipeline's stages in columns of their own
    let mut columns: Vec<(String, &Report)> = Vec::new();
    for (m, r) in reports {
        match &r.downstream {
            Some(d) => {
                columns.push((format!("{} stage 1", m.name()), r));
                columns.push((format!("{} stage 2", m.name()), d));
            }
            None => columns.push((m.name().to_owned(), r)),
        }
    }
    s.push_str("\n| | ");
    s.push_str(
        &columns
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    s.push_str(" |\n|---|");
    s.push_str(&"---|".repeat(columns.len()));
    s.push('\n');
    let row = |s: &mut String, name: &str, f: &dyn Fn(&Report) -> String| {
        let _ = write!(s, "| {name} |");
        for (_, r) in &columns {
            let _ = write!(s, " {} |", f(r));
        }
        s.push('\n');
    };
    let n = |r: &Report, k: Reason| r.reexecutions.get(&k).copied().unwrap_or(0);
    row(&mut s, "messages published", &|r| r.messages.to_string());
    row(
        &mut s,
        "duplicates sent (new Nats-Msg-Id; pg-outbox stage 2: published again past the stream's duplicate window)",
        &|r| r.duplicates.to_string(),
    );
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
    row(
        &mut s,
        "Redis failovers (master killed, replica promoted)",
        &|r| r.failovers.to_string(),
    );
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
    row(
        &mut s,
        "re-executions explained by a failover: claim lost / completion lost / not recorded",
        &|r| {
            format!(
                "{} / {} / {}",
                n(r, Reason::FailoverClaimLost),
                n(r, Reason::FailoverCompletionLost),
                n(r, Reason::FailoverUnrecorded)
            )
        },
    );
    row(
        &mut s,
        "orders done once whose record a failover lost",
        &|r| r.unrecorded_after_failover.to_string(),
    );
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

/// Whether a failover lost what execution `e` of order `id` wrote on the old master,
/// so that the next execution (claimed with token `next`, `u64::MAX` for none) could
/// run: its claim was on the old master only; or its completion, acknowledged by the
/// old master before anything could be written on the promoted replica, was; or its
/// completion was not recorded while the failover was under way.
fn failover_loss(failovers: &[Failover], id: &str, e: &Exec, next: u64) -> Option<FailoverLoss> {
    for f in failovers {
        if e.token < f.killed_at && next > f.killed_at {
            match f.survived.get(id).copied().flatten() {
                None => return Some(FailoverLoss::Claim),
                Some((_, t)) if t < e.token => return Some(FailoverLoss::Claim),
                Some((RecordState::Completed, t)) if t == e.token => continue,
                Some((_, t)) if t == e.token => {
                    if e.outcome
                        .as_ref()
                        .is_some_and(|(o, at)| o == "executed" && *at < f.promoting_at)
                    {
                        return Some(FailoverLoss::Completion);
                    }
                }
                Some(_) => {}
            }
        }
        // the completion was tried (from the body's end to the outcome) while the
        // failover was under way, and given up
        let (from, to) = f.window();
        if let (Some(('E', ended)), Some((o, at))) = (e.end, &e.outcome)
            && matches!(o.as_str(), "unrecorded" | "lease_lost")
            && ended <= to
            && *at >= from
            && next > from
        {
            return Some(FailoverLoss::Unrecorded);
        }
    }
    None
}

pub fn check(inp: &Input<'_>) -> Report {
    let mut r = Report {
        mode: Some(inp.mode),
        failovers: inp.failovers.len(),
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
        if done.is_none() {
            // the last execution's body finished and was answered, but a failover lost
            // its record (and no later delivery ran it again): done once, not lost
            let unrecorded = es.last().is_some_and(|e| {
                matches!(e.end, Some(('E', _)))
                    && e.outcome.as_ref().is_some_and(|(o, _)| {
                        matches!(o.as_str(), "executed" | "unrecorded" | "lease_lost")
                    })
                    && failover_loss(inp.failovers, id, e, u64::MAX).is_some()
            });
            if unrecorded {
                r.unrecorded_after_failover += 1;
            } else {
                r.lost += 1;
                v.push(format!(
                    "{id}: lost: final record {rec:?} is not Completed with an execution's token ({} executions)",
                    es.len()
                ));
                continue;
            }
        }
        if let Some(done) = done {
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
        }
        // with replica acknowledgement, nothing the store acknowledged is lost in a
        // failover: a body runs only on a claim a replica has, and an `executed`
        // completion is on a replica
        if inp.replica_ack {
            for e in &es {
                let Some(f) = inp.failovers.iter().find(|f| e.token < f.killed_at) else {
                    continue;
                };
                match f.survived.get(id).copied().flatten() {
                    Some((_, t)) if t > e.token => {}
                    Some((state, t)) if t == e.token => {
                        let acked = e
                            .outcome
                            .as_ref()
                            .is_some_and(|(o, at)| o == "executed" && *at < f.promoting_at);
                        if acked && state != RecordState::Completed {
                            v.push(format!(
                                "{id}: the completion of execution {}, acknowledged by a replica, is not on the promoted replica (it holds {state:?})",
                                e.token
                            ));
                        }
                    }
                    other => v.push(format!(
                        "{id}: the claim of execution {}, acknowledged by a replica before its body ran, is not on the promoted replica (it holds {other:?})",
                        e.token
                    )),
                }
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
            let loss = failover_loss(inp.failovers, id, a, b.token);
            let reason = match (a.end.map(|e| e.0), a.outcome.as_ref().map(|o| o.0.as_str())) {
                (Some('F'), _) => Reason::HandlerFailed,
                (Some('P'), _) => Reason::Panicked,
                // the claim was on the old master only: the key was free on the new one
                _ if loss == Some(FailoverLoss::Claim) => Reason::FailoverClaimLost,
                // killed mid-body, or after the body before its completion or commit
                _ if kill.is_some() && a.outcome.is_none() => Reason::Killed,
                _ if loss == Some(FailoverLoss::Completion) => Reason::FailoverCompletionLost,
                _ if loss == Some(FailoverLoss::Unrecorded) => Reason::FailoverUnrecorded,
                (
                    _,
                    Some(
                        "store_error" | "commit_failed" | "error" | "executed" | "committed"
                        | "unrecorded" | "lease_lost",
                    ),
                ) if fault_near(a.start, b.start) => Reason::StoreFault,
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
            // lost to a store fault or its claim to a failover
            let overlap = end.is_none_or(|t| t > b.start);
            if overlap {
                if fault_near(a.start, b.start) {
                    r.overlaps_after_store_fault += 1;
                } else if loss == Some(FailoverLoss::Claim) {
                    r.overlaps_after_failover += 1;
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
        run_full(mode, lines, kills, faults, record, effects, false, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn run_full(
        mode: Mode,
        lines: &[Line],
        kills: &[(u32, u64)],
        faults: &[Fault],
        record: Option<Record>,
        effects: Option<Vec<u64>>,
        replica_ack: bool,
        failovers: &[Failover],
    ) -> Report {
        let orders = vec!["o1".to_owned()];
        check(&Input {
            mode,
            replica_ack,
            failovers,
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
    fn a_broken_downstream_stage_fails_the_run_and_has_its_column() {
        let mut r = Report {
            mode: Some(Mode::PgOutbox),
            downstream: Some(Box::default()),
            ..Report::default()
        };
        assert!(r.ok());
        r.downstream
            .as_mut()
            .unwrap()
            .violations
            .push("o1: lost".to_owned());
        assert!(!r.ok());
        let t = table(&crate::driver::Profile::short(), &[(Mode::PgOutbox, r)]);
        assert!(
            t.contains("| | pg-outbox stage 1 | pg-outbox stage 2 |"),
            "{t}"
        );
        assert!(t.contains("| invariant violations | 0 | 1 |"), "{t}");
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

    /// A failover: the link cut at 50 µs, the master killed at 1 ms, the promotion
    /// asked at 1.5 ms, the new master ready at 2 ms; the replica held `survived` of o1.
    fn failover(survived: Option<(RecordState, u64)>) -> Failover {
        Failover {
            partitioned_at: 50,
            killed_at: 1_000,
            promoting_at: 1_500,
            promoted_at: 1_800,
            ready_at: 2_000,
            survived: HashMap::from([("o1".to_owned(), survived)]),
        }
    }

    /// o1 executed and acknowledged on the old master before the failover, then again
    /// on the new master once the first claim's lease ran out.
    fn completed_then_rerun() -> Vec<Line> {
        vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(1, 200, "E", &["o1", "100"]),
            line(1, 300, "O", &["o1", "executed", "100"]),
            line(1, 310, "A", &["o1", "1"]),
            line(2, 2_500_000, "S", &["o1", "2500000", "2"]),
            line(2, 2_500_100, "E", &["o1", "2500000"]),
            line(2, 2_500_200, "O", &["o1", "executed", "2500000"]),
            line(2, 2_500_300, "A", &["o1", "2"]),
        ]
    }

    #[test]
    fn a_rerun_after_a_completion_lost_in_a_failover_is_counted_not_a_violation() {
        // the replica had the claim, not the completion
        let f = [failover(Some((RecordState::InProgress, 100)))];
        let h = completed_then_rerun();
        let r = run_full(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            completed(2_500_000),
            None,
            false,
            &f,
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.failovers, 1);
        assert_eq!(
            r.reexecutions.get(&Reason::FailoverCompletionLost),
            Some(&1)
        );
        assert_eq!(r.explained_by_failover(), 1);
        assert_eq!(r.unexplained(), 0);

        // with replica acknowledgement, an `executed` completion was on the replica:
        // losing it is a violation
        let r = run_full(
            Mode::RedisFailoverAck,
            &h,
            &[],
            &[],
            completed(2_500_000),
            None,
            true,
            &f,
        );
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("acknowledged by a replica")),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn a_rerun_the_failover_does_not_explain_is_a_violation() {
        // the replica had the completion: nothing explains the second execution
        let f = [failover(Some((RecordState::Completed, 100)))];
        let h = completed_then_rerun();
        let r = run_full(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            completed(2_500_000),
            None,
            false,
            &f,
        );
        assert_eq!(r.unexplained(), 1, "{:?}", r.violations);
        assert_eq!(r.explained_by_failover(), 0);
        assert!(!r.violations.is_empty());

        // acknowledged after the promotion was asked: by the new master, which kept it
        let mut late = completed_then_rerun();
        late[2] = line(1, 1_600, "O", &["o1", "executed", "100"]);
        let f = [failover(Some((RecordState::InProgress, 100)))];
        let r = run_full(
            Mode::RedisFailover,
            &late,
            &[],
            &[],
            completed(2_500_000),
            None,
            false,
            &f,
        );
        assert_eq!(r.unexplained(), 1, "{:?}", r.violations);

        // a failover before the first claim explains nothing either
        let mut f = failover(None);
        f.partitioned_at = 10;
        f.killed_at = 20;
        f.promoting_at = 30;
        f.promoted_at = 35;
        f.ready_at = 40;
        let r = run_full(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            completed(2_500_000),
            None,
            false,
            &[f],
        );
        assert_eq!(r.unexplained(), 1, "{:?}", r.violations);
    }

    #[test]
    fn a_claim_lost_in_a_failover_explains_an_overlap() {
        // o1's first claim (token 100) was on the old master only; the second runs on
        // the new master while the first body still runs, which then is fenced out
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(2, 1_700, "S", &["o1", "1700", "2"]),
            line(2, 1_800, "E", &["o1", "1700"]),
            line(2, 1_900, "O", &["o1", "executed", "1700"]),
            line(1, 2_100, "E", &["o1", "100"]),
            line(1, 2_200, "O", &["o1", "lease_lost", "100"]),
        ];
        let r = run_full(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            completed(1_700),
            None,
            false,
            &[failover(None)],
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.reexecutions.get(&Reason::FailoverClaimLost), Some(&1));
        assert_eq!(r.overlaps_after_failover, 1);

        // the replica had the claim: the overlap is not explained
        let f = [failover(Some((RecordState::InProgress, 100)))];
        let r = run_full(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            completed(1_700),
            None,
            false,
            &f,
        );
        assert!(
            r.violations.iter().any(|v| v.contains("G1")),
            "{:?}",
            r.violations
        );
        assert_eq!(r.unexplained(), 1);

        // with replica acknowledgement, no body runs on a claim the replica lacks
        let r = run_full(
            Mode::RedisFailoverAck,
            &h,
            &[],
            &[],
            completed(1_700),
            None,
            true,
            &[failover(None)],
        );
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("the claim of execution 100")),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn a_completion_not_recorded_during_a_failover_explains_a_rerun() {
        // the completion was tried during the failover and given up (`unrecorded`);
        // the key freed when the claim's lease ran out on the new master
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(1, 900, "E", &["o1", "100"]),
            line(1, 1_700, "O", &["o1", "unrecorded", "100"]),
            line(2, 2_500_000, "S", &["o1", "2500000", "2"]),
            line(2, 2_500_100, "E", &["o1", "2500000"]),
            line(2, 2_500_200, "O", &["o1", "executed", "2500000"]),
        ];
        let f = [failover(Some((RecordState::InProgress, 100)))];
        for ack in [false, true] {
            let r = run_full(
                Mode::RedisFailover,
                &h,
                &[],
                &[],
                completed(2_500_000),
                None,
                ack,
                &f,
            );
            assert!(r.violations.is_empty(), "{:?}", r.violations);
            assert_eq!(r.reexecutions.get(&Reason::FailoverUnrecorded), Some(&1));
        }
        // the same outcome with no failover under way is unexplained
        let r = run(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            completed(2_500_000),
            None,
        );
        assert_eq!(r.unexplained(), 1, "{:?}", r.violations);
    }

    #[test]
    fn an_order_done_once_whose_record_a_failover_lost_is_not_lost() {
        // executed and acknowledged on the old master; the replica had nothing, and no
        // duplicate came after the failover
        let h = vec![
            line(1, 100, "S", &["o1", "100", "1"]),
            line(1, 200, "E", &["o1", "100"]),
            line(1, 300, "O", &["o1", "executed", "100"]),
            line(1, 310, "A", &["o1", "1"]),
        ];
        let r = run_full(
            Mode::RedisFailover,
            &h,
            &[],
            &[],
            None,
            None,
            false,
            &[failover(None)],
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.unrecorded_after_failover, r.lost), (1, 0));
        // without the failover, the same order is lost
        let r = run(Mode::RedisFailover, &h, &[], &[], None, None);
        assert_eq!(r.lost, 1);
        assert!(!r.violations.is_empty());
        // with replica acknowledgement, the replica had the completion: a violation
        let r = run_full(
            Mode::RedisFailoverAck,
            &h,
            &[],
            &[],
            None,
            None,
            true,
            &[failover(None)],
        );
        assert!(!r.violations.is_empty());
    }
}
