//! The admin cases: the operator actions of [`StoreAdmin`] (inspect, forget, scans,
//! statistics, the operator's release and attempt reset) and the handler's
//! [`Idempotency::inspect`](crate::manual::Idempotency::inspect) and
//! [`Idempotency::forget`](crate::manual::Idempotency::forget). They need a store whose
//! [`Store::as_admin`] answers; they reach it through the [`Store`] given, so a
//! wrapper store runs them too.

use super::support::{HandlerError, LEASE, TTL, claim_request, handler, key, unique_scope};
use crate::key::RecordKey;
use crate::store::{
    AdminOutcome, ClaimOutcome, ClaimRequest, Completion, Fence, RecordState, Release, ScanCursor,
    ScanFilter, ScanItem, Store, StoreAdmin, Token,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The operator actions of `store`, which the admin cases need.
fn admin(store: &dyn Store) -> &dyn StoreAdmin {
    store.as_admin().unwrap_or_else(|| {
        panic!("the admin cases need a store with operator actions: {store:?}.as_admin() is None")
    })
}

const LONG: Duration = Duration::from_secs(30);

async fn acquired(store: &dyn Store, r: &ClaimRequest<'_>) -> (Token, u32) {
    match store.claim(r).await.expect("claim") {
        ClaimOutcome::Acquired { token, attempt } => (token, attempt),
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn complete(store: &dyn Store, key: &RecordKey, token: Token, output: Option<&[u8]>) {
    let f = store
        .complete(&Completion {
            key,
            token,
            output,
            ttl: TTL,
        })
        .await
        .expect("complete");
    assert_eq!(f, Fence::Held);
}

async fn release(store: &dyn Store, key: &RecordKey, token: Token) {
    let f = store
        .release(&Release { key, token })
        .await
        .expect("release");
    assert_eq!(f, Fence::Held);
}

/// Every record of a scan with `filter`, pages of `page` records, by readable key when
/// the filter names a scope, else by `scope/key` (a Redis scan may return a record
/// twice; it is kept once).
async fn scan_all(
    store: &dyn Store,
    filter: &ScanFilter,
    page: usize,
) -> BTreeMap<String, ScanItem> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<ScanCursor> = None;
    let mut pages = 0;
    loop {
        let p = admin(store)
            .scan(filter, cursor.as_ref(), page)
            .await
            .expect("scan");
        pages += 1;
        assert!(pages < 100_000, "the scan does not end");
        for item in p.items {
            let name = match filter.scope {
                Some(_) => item.key.readable_key(),
                None => item.key.to_string(),
            };
            out.insert(name, item);
        }
        match p.next {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

/// Seeds `scope` with: `done` (Completed, 4-byte output), `busy` (In progress, live
/// lease), `stuck` (In progress, lease run out), `failed` (Released after two
/// attempts), the composite key `("a:b", "c")` (Completed, no output) and `bulk-0` …
/// `bulk-4` (Completed). Returns after the stuck lease ran out.
async fn seed(store: &dyn Store, scope: &str) {
    let done = key(scope, "done");
    let (t, _) = acquired(store, &claim_request(&done, LONG)).await;
    complete(store, &done, t, Some(b"\"ok\"")).await;
    let busy = key(scope, "busy");
    acquired(store, &claim_request(&busy, LONG)).await;
    let stuck = key(scope, "stuck");
    acquired(store, &claim_request(&stuck, LEASE)).await;
    let failed = key(scope, "failed");
    for _ in 0..2 {
        let (t, _) = acquired(store, &claim_request(&failed, LONG)).await;
        release(store, &failed, t).await;
    }
    let composite = RecordKey::new(scope, &("a:b", "c")).unwrap();
    let (t, _) = acquired(store, &claim_request(&composite, LONG)).await;
    complete(store, &composite, t, None).await;
    for i in 0..5 {
        let k = key(scope, &format!("bulk-{i}"));
        let (t, _) = acquired(store, &claim_request(&k, LONG)).await;
        complete(store, &k, t, Some(b"1")).await;
    }
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
}

/// Scans page through a scope with every filter: each record once, with its state,
/// attempts, lease, expiry, age and output size; other scopes stay out.
pub async fn scan_pages_through_records_with_filters(store: Arc<dyn Store>) {
    let store = &*store;
    let scope = unique_scope("scan");
    let other = unique_scope("scan-other");
    let o = key(&other, "done");
    acquired(store, &claim_request(&o, LONG)).await;
    seed(store, &scope).await;

    let all = scan_all(store, &ScanFilter::new().scope(&scope), 3).await;
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "(\"a:b\", \"c\")",
            "bulk-0",
            "bulk-1",
            "bulk-2",
            "bulk-3",
            "bulk-4",
            "busy",
            "done",
            "failed",
            "stuck"
        ]
    );
    let done = &all["done"];
    assert_eq!(done.state, RecordState::Completed);
    assert_eq!((done.attempts, done.output_size), (1, Some(4)));
    assert!(done.expires_in.is_some_and(|e| e <= TTL && e > TTL / 2));
    assert!(done.claimed_ago < Duration::from_secs(30), "{done:?}");
    assert_eq!(done.key.scope(), scope);
    assert_eq!(all["(\"a:b\", \"c\")"].output_size, None);
    let busy = &all["busy"];
    assert_eq!(busy.state, RecordState::InProgress);
    assert!(busy.lease_remaining.is_some_and(|l| l <= LONG));
    assert!(!busy.is_stuck());
    let stuck = &all["stuck"];
    assert!(
        stuck.is_stuck() && stuck.lease_remaining.is_none(),
        "{stuck:?}"
    );
    let failed = &all["failed"];
    assert_eq!((failed.state, failed.attempts), (RecordState::Released, 2));
    assert!(failed.is_poisoned(2) && !failed.is_poisoned(3));
    assert!(all.values().all(|i| i.token.get() > 0));

    // one page holding everything gives the same records
    let big = scan_all(store, &ScanFilter::new().scope(&scope), 1000).await;
    assert_eq!(
        big.keys().collect::<Vec<_>>(),
        all.keys().collect::<Vec<_>>()
    );

    let keys = |m: BTreeMap<String, ScanItem>| m.into_keys().collect::<Vec<_>>();
    let f = || ScanFilter::new().scope(&scope);
    assert_eq!(
        keys(scan_all(store, &f().state(RecordState::Completed), 2).await).len(),
        7
    );
    assert_eq!(
        keys(scan_all(store, &f().state(RecordState::InProgress), 2).await),
        ["busy", "stuck"]
    );
    assert_eq!(
        keys(scan_all(store, &f().state(RecordState::Released), 2).await),
        ["failed"]
    );
    assert_eq!(
        keys(scan_all(store, &f().lease_expired(), 2).await),
        ["stuck"]
    );
    assert_eq!(
        keys(scan_all(store, &f().min_attempts(2), 2).await),
        ["failed"]
    );
    assert!(
        scan_all(store, &f().older_than(Duration::from_secs(3600)), 5)
            .await
            .is_empty()
    );
    assert_eq!(
        scan_all(store, &f().older_than(Duration::from_millis(1)), 5)
            .await
            .len(),
        10
    );

    // a scan of every scope sees both scopes' records
    let everything = scan_all(
        store,
        &ScanFilter::new().state(RecordState::InProgress),
        1000,
    )
    .await;
    assert!(everything.values().any(|i| i.key.scope() == other));
    assert!(everything.values().any(|i| i.key.scope() == scope));
}

/// Statistics count a scope's records per state, with the oldest claim, the records
/// past their lease and the poisoned ones.
pub async fn stats_count_per_scope_and_state(store: Arc<dyn Store>) {
    let store = &*store;
    let scope = unique_scope("stats");
    seed(store, &scope).await;
    let stats = admin(store)
        .stats(Some(&scope), Some(2))
        .await
        .expect("stats");
    let rows: Vec<(RecordState, u64, u64, u64)> = stats
        .iter()
        .map(|s| (s.state, s.count, s.past_lease, s.poisoned))
        .collect();
    assert_eq!(
        rows,
        [
            (RecordState::InProgress, 2, 1, 0),
            (RecordState::Released, 1, 0, 1),
            (RecordState::Completed, 7, 0, 0),
        ]
    );
    assert!(stats.iter().all(|s| s.scope == scope));
    assert!(
        stats
            .iter()
            .all(|s| s.oldest_claim.is_some_and(|o| o < Duration::from_secs(30)))
    );
    let plain = admin(store).stats(Some(&scope), None).await.expect("stats");
    assert!(plain.iter().all(|s| s.poisoned == 0));
    let other = admin(store)
        .stats(Some(&unique_scope("stats-empty")), Some(1))
        .await
        .expect("stats");
    assert!(other.is_empty());
}

/// An operator's release frees a live claim at once and fences its holder out;
/// other states are left alone.
pub async fn force_release_fences_the_holder(store: Arc<dyn Store>) {
    let store = &*store;
    let scope = unique_scope("force-release");
    let k = key(&scope, "held");
    let (t1, _) = acquired(store, &claim_request(&k, LONG)).await;
    assert_eq!(
        admin(store).force_release(&k).await.unwrap(),
        AdminOutcome::Applied
    );
    let r = admin(store).inspect(&k).await.unwrap().expect("record");
    assert_eq!((r.state, r.attempts), (RecordState::Released, 1));
    assert!(r.token > t1, "the token is bumped");
    let lost = store
        .complete(&Completion {
            key: &k,
            token: t1,
            output: None,
            ttl: TTL,
        })
        .await
        .unwrap();
    assert_eq!(lost, Fence::Lost, "the old holder is fenced out");
    assert_eq!(store.renew(&k, t1, LONG).await.unwrap(), Fence::Lost);
    let (t2, attempt) = acquired(store, &claim_request(&k, LONG)).await;
    assert!(t2 > r.token);
    assert_eq!(attempt, 2);
    complete(store, &k, t2, Some(b"1")).await;
    assert_eq!(
        admin(store).force_release(&k).await.unwrap(),
        AdminOutcome::Unchanged {
            state: RecordState::Completed
        }
    );
    assert_eq!(
        admin(store)
            .force_release(&key(&scope, "absent"))
            .await
            .unwrap(),
        AdminOutcome::NotFound
    );
    // a released record stays as it is
    let f = key(&scope, "failed");
    let (t, _) = acquired(store, &claim_request(&f, LONG)).await;
    release(store, &f, t).await;
    assert_eq!(
        admin(store).force_release(&f).await.unwrap(),
        AdminOutcome::Unchanged {
            state: RecordState::Released
        }
    );
}

/// Resetting the attempts of a poisoned key lets the next delivery run as attempt 1;
/// live claims and completed records are left alone.
pub async fn reset_attempts_unpoisons(store: Arc<dyn Store>) {
    let store = &*store;
    let scope = unique_scope("reset-attempts");
    let k = key(&scope, "poison");
    let limited = |key| ClaimRequest {
        max_attempts: Some(2),
        ..claim_request(key, LONG)
    };
    for _ in 0..2 {
        let (t, _) = acquired(store, &limited(&k)).await;
        release(store, &k, t).await;
    }
    assert_eq!(
        store.claim(&limited(&k)).await.unwrap(),
        ClaimOutcome::Exhausted { attempts: 2 }
    );
    let before = admin(store).inspect(&k).await.unwrap().expect("record");
    assert_eq!(
        admin(store).reset_attempts(&k).await.unwrap(),
        AdminOutcome::Applied
    );
    let r = admin(store).inspect(&k).await.unwrap().expect("record");
    assert_eq!((r.state, r.attempts), (RecordState::Released, 0));
    assert!(r.token > before.token);
    let (t, attempt) = acquired(store, &limited(&k)).await;
    assert_eq!(attempt, 1);
    assert_eq!(
        admin(store).reset_attempts(&k).await.unwrap(),
        AdminOutcome::Unchanged {
            state: RecordState::InProgress
        },
        "a live claim is left alone"
    );
    complete(store, &k, t, None).await;
    assert_eq!(
        admin(store).reset_attempts(&k).await.unwrap(),
        AdminOutcome::Unchanged {
            state: RecordState::Completed
        }
    );
    // a crashed holder that used up the attempts
    let crashed = key(&scope, "crashed");
    let once = ClaimRequest {
        max_attempts: Some(1),
        ..claim_request(&crashed, LEASE)
    };
    let (old, _) = acquired(store, &once).await;
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    assert_eq!(
        store.claim(&once).await.unwrap(),
        ClaimOutcome::Exhausted { attempts: 1 }
    );
    assert_eq!(
        admin(store).reset_attempts(&crashed).await.unwrap(),
        AdminOutcome::Applied
    );
    let (t, attempt) = acquired(store, &once).await;
    assert_eq!(attempt, 1);
    assert!(t > old);
    assert_eq!(
        admin(store)
            .reset_attempts(&key(&scope, "absent"))
            .await
            .unwrap(),
        AdminOutcome::NotFound
    );
}

/// Forget deletes a record in any state; inspect of an absent key is `None`.
pub async fn forget_and_inspect(store: Arc<dyn Store>) {
    let scope = unique_scope("forget");
    let k = key(&scope, "m-1");
    assert_eq!(admin(&*store).inspect(&k).await.unwrap(), None);
    assert!(!admin(&*store).forget(&k).await.unwrap());
    let (t, _) = acquired(&*store, &claim_request(&k, LONG)).await;
    complete(&*store, &k, t, Some(b"1")).await;
    assert!(admin(&*store).forget(&k).await.unwrap());
    assert_eq!(admin(&*store).inspect(&k).await.unwrap(), None);
    let (_, attempt) = acquired(&*store, &claim_request(&k, LONG)).await;
    assert_eq!(attempt, 1);
}

/// `Idempotency::inspect` and `forget` work on a message key, in the handler's scope.
pub async fn idempotency_inspects_and_forgets_by_message_key(store: Arc<dyn Store>) {
    let h = handler(&store, "admin-helpers");
    assert_eq!(h.inspect("m-1").await.unwrap(), None);
    let r: Result<u32, HandlerError> = h.run("m-1", async { Ok(5) }).await;
    assert_eq!(r.unwrap(), 5);
    let rec = h.inspect("m-1").await.unwrap().expect("a record");
    assert_eq!(rec.state, RecordState::Completed);
    assert_eq!(rec.output.as_deref(), Some(&b"5"[..]));
    let direct = admin(&*store)
        .inspect(&h.record_key("m-1").unwrap())
        .await
        .unwrap();
    assert_eq!(
        direct.map(|r| (r.state, r.token)),
        Some((rec.state, rec.token))
    );
    assert!(h.forget("m-1").await.unwrap());
    assert!(!h.forget("m-1").await.unwrap());
    let r: Result<u32, HandlerError> = h.run("m-1", async { Ok(6) }).await;
    assert_eq!(r.unwrap(), 6, "forgotten: the next delivery runs again");
}
