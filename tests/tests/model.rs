//! Model-based test: seeded random sequences of claim / complete / release / renew /
//! expire / forget / inspect run on a reference model of the protocol and on each real
//! store (memory with a manual clock; Redis, PostgreSQL, MariaDB / MySQL and SQLite on
//! the real clock, a lease expiring by waiting it out). Every answer and every record
//! state must be the model's; tokens must grow.
//!
//! `IDEMPOTENT_MODEL_SEED` replays a run; `IDEMPOTENT_MODEL_CASES` scales the number of
//! sequences (default 1). Each test prints its seed and how many operations it checked.
#![cfg(all(
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "sqlite"
))]

use idempotent_runtime::memory::ManualClock;
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release,
};
use idempotent_runtime::testing::conformance::unique_scope;
use idempotent_runtime::{
    MemoryStore, MySqlStore, PostgresStore, RecordKey, SqliteStore, Store, Token,
};
use idempotent_tests::rng::{Rng, scaled};
use idempotent_tests::sql_support::{env_url, unique_name};
use std::time::Duration;

const TTL: Duration = Duration::from_secs(600);
const KEYS: usize = 2;

fn cases(n: usize) -> usize {
    scaled(n, "IDEMPOTENT_MODEL_CASES")
}

/// One key in the model.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Absent,
    /// `owner` indexes the claims handed out; `live` whether its lease still holds.
    InProgress {
        owner: usize,
        attempts: u32,
        live: bool,
    },
    Released {
        owner: usize,
        attempts: u32,
    },
    Completed {
        owner: usize,
        attempts: u32,
        output: Option<Vec<u8>>,
    },
}

#[derive(Debug)]
enum Op {
    Claim {
        key: usize,
    },
    /// `claim` indexes the claims handed out so far; `None` is a token never issued.
    Complete {
        key: usize,
        claim: Option<usize>,
        output: Option<Vec<u8>>,
    },
    Release {
        key: usize,
        claim: Option<usize>,
    },
    Renew {
        key: usize,
        claim: Option<usize>,
    },
    /// Every lease runs out.
    Expire,
    Forget {
        key: usize,
    },
    Inspect {
        key: usize,
    },
}

/// A record as the model sees it: its state, attempts, which claim owns it, whether its
/// lease holds, and its output.
#[derive(Debug, PartialEq)]
struct Seen(RecordState, u32, usize, bool, Option<Vec<u8>>);

/// What a claim answers, in the model's terms.
#[derive(Debug, PartialEq)]
enum Answer {
    Acquired { attempt: u32 },
    Completed(Option<Vec<u8>>),
    InProgress,
    Exhausted(u32),
    Fence(Fence),
    Forgot(bool),
    Record(Option<Seen>),
    Expired,
}

struct Model {
    keys: Vec<State>,
    /// Which key each claim handed out was for.
    claims: Vec<usize>,
    max_attempts: Option<u32>,
}

impl Model {
    /// Whether `claim`'s token owns `key`. Tokens are compared by value: a store's clock
    /// may hand two keys the same token (SQLite reads it in milliseconds), and then a
    /// token presented for the other key is that key's token all the same.
    fn owns(&self, key: usize, claim: Option<usize>, tokens: &[Token]) -> bool {
        matches!((&self.keys[key], claim), (State::InProgress { owner, .. }, Some(c)) if tokens[*owner] == tokens[c])
    }

