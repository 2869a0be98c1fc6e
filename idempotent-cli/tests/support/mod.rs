//! What the command tests share: running the built `idempotent` binary, seeding a
//! store through the library with a record in every state, and one walk through every
//! command that checks each command's output and its effect on the store.

#![allow(dead_code)]

use idempotent_runtime::outbox::{Outbox, OutboxStore, OutboxTransaction, Retry, RowStatus, Uuid};
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, RecordState, Release, ScanFilter,
};
use idempotent_runtime::{RecordKey, Store, Token};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Exit codes of the command.
pub const FOUND: i32 = 0;
pub const NOT_FOUND: i32 = 1;
pub const ERROR: i32 = 2;
pub const UNCHANGED: i32 = 3;

/// A name no other test run uses: `prefix` and 12 random hex digits.
pub fn unique(prefix: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let n = RandomState::new().hash_one(std::time::SystemTime::now()) & 0xffff_ffff_ffff;
    format!("{prefix}{n:012x}")
}

/// One run of the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The stdout lines parsed as JSON objects.
    pub fn json(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", self.stderr))
            })
            .collect()
    }

    /// Asserts the exit code, showing the output on failure.
    #[track_caller]
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `idempotent` with `args` (stdin closed, so confirmations need `--yes`).
pub fn run(args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_idempotent"))
        .args(args)
        .env_remove("IDEMPOTENT_STORE_URL")
        .env_remove("IDEMPOTENT_TABLE")
        .env_remove("IDEMPOTENT_PREFIX")
        .env_remove("IDEMPOTENT_MAX_ATTEMPTS")
        .stdin(Stdio::null())
        .output()
        .expect("the idempotent binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `list` on `url`, a store whose port nothing listens on, and checks that the
/// command fails as a store error naming the cause (the refused connection) rather
/// than a pool's timeout (which an SQL pool reports after retrying refused connections
/// for its whole acquire timeout). Returns the run for further checks.
#[track_caller]
pub fn refused_at_once(url: &str) -> Run {
    let r = run(&["--store", url, "list"]).expect(ERROR);
    assert!(
        r.stderr.starts_with("error: cannot reach "),
        "an unreachable store: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("Connection refused"),
        "the cause is named: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("timed out"),
        "no pool timeout: {}",
        r.stderr
    );
    r
}

/// The environment a test's store lives in: the global arguments that reach it.
pub struct Target {
    /// `--store URL` and `--table …` / `--prefix …`.
    pub global: Vec<String>,
    /// Whether the store is an SQL store.
    pub sql: bool,
}

impl Target {
    /// An SQL store at `url`, on its own `table`.
    pub fn sql_table(url: &str, table: &str) -> Target {
        Target {
            global: vec![
                "--store".into(),
                url.to_owned(),
                "--table".into(),
                table.to_owned(),
            ],
            sql: true,
        }
    }

    /// Runs the binary with the target's global arguments, then `args`.
    pub fn run(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = self.global.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        run(&all)
    }
}

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(300);
const TTL: Duration = Duration::from_secs(600);

fn key(scope: &str, k: &str) -> RecordKey {
    RecordKey::new(scope, k).unwrap()
}

fn req(key: &RecordKey, lease: Duration) -> ClaimRequest<'_> {
    ClaimRequest {
        key,
        lease,
        ttl: TTL,
        fingerprint: None,
        max_attempts: None,
    }
}

async fn acquire(store: &dyn Store, r: &ClaimRequest<'_>) -> Token {
    match store.claim(r).await.expect("claim") {
        ClaimOutcome::Acquired { token, .. } => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn complete(store: &dyn Store, key: &RecordKey, token: Token, out: &[u8], ttl: Duration) {
    let c = Completion {
        key,
        token,
        output: Some(out),
        ttl,
    };
    assert_eq!(store.complete(&c).await.unwrap(), Fence::Held);
}

async fn release(store: &dyn Store, key: &RecordKey, token: Token) {
    let r = Release { key, token };
    assert_eq!(store.release(&r).await.unwrap(), Fence::Held);
}

/// The records [`seed`] writes, by key; `busy` is the token of the live claim.
pub struct Seeded {
    pub scope: String,
    pub busy: Token,
}

/// Seeds `scope` through the library with: `done` (completed, output `"ok"`), `busy`
/// (in progress, live lease), `stuck` (in progress, lease run out), `failed` (released
/// after one attempt), `poison` (released after three attempts), `gone` (completed,
/// expired), the composite key `("eu", "17")` (completed) and a 200-byte key (hashed,
/// completed). Returns once the short lease and the short ttl have passed.
pub async fn seed(store: &dyn Store, scope: &str) -> Seeded {
    let done = key(scope, "done");
    let t = acquire(store, &req(&done, LONG)).await;
    complete(store, &done, t, b"\"ok\"", TTL).await;
    let busy = key(scope, "busy");
    let busy_token = acquire(store, &req(&busy, LONG)).await;
    let stuck = key(scope, "stuck");
    acquire(store, &req(&stuck, SHORT)).await;
    let failed = key(scope, "failed");
    let t = acquire(store, &req(&failed, LONG)).await;
    release(store, &failed, t).await;
    let poison = key(scope, "poison");
    for _ in 0..3 {
        let t = acquire(store, &req(&poison, LONG)).await;
        release(store, &poison, t).await;
    }
    let gone = key(scope, "gone");
    let t = acquire(store, &req(&gone, LONG)).await;
    complete(store, &gone, t, b"1", Duration::from_millis(200)).await;
    let composite = RecordKey::new(scope, &("eu", "17")).unwrap();
    let t = acquire(store, &req(&composite, LONG)).await;
    complete(store, &composite, t, b"2", TTL).await;
    let long = key(scope, &"x".repeat(200));
    assert!(long.is_hashed());
    let t = acquire(store, &req(&long, LONG)).await;
    complete(store, &long, t, b"3", TTL).await;
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    Seeded {
        scope: scope.to_owned(),
        busy: busy_token,
    }
}

fn by_key(lines: Vec<Value>) -> BTreeMap<String, Value> {
    lines
        .into_iter()
        .map(|v| (v["key"].as_str().unwrap().to_owned(), v))
        .collect()
}

/// Runs `--format json` then `args` against `target`, expecting records; their keys.
fn json_keys(target: &Target, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    by_key(target.run(&all).expect(FOUND).json())
        .into_keys()
        .collect()
}

/// Runs every command against `target` (whose store `store` was seeded with
/// [`seed`]) and checks their output and effects.
pub async fn check_every_command(target: &Target, store: &dyn Store, seeded: &Seeded) {
    let s = seeded.scope.as_str();
    let hashed = format!("sha256:{}", {
        let k = key(s, &"x".repeat(200));
        k.key()[2..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });

    // key: the runtime's encoding, no store needed
    let r = run(&["key", s, "done"]).expect(FOUND);
    assert!(r.stdout.contains("key hex  646f6e65"), "{}", r.stdout);
    let r = run(&["--format", "json", "key", s, "eu", "17"]).expect(FOUND);
    let v = &r.json()[0];
    assert_eq!(v["key"], "(\"eu\", \"17\")");
    assert_eq!(
        v["key_hex"],
        RecordKey::new(s, &("eu", "17"))
            .unwrap()
            .key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );

    // inspect
    let r = target.run(&["inspect", s, "done"]).expect(FOUND);
    assert!(r.stdout.contains("state       completed"), "{}", r.stdout);
    assert!(
        r.stdout.contains("output      \"ok\" (4 B)"),
        "{}",
        r.stdout
    );
    let r = target
        .run(&["--format", "json", "inspect", s, "poison"])
        .expect(FOUND);
    let v = &r.json()[0];
    assert_eq!(
        (v["state"].as_str(), v["attempts"].as_u64()),
        (Some("released"), Some(3))
    );
    target.run(&["inspect", s, "missing"]).expect(NOT_FOUND);
    target.run(&["inspect", s, "gone"]).expect(NOT_FOUND);
    target
        .run(&["inspect", s, "--hex", "6661696c6564"])
        .expect(FOUND);
    target.run(&["inspect", s, "eu", "17"]).expect(FOUND);

    // list: every live record once, expired ones left out
    let all = by_key(
        target
            .run(&["--format", "json", "list", "--scope", s])
            .expect(FOUND)
            .json(),
    );
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "(\"eu\", \"17\")",
            "busy",
            "done",
            "failed",
            "poison",
            hashed.as_str(),
            "stuck"
        ]
    );
    assert_eq!(all["stuck"]["stuck"], true);
    assert_eq!(all["busy"]["stuck"], false);
    assert!(all["busy"]["lease_remaining_ms"].as_u64().unwrap() > 1000);
    assert_eq!(all["done"]["output_bytes"], 4);
    assert_eq!(all["done"]["scope"], s);
    assert_eq!(all[&hashed]["hashed"], true);
    assert_eq!(all["poison"]["attempts"], 3);
    assert!(all["done"]["expires_in_ms"].as_u64().unwrap() > 500_000);

    // the table form: a header, aligned columns, human durations
    let r = target.run(&["list", "--scope", s]).expect(FOUND);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{}", r.stdout);
    assert!(lines[0].starts_with("SCOPE"));
    let col = lines[0].find("STATE").unwrap();
    for l in &lines[1..] {
        let state = &l[col..];
        assert!(
            ["in-progress", "completed", "released"]
                .iter()
                .any(|p| state.starts_with(p)),
            "misaligned: {l}"
        );
    }
    assert!(r.stdout.contains("in-progress (lease expired)"));
    // the ttl of ten minutes, in human units
    assert!(
        r.stdout.contains("10m 00s") || r.stdout.contains("  9m "),
        "{}",
        r.stdout
    );

    // filters
    let completed = json_keys(target, &["list", "--scope", s, "--state", "completed"]);
    assert_eq!(completed, ["(\"eu\", \"17\")", "done", hashed.as_str()]);
    let tried = json_keys(target, &["list", "--scope", s, "--min-attempts", "2"]);
    assert_eq!(tried, ["poison"]);
    let lapsed = json_keys(target, &["list", "--scope", s, "--lease-expired"]);
    assert_eq!(lapsed, ["stuck"]);
    let limited = target
        .run(&["--format", "json", "list", "--scope", s, "--limit", "2"])
        .expect(FOUND);
    assert_eq!(limited.json().len(), 2);
    target
        .run(&["list", "--scope", s, "--older-than", "1h"])
        .expect(NOT_FOUND);
    target
        .run(&["list", "--scope", s, "--older-than", "soon"])
        .expect(ERROR);

    // stuck and poisoned
    let stuck = json_keys(target, &["stuck", "--scope", s]);
    assert_eq!(stuck, ["stuck"]);
    let poisoned = json_keys(target, &["poisoned", "--scope", s, "--max-attempts", "3"]);
    assert_eq!(poisoned, ["poison"]);
    let any_failure = json_keys(target, &["poisoned", "--scope", s, "--max-attempts", "1"]);
    assert_eq!(any_failure, ["failed", "poison", "stuck"]);
    target
        .run(&["poisoned", "--scope", s, "--max-attempts", "4"])
        .expect(NOT_FOUND);

    // stats
    let stats = target
        .run(&[
            "--format",
            "json",
            "stats",
            "--scope",
            s,
            "--max-attempts",
            "3",
        ])
        .expect(FOUND)
        .json();
    let rows: Vec<(String, u64, u64, u64)> = stats
        .iter()
        .map(|v| {
            (
                v["state"].as_str().unwrap().to_owned(),
                v["count"].as_u64().unwrap(),
                v["past_lease"].as_u64().unwrap(),
                v["poisoned"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("in-progress".to_owned(), 2, 1, 0),
            ("released".to_owned(), 2, 0, 1),
            ("completed".to_owned(), 3, 0, 0),
        ]
    );
    assert!(
        stats
            .iter()
            .all(|v| v["oldest_claim_ms"].as_u64().unwrap() < 60_000)
    );
    let r = target.run(&["stats", "--scope", s]).expect(FOUND);
    assert!(r.stdout.starts_with("SCOPE"), "{}", r.stdout);
    assert_eq!(r.stdout.lines().count(), 4);

    // release: dry run, refusal without --yes, then for real; the old holder is fenced
    let busy = key(s, "busy");
    let r = target
        .run(&["release", s, "busy", "--dry-run"])
        .expect(FOUND);
    assert!(r.stdout.contains("would release"), "{}", r.stdout);
    let still = store
        .as_admin()
        .unwrap()
        .inspect(&busy)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (still.state, still.token),
        (RecordState::InProgress, seeded.busy)
    );
    let r = target.run(&["release", s, "busy"]).expect(ERROR);
    assert!(r.stderr.contains("--yes"), "{}", r.stderr);
    target.run(&["release", s, "busy", "--yes"]).expect(FOUND);
    let after = store
        .as_admin()
        .unwrap()
        .inspect(&busy)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state, RecordState::Released);
    assert!(after.token > seeded.busy);
    let late = Completion {
        key: &busy,
        token: seeded.busy,
        output: None,
        ttl: TTL,
    };
    assert_eq!(store.complete(&late).await.unwrap(), Fence::Lost);
    target
        .run(&["release", s, "done", "--yes"])
        .expect(UNCHANGED);
    target
        .run(&["release", s, "missing", "--yes"])
        .expect(NOT_FOUND);

    // reset-attempts: the poisoned message runs again as attempt 1
    let poison = key(s, "poison");
    let limited = ClaimRequest {
        max_attempts: Some(3),
        ..req(&poison, LONG)
    };
    assert_eq!(
        store.claim(&limited).await.unwrap(),
        ClaimOutcome::Exhausted { attempts: 3 }
    );
    target
        .run(&["reset-attempts", s, "poison", "--dry-run"])
        .expect(FOUND);
    assert_eq!(
        store
            .as_admin()
            .unwrap()
            .inspect(&poison)
            .await
            .unwrap()
            .unwrap()
            .attempts,
        3
    );
    let r = target
        .run(&["--format", "json", "reset-attempts", s, "poison", "--yes"])
        .expect(FOUND);
    assert_eq!(r.json()[0]["done"], "attempts_reset");
    assert!(matches!(
        store.claim(&limited).await.unwrap(),
        ClaimOutcome::Acquired { attempt: 1, .. }
    ));
    target
        .run(&["reset-attempts", s, "done", "--yes"])
        .expect(UNCHANGED);
    target
        .run(&["reset-attempts", s, "stuck", "--yes"])
        .expect(FOUND);
    assert_eq!(
        store
            .as_admin()
            .unwrap()
            .inspect(&key(s, "stuck"))
            .await
            .unwrap()
            .unwrap()
            .attempts,
        0
    );

    // forget
    target
        .run(&["forget", s, "done", "--dry-run"])
        .expect(FOUND);
    assert!(
        store
            .as_admin()
            .unwrap()
            .inspect(&key(s, "done"))
            .await
            .unwrap()
            .is_some()
    );
    target.run(&["forget", s, "done", "--yes"]).expect(FOUND);
    assert!(
        store
            .as_admin()
            .unwrap()
            .inspect(&key(s, "done"))
            .await
            .unwrap()
            .is_none()
    );
    target
        .run(&["forget", s, "done", "--yes"])
        .expect(NOT_FOUND);

    // purge
    let r = target.run(&["purge", "--expired", "--yes"]).expect(FOUND);
    if target.sql {
        let n: u64 = r
            .stdout
            .trim()
            .strip_prefix("purged ")
            .and_then(|t| t.strip_suffix(" expired records"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{}", r.stdout));
        assert_eq!(
            n, 1,
            "the expired record `gone` (the table is this test's own)"
        );
        target
            .run(&["purge", "--expired", "--dry-run"])
            .expect(FOUND);
    } else {
        assert!(r.stdout.contains("nothing to purge"));
    }
    target.run(&["purge"]).expect(ERROR);
}

/// Deletes every record of `scope` through the library.
pub async fn clean(store: &dyn Store, scope: &str) {
    let filter = ScanFilter::new().scope(scope);
    let mut cursor = None;
    loop {
        let page = store
            .as_admin()
            .unwrap()
            .scan(&filter, cursor.as_ref(), 1000)
            .await
            .unwrap();
        for i in &page.items {
            store.as_admin().unwrap().forget(&i.key).await.unwrap();
        }
        match page.next {
            Some(c) => cursor = Some(c),
            None => return,
        }
    }
}

/// Writes the messages of `outbox` in a committed transaction of `pool`, as a
/// transactional handler does.
pub async fn enqueue<DB: idempotent_runtime::sqlx::Database>(
    pool: &idempotent_runtime::sqlx::Pool<DB>,
    table: &str,
    outbox: &Outbox,
) where
    for<'c> idempotent_runtime::sqlx::Transaction<'c, DB>: OutboxTransaction,
{
    let mut tx = pool.begin().await.expect("beginning a transaction");
    tx.enqueue_in_tx(table, outbox)
        .await
        .expect("writing the outbox rows");
    tx.commit().await.expect("committing");
}

/// The ids of `lines` (JSON rows of `outbox list`), in order.
fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The status of the row `id`, read through the library: pending, sent, dead, or
/// `None` when it is gone.
async fn status_of(store: &dyn OutboxStore, id: Uuid) -> Option<RowStatus> {
    for status in [RowStatus::Pending, RowStatus::Sent, RowStatus::Dead] {
        let mut after = None;
        loop {
            let page = store.list(status, after, 1000).await.unwrap();
            if page.rows.iter().any(|r| r.message.id() == id) {
                return Some(status);
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    None
}

/// The outbox commands against `target`, whose `--outbox-table` is `table`, a table of
/// the test's own that does not exist yet on `pool`: a missing table is an error
/// naming the command that creates it (and the read does not create it), `outbox
/// migrate` creates it; rows written through `enqueue_in_tx` and moved through every
/// status with the library's `OutboxStore` (`open` opens it on the table); then each
/// command's output, exit code and effect.
pub async fn check_outbox_commands<DB, O>(
    target: &Target,
    table: &str,
    pool: &idempotent_runtime::sqlx::Pool<DB>,
    open: impl Fn() -> O,
) where
    DB: idempotent_runtime::sqlx::Database,
    for<'c> idempotent_runtime::sqlx::Transaction<'c, DB>: OutboxTransaction,
    O: OutboxStore + 'static,
{
    let t = |args: &[&str]| {
        let mut all = vec!["outbox", "--outbox-table", table];
        all.extend_from_slice(args);
        target.run(&all)
    };
    let tj = |args: &[&str]| {
        let mut all = vec!["--format", "json", "outbox", "--outbox-table", table];
        all.extend_from_slice(args);
        target.run(&all)
    };

    // a missing table: an error naming what creates it, and a read creates nothing
    for cmd in [&["stats"][..], &["list", "--pending"][..]] {
        let r = t(cmd).expect(ERROR);
        assert!(
            r.stderr
                .contains(&format!("the outbox table `{table}` does not exist"))
                && r.stderr.contains("idempotent outbox migrate")
                && r.stderr.contains("::outbox(\""),
            "{}",
            r.stderr
        );
    }
    t(&["stats"]).expect(ERROR);
    let r = t(&["schema", "--print"]).expect(FOUND);
    assert!(
        r.stdout.contains("CREATE TABLE IF NOT EXISTS"),
        "{}",
        r.stdout
    );
    t(&["stats"]).expect(ERROR);
    let r = t(&["migrate"]).expect(FOUND);
    assert!(r.stdout.contains("is ready"), "{}", r.stdout);
    let r = t(&["stats"]).expect(NOT_FOUND);
    assert!(
        r.stderr.contains("no rows in the outbox table"),
        "{}",
        r.stderr
    );
    assert_eq!(tj(&["stats"]).expect(NOT_FOUND).stdout, "");
    t(&["list", "--dead"]).expect(NOT_FOUND);

    // rows in every status, through the library
    let store = open();
    let scope = unique("orders-");
    let mut first = Outbox::new();
    first.bind(&RecordKey::new(&scope, "o-1").unwrap());
    let sent = first.emit("payments.charge", b"p1".to_vec()).id();
    let dead = first
        .emit("payments.charge", b"p2".to_vec())
        .ordering_key("customer-4")
        .id();
    let backoff = first.emit("mail.receipt", b"p3".to_vec()).id();
    let claimed = first.emit("audit", b"p4".to_vec()).id();
    enqueue(pool, table, &first).await;
    let rows = store
        .claim_due("relay-a", 10, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    let lease = |id: Uuid| rows.iter().find(|r| r.message.id() == id).unwrap().lease;
    assert_eq!(
        store.mark_sent(&[lease(sent)]).await.unwrap(),
        [Fence::Held]
    );
    assert_eq!(
        store
            .mark_failed(&lease(dead), "broker said no\nfor good", Retry::Dead)
            .await
            .unwrap(),
        Fence::Held
    );
    assert_eq!(
        store
            .mark_failed(
                &lease(backoff),
                "timed out",
                Retry::After(Duration::from_secs(3600))
            )
            .await
            .unwrap(),
        Fence::Held
    );
    let mut second = Outbox::new();
    second.bind(&RecordKey::new(&scope, &("eu", "17")).unwrap());
    let fresh = second.emit("payments.charge", b"p5".to_vec()).id();
    enqueue(pool, table, &second).await;

    // stats: per destination, sorted
    let stats = tj(&["stats"]).expect(FOUND).json();
    let counts: Vec<(&str, u64, u64, u64)> = stats
        .iter()
        .map(|v| {
            (
                v["destination"].as_str().unwrap(),
                v["pending"].as_u64().unwrap(),
                v["dead"].as_u64().unwrap(),
                v["sent"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("audit", 1, 0, 0),
            ("mail.receipt", 1, 0, 0),
            ("payments.charge", 1, 1, 1)
        ]
    );
    for v in &stats {
        let oldest = v["oldest_pending_ms"].as_u64().unwrap();
        assert!(oldest < 60_000, "{v}");
    }
    let r = t(&["stats"]).expect(FOUND);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    assert!(
        lines[0].starts_with("DESTINATION  ") && lines[0].contains("OLDEST PENDING"),
        "{}",
        r.stdout
    );
    assert!(lines[3].starts_with("payments.charge  1"), "{}", r.stdout);

    // list: each status in emission order, every column
    let pending = tj(&["list", "--pending"]).expect(FOUND).json();
    assert_eq!(
        ids(&pending),
        [backoff, claimed, fresh].map(|i| i.to_string())
    );
    let (b, c, f) = (&pending[0], &pending[1], &pending[2]);
    assert_eq!(
        (b["status"].as_str(), b["attempts"].as_u64()),
        (Some("pending"), Some(1))
    );
    assert_eq!(b["last_error"], "timed out");
    assert!(b["due_in_ms"].as_u64().unwrap() > 3_500_000, "{b}");
    assert_eq!(b["leased_by"], Value::Null);
    assert_eq!(c["leased_by"], "relay-a");
    assert_eq!(f["due_in_ms"], 0);
    assert_eq!(
        (f["origin_scope"].as_str(), f["origin_key"].as_str()),
        (Some(scope.as_str()), Some("(\"eu\", \"17\")"))
    );
    assert_eq!(b["origin_key"], "o-1");
    assert_eq!(b["origin_key_hex"], "6f2d31");
    assert_eq!(f["destination"], "payments.charge");
    assert_eq!(f["payload_bytes"], 2);
    assert!(
        pending
            .iter()
            .all(|v| v["age_ms"].as_u64().unwrap() < 60_000)
    );
    let dead_rows = tj(&["list", "--dead"]).expect(FOUND).json();
    assert_eq!(ids(&dead_rows), [dead.to_string()]);
    assert_eq!(dead_rows[0]["last_error"], "broker said no\nfor good");
    assert_eq!(dead_rows[0]["ordering_key"], "customer-4");
    assert_eq!(dead_rows[0]["due_in_ms"], Value::Null);
    let sent_rows = tj(&["list", "--sent"]).expect(FOUND).json();
    assert_eq!(ids(&sent_rows), [sent.to_string()]);
    assert_eq!(sent_rows[0]["attempts"], 0);
    let two = tj(&["list", "--pending", "--limit", "2"])
        .expect(FOUND)
        .json();
    assert_eq!(ids(&two), [backoff, claimed].map(|i| i.to_string()));
    t(&["list"]).expect(ERROR);
    t(&["list", "--pending", "--dead"]).expect(ERROR);

    // the table form: a header, aligned columns, human durations, errors on one line
    let r = t(&["list", "--pending"]).expect(FOUND);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    assert!(lines[0].starts_with("ID  "), "{}", r.stdout);
    let col = lines[0].find("STATUS").unwrap();
    for l in &lines[1..] {
        assert!(l[col..].starts_with("pending"), "misaligned: {l}");
    }
    assert!(
        lines[1].contains("59m ") || lines[1].contains("1h 00m"),
        "{}",
        r.stdout
    );
    assert!(lines[1].contains("timed out"), "{}", r.stdout);
    assert!(
        lines[2].contains("pending (claimed by relay-a)"),
        "{}",
        r.stdout
    );
    assert!(lines[3].contains(" now "), "{}", r.stdout);
    assert!(lines[3].contains("(\"eu\", \"17\")"), "{}", r.stdout);
    let r = t(&["list", "--dead"]).expect(FOUND);
    assert_eq!(r.stdout.lines().count(), 2, "{}", r.stdout);
    assert!(
        r.stdout.contains("broker said no\\nfor good"),
        "{}",
        r.stdout
    );

    // retry: only a dead row; dry run, refusal without --yes, then for real
    for not_dead in [fresh, sent] {
        let r = t(&["retry", &not_dead.to_string(), "--yes"]).expect(UNCHANGED);
        assert!(
            r.stderr.contains("only a dead row can be retried"),
            "{}",
            r.stderr
        );
    }
    let r = t(&["retry", "6f1c2a4e-0d3b-5c7e-9a41-2b8f0e6d1c55", "--yes"]).expect(NOT_FOUND);
    assert!(r.stderr.contains("no row"), "{}", r.stderr);
    let r = t(&["retry", "not-an-id", "--yes"]).expect(ERROR);
    assert!(r.stderr.contains("is not a message id"), "{}", r.stderr);
    let d = dead.to_string();
    let r = t(&["retry", &d, "--dry-run"]).expect(FOUND);
    assert!(r.stdout.contains("would put the dead row"), "{}", r.stdout);
    assert!(r.stdout.contains("broker said no"), "{}", r.stdout);
    assert_eq!(status_of(&store, dead).await, Some(RowStatus::Dead));
    let r = t(&["retry", &d]).expect(ERROR);
    assert!(r.stderr.contains("--yes"), "{}", r.stderr);
    assert_eq!(status_of(&store, dead).await, Some(RowStatus::Dead));
    let r = tj(&["retry", &d, "--yes"]).expect(FOUND);
    assert_eq!(r.json()[0]["done"], "retried");
    assert_eq!(r.json()[0]["id"], d);
    let again = store
        .claim_ids("relay-b", &[dead], Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "a retried row is claimable at once");
    assert_eq!(again[0].attempts, 0);
    t(&["retry", &d, "--yes"]).expect(UNCHANGED);
    t(&["list", "--dead"]).expect(NOT_FOUND);

    // purge: sent rows older than the duration; the dry run counts them
    assert_eq!(
        store
            .mark_sent(&[again[0].lease, lease(claimed)])
            .await
            .unwrap(),
        [Fence::Held, Fence::Held]
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let would = |age: &str| {
        tj(&["purge", "--sent", "--older-than", age, "--dry-run"])
            .expect(FOUND)
            .json()[0]["would_purge"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(would("1h"), 0);
    assert_eq!(would("10ms"), 3);
    let r = t(&["purge", "--sent", "--older-than", "10ms", "--dry-run"]).expect(FOUND);
    assert!(
        r.stdout.starts_with("would delete 3 sent rows") && r.stdout.contains("dry run"),
        "{}",
        r.stdout
    );
    let r = t(&["purge", "--sent", "--older-than", "10ms"]).expect(ERROR);
    assert!(r.stderr.contains("--yes"), "{}", r.stderr);
    assert_eq!(would("10ms"), 3);
    t(&["purge", "--older-than", "10ms", "--yes"]).expect(ERROR);
    t(&["purge", "--sent", "--yes"]).expect(ERROR);
    t(&["purge", "--sent", "--older-than", "soon", "--yes"]).expect(ERROR);
    let r = t(&["purge", "--sent", "--older-than", "1h", "--yes"]).expect(FOUND);
    assert!(r.stdout.starts_with("purged 0 sent rows"), "{}", r.stdout);
    let r = tj(&["purge", "--sent", "--older-than", "10ms", "--yes"]).expect(FOUND);
    assert_eq!(r.json()[0]["purged"], 3);
    t(&["list", "--sent"]).expect(NOT_FOUND);
    for id in [sent, dead, claimed] {
        assert_eq!(status_of(&store, id).await, None);
    }
    assert_eq!(status_of(&store, fresh).await, Some(RowStatus::Pending));
    let sent_left: u64 = tj(&["stats"])
        .expect(FOUND)
        .json()
        .iter()
        .map(|v| v["sent"].as_u64().unwrap())
        .sum();
    assert_eq!(sent_left, 0);

    // a bad table name
    let r = target
        .run(&["outbox", "--outbox-table", "no such", "stats"])
        .expect(ERROR);
    assert!(r.stderr.contains("--outbox-table"), "{}", r.stderr);
}

/// `outbox` against stores that have no outbox: refused with the error exit code,
/// before any connection (nothing needs to listen at the URL).
pub fn outbox_needs_an_sql_store() {
    for url in [
        "redis://127.0.0.1:1",
        "redis+cluster://127.0.0.1:1",
        "memory://",
    ] {
        let r = run(&["--store", url, "outbox", "stats"]).expect(ERROR);
        assert!(
            r.stderr.contains("the outbox lives in an SQL store"),
            "{url}: {}",
            r.stderr
        );
    }
    let r = run(&["outbox", "stats"]).expect(ERROR);
    assert!(r.stderr.contains("no store given"), "{}", r.stderr);
}
