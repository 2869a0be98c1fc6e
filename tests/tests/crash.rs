//! The crash suite's short profile, in all seven modes (Redis store, Redis failed over
//! without and with replica acknowledgement, PostgreSQL store, transactional PostgreSQL
//! and MariaDB, and a two-stage pipeline through the transactional outbox on
//! PostgreSQL): worker processes (and the outbox's relays) killed with `kill -9`, the
//! private Redis server restarted, a Redis master partitioned from its replica, killed
//! and replaced by it through Sentinel, database connections terminated, handlers
//! failing and panicking, duplicates resent, publishes whose ack is lost or that stall
//! past their lease; fails when the checker finds a broken invariant.
//! The driver is `tests/crash/main.rs`; RELIABILITY.md has the figures of the long profile.
#![cfg(feature = "crash")]

use std::process::Command;
use std::time::Instant;

#[test]
fn short_profile_keeps_every_invariant_in_every_mode() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_crash"))
        .args(["--profile", "short", "--mode", "all"])
        .output()
        .expect("run the crash driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the crash suite found broken invariants (or could not run) after {:.0} s:\n{stdout}\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all invariants hold"), "{stdout}");
}