    fn apply(&mut self, op: &Op, tokens: &[Token]) -> Answer {
        match op {
            Op::Claim { key } => {
                let next = self.claims.len();
                let (attempt, answer) = match &self.keys[*key] {
                    State::Absent => (1, None),
                    State::Completed { output, .. } => {
                        return Answer::Completed(output.clone());
                    }
                    State::InProgress { live: true, .. } => return Answer::InProgress,
                    State::InProgress { attempts, .. } | State::Released { attempts, .. } => {
                        if self.max_attempts.is_some_and(|m| *attempts >= m) {
                            (0, Some(Answer::Exhausted(*attempts)))
                        } else {
                            (attempts + 1, None)
                        }
                    }
                };
                if let Some(a) = answer {
                    return a;
                }
                self.claims.push(*key);
                self.keys[*key] = State::InProgress {
                    owner: next,
                    attempts: attempt,
                    live: true,
                };
                Answer::Acquired { attempt }
            }
            Op::Complete { key, claim, output } => {
                // a completion repeated by the claim that completed the key (its first
                // reply was lost) is held and changes nothing
                if let (State::Completed { owner, .. }, Some(c)) = (&self.keys[*key], claim)
                    && tokens[*owner] == tokens[*c]
                {
                    return Answer::Fence(Fence::Held);
                }
                if !self.owns(*key, *claim, tokens) {
                    return Answer::Fence(Fence::Lost);
                }
                let State::InProgress {
                    owner, attempts, ..
                } = self.keys[*key]
                else {
                    unreachable!()
                };
                self.keys[*key] = State::Completed {
                    owner,
                    attempts,
                    output: output.clone(),
                };
                Answer::Fence(Fence::Held)
            }
            Op::Release { key, claim } => {
                // so is a release repeated by the claim that released the key
                if let (State::Released { owner, .. }, Some(c)) = (&self.keys[*key], claim)
                    && tokens[*owner] == tokens[*c]
                {
                    return Answer::Fence(Fence::Held);
                }
                if !self.owns(*key, *claim, tokens) {
                    return Answer::Fence(Fence::Lost);
                }
                let State::InProgress {
                    owner, attempts, ..
                } = self.keys[*key]
                else {
                    unreachable!()
                };
                self.keys[*key] = State::Released { owner, attempts };
                Answer::Fence(Fence::Held)
            }
            Op::Renew { key, claim } => {
                if !self.owns(*key, *claim, tokens) {
                    return Answer::Fence(Fence::Lost);
                }
                if let State::InProgress { live, .. } = &mut self.keys[*key] {
                    *live = true;
                }
                Answer::Fence(Fence::Held)
            }
            Op::Expire => {
                for k in &mut self.keys {
                    if let State::InProgress { live, .. } = k {
                        *live = false;
                    }
                }
                Answer::Expired
            }
            Op::Forget { key } => {
                let existed = self.keys[*key] != State::Absent;
                self.keys[*key] = State::Absent;
                Answer::Forgot(existed)
            }
            Op::Inspect { key } => Answer::Record(match &self.keys[*key] {
                State::Absent => None,
                State::InProgress {
                    owner,
                    attempts,
                    live,
                } => Some(Seen(
                    RecordState::InProgress,
                    *attempts,
                    *owner,
                    *live,
                    None,
                )),
                State::Released { owner, attempts } => {
                    Some(Seen(RecordState::Released, *attempts, *owner, false, None))
                }
                State::Completed {
                    owner,
                    attempts,
                    output,
                } => Some(Seen(
                    RecordState::Completed,
                    *attempts,
                    *owner,
                    false,
                    output.clone(),
                )),
            }),
        }
    }
}

fn random_op(rng: &mut Rng, claims: usize) -> Op {
    let key = rng.below(KEYS as u64) as usize;
    // mostly the latest claims, sometimes an older one or a token never issued
    let claim = |rng: &mut Rng| match rng.below(10) {
        0 => None,
        _ if claims == 0 => None,
        1 | 2 => Some(rng.below(claims as u64) as usize),
        _ => Some(claims - 1 - (rng.below(2) as usize).min(claims - 1)),
    };
    match rng.below(20) {
        0..=5 => Op::Claim { key },
        6..=8 => {
            let claim = claim(rng);
            let output = match rng.below(3) {
                0 => None,
                n => Some(format!("out-{n}-{}", rng.below(1000)).into_bytes()),
            };
            Op::Complete { key, claim, output }
        }
        9..=11 => Op::Release {
            key,
            claim: claim(rng),
        },
        12..=13 => Op::Renew {
            key,
            claim: claim(rng),
        },
        14 => Op::Expire,
        15 => Op::Forget { key },
        _ => Op::Inspect { key },
    }
}

/// How a store's leases run out: a manual clock moved, or the real one waited out.
enum Time {
    Manual(ManualClock),
    Real,
}

/// Runs `sequences` random sequences of `len` operations on `store` and the model.
async fn run(
    name: &str,
    store: &dyn Store,
    time: Time,
    lease: Duration,
    sequences: usize,
    len: usize,
) {
    let mut rng = Rng::seeded(name, "IDEMPOTENT_MODEL_SEED");
    let mut ops_checked = 0;
    for seq in 0..sequences {
        let scope = unique_scope("model");
        let keys: Vec<RecordKey> = (0..KEYS)
            .map(|i| RecordKey::new(&scope, format!("k{i}").as_str()).unwrap())
            .collect();
        let mut model = Model {
            keys: vec![State::Absent; KEYS],
            claims: Vec::new(),
            max_attempts: if rng.below(2) == 0 { Some(3) } else { None },
        };
        let mut tokens: Vec<Token> = Vec::new();
        let mut last_token: Vec<Option<Token>> = vec![None; KEYS];
        let mut history = Vec::new();
        for _ in 0..len {
            let op = random_op(&mut rng, tokens.len());
            let expected = model.apply(&op, &tokens);
            let token_of = |c: Option<usize>| c.map_or(Token::new(1), |c| tokens[c]);
            let got = match &op {
                Op::Claim { key } => {
                    let r = ClaimRequest {
                        key: &keys[*key],
                        lease,
                        ttl: TTL,
                        fingerprint: None,
                        max_attempts: model.max_attempts,
                    };
                    match store.claim(&r).await.expect("claim") {
                        ClaimOutcome::Acquired { token, attempt } => {
                            if let Some(prev) = last_token[*key] {
                                assert!(
                                    token > prev,
                                    "{name}: tokens must grow: {prev} then {token}"
                                );
                            }
                            last_token[*key] = Some(token);
                            tokens.push(token);
                            Answer::Acquired { attempt }
                        }
                        ClaimOutcome::Completed { output } => Answer::Completed(output),
                        ClaimOutcome::InProgress { .. } => Answer::InProgress,
                        ClaimOutcome::Exhausted { attempts } => Answer::Exhausted(attempts),
                        other => panic!("{name}: unexpected {other:?}"),
                    }
                }
                Op::Complete { key, claim, output } => Answer::Fence(
                    store
                        .complete(&Completion {
                            key: &keys[*key],
                            token: token_of(*claim),
                            output: output.as_deref(),
                            ttl: TTL,
                        })
                        .await
                        .expect("complete"),
                ),
                Op::Release { key, claim } => Answer::Fence(
                    store
                        .release(&Release {
                            key: &keys[*key],
                            token: token_of(*claim),
                        })
                        .await
                        .expect("release"),
                ),
                Op::Renew { key, claim } => Answer::Fence(
                    store
                        .renew(&keys[*key], token_of(*claim), lease)
                        .await
                        .expect("renew"),
                ),
                Op::Expire => {
                    match &time {
                        Time::Manual(c) => c.advance(lease + Duration::from_millis(1)),
                        Time::Real => tokio::time::sleep(lease + Duration::from_millis(300)).await,
                    }
                    Answer::Expired
                }
                Op::Forget { key } => Answer::Forgot(
                    store
                        .as_admin()
                        .unwrap()
                        .forget(&keys[*key])
                        .await
                        .expect("forget"),
                ),
                Op::Inspect { key } => {
                    let rec: Option<Record> = store
                        .as_admin()
                        .unwrap()
                        .inspect(&keys[*key])
                        .await
                        .expect("inspect");
                    Answer::Record(rec.map(|r| {
                        let owner = (0..tokens.len())
                            .rfind(|&i| model.claims[i] == *key && tokens[i] == r.token)
                            .unwrap_or_else(|| {
                                panic!("{name}: record with a token never issued: {r:?}")
                            });
                        Seen(
                            r.state,
                            r.attempts,
                            owner,
                            r.lease_remaining.is_some(),
                            r.output,
                        )
                    }))
                }
            };
            history.push(format!("{op:?} -> {got:?}"));
            assert_eq!(
                got,
                expected,
                "{name}: sequence {seq} diverged from the model at {op:?}; history:\n{}",
                history.join("\n")
            );
            ops_checked += 1;
        }
        for k in &keys {
            store.as_admin().unwrap().forget(k).await.expect("forget");
        }
    }
    println!("{name}: {sequences} sequences, {ops_checked} operations agree with the model");
}

#[tokio::test]
async fn memory_store_follows_the_model() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    run(
        "memory",
        &store,
        Time::Manual(clock),
        Duration::from_secs(5),
        cases(2000),
        30,
    )
    .await;
}

/// Real stores wait leases out: a lease long enough that the operations between two
/// waits never outlast it on a loaded machine, few sequences.
const REAL_LEASE: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_follows_the_model() {
    let store = idempotent_tests::redis_support::connect().await;
    run("redis", &store, Time::Real, REAL_LEASE, cases(12), 25).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_follows_the_model() {
    let url = env_url(
        "IDEMPOTENT_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let store = PostgresStore::connect_with_table(&url, &unique_name("model"))
        .await
        .unwrap_or_else(|e| panic!("the model test needs PostgreSQL at {url}: {e}"));
    run("postgres", &store, Time::Real, REAL_LEASE, cases(12), 25).await;
    let table = store.table();
    idempotent_runtime::sqlx::query(idempotent_runtime::sqlx::AssertSqlSafe(format!(
        "DROP TABLE {table}"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_store_follows_the_model() {
    let url = env_url("IDEMPOTENT_MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
    let store = MySqlStore::connect_with_table(&url, &unique_name("model"))
        .await
        .unwrap_or_else(|e| panic!("the model test needs MySQL / MariaDB at {url}: {e}"));
    run("mysql", &store, Time::Real, REAL_LEASE, cases(12), 25).await;
    let table = store.table();
    idempotent_runtime::sqlx::query(idempotent_runtime::sqlx::AssertSqlSafe(format!(
        "DROP TABLE {table}"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_follows_the_model() {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name("idempotent_model")));
    let store = SqliteStore::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    run("sqlite", &store, Time::Real, REAL_LEASE, cases(12), 25).await;
    drop(store);
    let _ = std::fs::remove_file(&path);
}

/// Tokens of one record keep growing when it is forgotten and claimed again at once,
/// faster than the store's clock ticks (SQLite reads its clock in milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grow_across_forget_faster_than_the_clock_ticks() {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name("idempotent_tokens")));
    let sqlite = SqliteStore::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    let memory = MemoryStore::with_clock(ManualClock::new());
    let stores: [(&str, &dyn Store); 2] = [("sqlite", &sqlite), ("memory", &memory)];
    for (name, store) in stores {
        let k = RecordKey::new(&unique_scope("tokens"), "k").unwrap();
        let r = ClaimRequest {
            key: &k,
            lease: TTL / 2,
            ttl: TTL,
            fingerprint: None,
            max_attempts: None,
        };
        let mut last = None;
        for _ in 0..200 {
            let ClaimOutcome::Acquired { token, .. } = store.claim(&r).await.unwrap() else {
                panic!("{name}: a forgotten key is claimable")
            };
            if let Some(prev) = last {
                assert!(token > prev, "{name}: token {token} after {prev}");
            }
            last = Some(token);
            assert!(store.as_admin().unwrap().forget(&k).await.unwrap());
        }
    }
    drop(sqlite);
    let _ = std::fs::remove_file(&path);
}
