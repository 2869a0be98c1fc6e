//! `RedisStore` on a single node: the conformance suite against the shared server
//! (`IDEMPOTENT_REDIS_URL`, default `redis://127.0.0.1:6379`), and the Redis-specific
//! behaviour (round trips, server clock, key encoding, record layout, foreign data),
//! partly on private servers started by the tests.
#![cfg(feature = "redis")]

use idempotent_runtime::redis::{self, AsyncCommands};
use idempotent_runtime::store::StoreAdmin;
use idempotent_runtime::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, RecordState, Release,
};
use idempotent_runtime::testing::conformance::{
    TTL, acquire_token as acquire, claim_request as req, unique_scope,
};
use idempotent_runtime::{RecordKey, RedisStore, Store, StoreErrorKind, Token};
use idempotent_tests::redis_support::{
    RedisServer, connect, free_port, race_two_stores, raw, redis_url, server_time_us,
};
use std::sync::Arc;
use std::time::Duration;

idempotent_runtime::protocol_conformance_suite!(async {
    Arc::new(idempotent_tests::redis_support::connect().await) as Arc<dyn Store>
});
idempotent_runtime::admin_conformance_suite!(async {
    Arc::new(idempotent_tests::redis_support::connect().await) as Arc<dyn Store>
});

/// The protocol cases with the store's single steps coalesced into batch calls.
mod coalesced {
    use super::*;
    use idempotent_runtime::store::coalesce::Coalesced;
    idempotent_runtime::protocol_conformance_suite!(async {
        Arc::new(Coalesced::new(
            idempotent_tests::redis_support::connect().await,
        )) as Arc<dyn Store>
    });
}

/// `fcall` calls and whether any `set` ran since the last `CONFIG RESETSTAT`.
async fn function_calls(conn: &mut redis::aio::ConnectionManager) -> (u64, bool) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    let calls = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0);
    (calls, info.contains("cmdstat_set:"))
}

async fn reset_stats(conn: &mut redis::aio::ConnectionManager) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .expect("CONFIG RESETSTAT");
}

#[tokio::test]
async fn each_protocol_step_is_one_function_call_and_a_duplicate_writes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let scope = unique_scope("round-trips");
    let k = RecordKey::new(&scope, "order-1").unwrap();
    let lease = Duration::from_secs(10);

    // warm up: the first call loads the function library into the new server
    let t = acquire(&store, &req(&k, lease)).await;
    let c = Completion {
        key: &k,
        token: t,
        output: Some(b"{\"ok\":1}"),
        ttl: TTL,
    };
    assert_eq!(store.complete(&c).await.unwrap(), Fence::Held);

    reset_stats(&mut conn).await;
    let dup = store.claim(&req(&k, lease)).await.unwrap();
    assert_eq!(
        dup,
        ClaimOutcome::Completed {
            output: Some(b"{\"ok\":1}".to_vec())
        }
    );
    assert_eq!(
        function_calls(&mut conn).await,
        (1, false),
        "a duplicate of a completed key is one FCALL and writes nothing"
    );

    let k2 = RecordKey::new(&scope, "order-2").unwrap();
    reset_stats(&mut conn).await;
    let t2 = acquire(&store, &req(&k2, lease)).await;
    let c2 = Completion {
        key: &k2,
        token: t2,
        output: Some(b"2"),
        ttl: TTL,
    };
    assert_eq!(store.complete(&c2).await.unwrap(), Fence::Held);
    assert_eq!(
        function_calls(&mut conn).await.0,
        2,
        "first delivery: claim + complete"
    );

    let k3 = RecordKey::new(&scope, "order-3").unwrap();
    let t3 = acquire(&store, &req(&k3, lease)).await;
    let _ = store
        .release(&Release {
            key: &k3,
            token: t3,
        })
        .await
        .unwrap();
    reset_stats(&mut conn).await;
    let t3 = acquire(&store, &req(&k3, lease)).await;
    let r = store
        .release(&Release {
            key: &k3,
            token: t3,
        })
        .await
        .unwrap();
    assert_eq!(r, Fence::Held);
    assert_eq!(
        function_calls(&mut conn).await.0,
        2,
        "failed delivery: claim + release"
    );
}

#[tokio::test]
async fn batches_recover_from_a_flushed_function_library() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let scope = unique_scope("batch-nofunction");
    let keys: Vec<RecordKey> = (0..40)
        .map(|i| RecordKey::new(&scope, &format!("k{i}")).unwrap())
        .collect();
    let lease = Duration::from_secs(10);

    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reqs: Vec<_> = keys.iter().map(|k| req(k, lease)).collect();
    let outcomes = store.claim_batch(&reqs).await.unwrap();
    let tokens: Vec<Token> = outcomes
        .iter()
        .map(|o| match o {
            ClaimOutcome::Acquired { token, attempt: 1 } => *token,
            other => panic!("expected a first Acquired, got {other:?}"),
        })
        .collect();

    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let outputs: Vec<Vec<u8>> = (0..keys.len())
        .map(|i| i.to_string().into_bytes())
        .collect();
    let completions: Vec<_> = keys
        .iter()
        .zip(&tokens)
        .zip(&outputs)
        .map(|((k, t), o)| Completion {
            key: k,
            token: *t,
            output: Some(o),
            ttl: TTL,
        })
        .collect();
    // half with a stale token: fenced
    let mut mixed = completions.clone();
    for c in mixed.iter_mut().skip(20) {
        c.token = Token::new(c.token.get() - 1);
    }
    let fences = store.complete_batch(&mixed).await.unwrap();
    assert!(fences[..20].iter().all(|f| *f == Fence::Held));
    assert!(fences[20..].iter().all(|f| *f == Fence::Lost));

    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let releases: Vec<_> = keys
        .iter()
        .zip(&tokens)
        .map(|(k, t)| Release { key: k, token: *t })
        .collect();
    let fences = store.release_batch(&releases).await.unwrap();
    assert!(fences[..20].iter().all(|f| *f == Fence::Lost), "completed");
    assert!(
        fences[20..].iter().all(|f| *f == Fence::Held),
        "in progress"
    );

    let again = store.claim_batch(&reqs).await.unwrap();
    for (i, o) in again.iter().enumerate() {
        if i < 20 {
            assert_eq!(
                *o,
                ClaimOutcome::Completed {
                    output: Some(outputs[i].clone())
                }
            );
        } else {
            assert!(
                matches!(o, ClaimOutcome::Acquired { attempt: 2, token } if *token > tokens[i]),
                "{o:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_racing_run_each_key_once() {
    let a = Arc::new(connect().await) as Arc<dyn Store>;
    let b = Arc::new(connect().await) as Arc<dyn Store>;
    race_two_stores(a, b, 100, 8).await;
}

/// Tokens are the server's `TIME` in µs (or the previous token + 1): they fall
/// between two `TIME` readings taken around the claim, whatever the client's clock says.
#[tokio::test]
async fn tokens_come_from_the_server_clock() {
    let store = connect().await;
    let mut conn = raw(&redis_url()).await;
    let scope = unique_scope("server-tokens");
    for i in 0..20 {
        let k = RecordKey::new(&scope, &format!("k{i}")).unwrap();
        let before = server_time_us(&mut conn).await;
        let t = acquire(&store, &req(&k, Duration::from_secs(5))).await;
        let after = server_time_us(&mut conn).await;
        assert!(
            (before..=after).contains(&t.get()),
            "token {t} is not between the server times {before} and {after}"
        );
        // a take-over also draws its token from the clock, not from the old token + 1
        let r = store.release(&Release { key: &k, token: t }).await.unwrap();
        assert_eq!(r, Fence::Held);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let before = server_time_us(&mut conn).await;
        let t2 = acquire(&store, &req(&k, Duration::from_secs(5))).await;
        let after = server_time_us(&mut conn).await;
        assert!(
            t2 > t && (before..=after).contains(&t2.get()),
            "take-over token {t2} (previous {t}) is not between the server times {before} and {after}"
        );
    }
}

/// A lease holds for its full duration as measured by Redis (and not a moment
/// longer): every refusal happens before the deadline on the server clock, the
/// take-over after it.
#[tokio::test]
async fn a_lease_lasts_its_full_duration_on_the_server_clock() {
    let holder = connect().await;
    let other = connect().await;
    let mut conn = raw(&redis_url()).await;
    let scope = unique_scope("server-lease");
    let k = RecordKey::new(&scope, "k").unwrap();
    let lease = Duration::from_millis(700);
    let lease_us = lease.as_micros() as u64;

    let t0 = server_time_us(&mut conn).await;
    let first = acquire(&holder, &req(&k, lease)).await;
    let t1 = server_time_us(&mut conn).await;
    let rec = holder.inspect(&k).await.unwrap().unwrap();
    assert!(rec.lease_remaining.unwrap() <= lease);
    assert!(rec.expires_in.unwrap() <= TTL && rec.expires_in.unwrap() > TTL / 2);

    let mut refusals = 0;
    let deadline = std::time::Instant::now() + lease + Duration::from_secs(3);
    loop {
        let s1 = server_time_us(&mut conn).await;
        let outcome = other.claim(&req(&k, lease)).await.unwrap();
        let s2 = server_time_us(&mut conn).await;
        match outcome {
            ClaimOutcome::InProgress { retry_after } => {
                refusals += 1;
                assert!(
                    s1 < t1 + lease_us,
                    "refused at server time {s1}, after the lease ended (at most {})",
                    t1 + lease_us
                );
                assert!(retry_after <= lease);
            }
            ClaimOutcome::Acquired { token, attempt } => {
                assert!(
                    s2 >= t0 + lease_us,
                    "taken over at server time {s2}, before the lease ended (at least {})",
                    t0 + lease_us
                );
                assert!(token > first);
                assert_eq!(attempt, 2);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ended"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        refusals >= 5,
        "only {refusals} refusals within a 700 ms lease"
    );
    // the first holder is fenced out
    let c = Completion {
        key: &k,
        token: first,
        output: None,
        ttl: TTL,
    };
    assert_eq!(holder.complete(&c).await.unwrap(), Fence::Lost);
}

#[tokio::test]
async fn keys_of_any_bytes_are_data_and_never_hash_tags() {
    let store = connect().await;
    let mut conn = raw(&redis_url()).await;
    let scope = unique_scope("bytes");
    let big = vec![b'x'; 100 * 1024];
    let raw_keys: Vec<Vec<u8>> = vec![
        b"plain".to_vec(),
        b"it's \"quoted\"".to_vec(),
        b"*".to_vec(),
        b"?".to_vec(),
        b"[a-z]".to_vec(),
        b"line\nbreak\r\n".to_vec(),
        b"{tag}".to_vec(),
        b"{".to_vec(),
        b"}".to_vec(),
        b"\xff(".to_vec(),
        b"\xff".to_vec(),
        b"\x00\x01\x02".to_vec(),
        b"\xc3\x28 not utf-8 \xfe".to_vec(),
        b"% _ \\ ' ; --".to_vec(),
        b"1:x".to_vec(),
        big,
    ];
    // scope/key boundary: ("s:1", "x") and ("s", "1:x") must stay apart
    let mut keys: Vec<RecordKey> = raw_keys
        .iter()
        .map(|k| RecordKey::new(&scope, k.as_slice()).unwrap())
        .collect();
    keys.push(RecordKey::new(&format!("{scope}:1"), "x").unwrap());
    keys.push(RecordKey::new(&format!("{scope}{{x}}"), "{y}").unwrap());

    let mut names = std::collections::HashSet::new();
    for k in &keys {
        let name = store.redis_key(k);
        assert!(
            !name.contains(&b'{') && !name.contains(&b'}'),
            "Redis key {} carries a hash tag",
            name.escape_ascii()
        );
        assert!(names.insert(name), "two record keys share a Redis key");
    }

    let lease = Duration::from_secs(10);
    for (i, k) in keys.iter().enumerate() {
        let t = acquire(&store, &req(k, lease)).await;
        let out = format!("out-{i}");
        let c = Completion {
            key: k,
            token: t,
            output: Some(out.as_bytes()),
            ttl: TTL,
        };
        assert_eq!(store.complete(&c).await.unwrap(), Fence::Held);
    }
    for (i, k) in keys.iter().enumerate() {
        let want = format!("out-{i}").into_bytes();
        let rec = store.inspect(k).await.unwrap().expect("record");
        assert_eq!(rec.state, RecordState::Completed);
        assert_eq!(rec.output.as_deref(), Some(want.as_slice()));
        assert_eq!(
            store.claim(&req(k, lease)).await.unwrap(),
            ClaimOutcome::Completed { output: Some(want) }
        );
        let exists: bool = conn.exists(store.redis_key(k)).await.unwrap();
        assert!(exists, "record {i} is not at its documented Redis key");
    }
    let readable = store.redis_key(&RecordKey::new("orders", "order-17").unwrap());
    assert_eq!(readable, b"idem:6:orders:order-17");
}

/// A record is one packed string with the documented layout, and expires with its key.
#[tokio::test]
async fn records_follow_the_documented_layout() {
    let store = connect().await;
    let mut conn = raw(&redis_url()).await;
    let scope = unique_scope("layout");
    let k = RecordKey::new(&scope, "order-17").unwrap();
    let name = store.redis_key(&k);
    let fp = [7u8; 32];
    let r = ClaimRequest {
        key: &k,
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(3600),
        fingerprint: Some(&fp),
        max_attempts: None,
    };
    let t = acquire(&store, &r).await;
    let v: Vec<u8> = conn.get(&name).await.unwrap();
    assert_eq!(v.len(), 22 + 4 + 32);
    assert_eq!(v[0], 0xE1, "in progress");
    assert_eq!(v[1], 1, "fingerprint flag");
    assert_eq!(u32::from_be_bytes(v[2..6].try_into().unwrap()), 1);
    assert_eq!(u64::from_be_bytes(v[6..14].try_into().unwrap()), t.get());
    let lease_until = u64::from_be_bytes(v[14..22].try_into().unwrap());
    assert!(lease_until >= t.get() + 30_000_000 && lease_until < t.get() + 31_000_000);
    assert_eq!(u32::from_be_bytes(v[22..26].try_into().unwrap()), 32);
    assert_eq!(&v[26..], &fp);
    let pttl: i64 = conn.pttl(&name).await.unwrap();
    assert!(
        pttl > 3_500_000 - 100_000 && pttl <= 3_600_000,
        "pttl {pttl}"
    );

    let c = Completion {
        key: &k,
        token: t,
        output: Some(b"{\"receipt\":42}"),
        ttl: Duration::from_secs(600),
    };
    assert_eq!(store.complete(&c).await.unwrap(), Fence::Held);
    let v: Vec<u8> = conn.get(&name).await.unwrap();
    assert_eq!(v[0], 0xE2, "completed");
    assert_eq!(v[1], 3, "fingerprint and output flags");
    assert_eq!(u64::from_be_bytes(v[14..22].try_into().unwrap()), 0);
    assert!(v.ends_with(b"{\"receipt\":42}"));
    let pttl: i64 = conn.pttl(&name).await.unwrap();
    assert!(pttl > 590_000 && pttl <= 600_000, "pttl {pttl}");
    let bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(bytes.is_some());
    assert_eq!(store.purge_expired().await.unwrap(), 0);
}

#[tokio::test]
async fn prefixes_keep_stores_apart() {
    let a = connect().await;
    let b = connect().await.with_prefix("other-app:");
    assert_eq!(b.prefix(), b"other-app:");
    let scope = unique_scope("prefix");
    let k = RecordKey::new(&scope, "k").unwrap();
    let lease = Duration::from_secs(10);
    let ta = acquire(&a, &req(&k, lease)).await;
    let tb = acquire(&b, &req(&k, lease)).await;
    assert!(tb >= ta);
    assert!(b.redis_key(&k).starts_with(b"other-app:"));
    assert!(a.forget(&k).await.unwrap());
    assert!(b.inspect(&k).await.unwrap().is_some());
    assert!(b.forget(&k).await.unwrap());
    assert!(!b.forget(&k).await.unwrap());
}

/// Foreign or damaged values under a record's key give `Corrupt` errors with a clear
/// message from every operation, never a panic or a silent overwrite; `forget`
/// clears them.
#[tokio::test]
async fn foreign_data_under_a_key_is_corrupt_not_a_panic() {
    let store = connect().await;
    let mut conn = raw(&redis_url()).await;
    let scope = unique_scope("corrupt");
    let lease = Duration::from_secs(10);

    let mut header = vec![0xE1, 0];
    header.extend_from_slice(&1u32.to_be_bytes());
    header.extend_from_slice(&5u64.to_be_bytes());
    header.extend_from_slice(&0u64.to_be_bytes());
    let mut trailing = header.clone();
    trailing.extend_from_slice(b"junk");
    let mut truncated_fp = header.clone();
    truncated_fp[1] = 1;
    truncated_fp.extend_from_slice(&100u32.to_be_bytes());
    truncated_fp.extend_from_slice(b"short");
    let mut bad_tag = header.clone();
    bad_tag[0] = b'x';
    let mut zero_token = header.clone();
    zero_token[6..14].copy_from_slice(&0u64.to_be_bytes());
    // Regression: Lua numbers are doubles, so a token above 2^53 was rounded down
    // (the next claim's token could be smaller than the last), and one near 2^64 made
    // the claim write a record its own decoder rejects. Released records, so that a
    // claim would take them over.
    let mut released = header.clone();
    released[0] = 0xE3;
    let mut inexact_token = released.clone();
    inexact_token[6..14].copy_from_slice(&((1u64 << 53) + 1).to_be_bytes());
    let mut huge_token = released.clone();
    huge_token[6..14].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
    let mut huge_lease = header.clone();
    huge_lease[14..22].copy_from_slice(&(u64::MAX - 1).to_be_bytes());

    enum Foreign {
        Str(Vec<u8>),
        Hash,
        List,
    }
    let cases = vec![
        ("plain string", Foreign::Str(b"1".to_vec())),
        (
            "long text",
            Foreign::Str(b"some other application's value".to_vec()),
        ),
        ("trailing bytes", Foreign::Str(trailing)),
        ("truncated fingerprint", Foreign::Str(truncated_fp)),
        ("unknown tag", Foreign::Str(bad_tag)),
        ("zero token", Foreign::Str(zero_token)),
        ("token above 2^53", Foreign::Str(inexact_token)),
        ("token near 2^64", Foreign::Str(huge_token)),
        ("lease near 2^64", Foreign::Str(huge_lease)),
        ("hash", Foreign::Hash),
        ("list", Foreign::List),
    ];
    for (i, (what, foreign)) in cases.into_iter().enumerate() {
        let k = RecordKey::new(&scope, &format!("k{i}")).unwrap();
        let name = store.redis_key(&k);
        match foreign {
            Foreign::Str(v) => {
                let _: () = conn.set(&name, v).await.unwrap();
            }
            Foreign::Hash => {
                let _: () = conn.hset(&name, "status", "1").await.unwrap();
            }
            Foreign::List => {
                let _: () = conn.lpush(&name, "x").await.unwrap();
            }
        }
        let check = |r: Result<(), idempotent_runtime::StoreError>, op: &str| {
            let e = r.expect_err(&format!("{op} on a {what} must fail"));
            assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{op} on a {what}: {e}");
            assert!(!e.is_retryable());
            assert!(
                e.to_string().contains(&scope)
                    && e.to_string().contains("not an idempotency record"),
                "{op} on a {what}: unclear message: {e}"
            );
        };
        check(store.claim(&req(&k, lease)).await.map(drop), "claim");
        check(
            store
                .complete(&Completion {
                    key: &k,
                    token: Token::new(5),
                    output: None,
                    ttl: TTL,
                })
                .await
                .map(drop),
            "complete",
        );
        check(
            store
                .release(&Release {
                    key: &k,
                    token: Token::new(5),
                })
                .await
                .map(drop),
            "release",
        );
        check(
            store.renew(&k, Token::new(5), lease).await.map(drop),
            "renew",
        );
        check(store.inspect(&k).await.map(drop), "inspect");
        check(
            store.claim_batch(&[req(&k, lease)]).await.map(drop),
            "claim_batch",
        );
        // untouched
        let kind: String = redis::cmd("TYPE")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_ne!(kind, "none", "{what} was deleted");
        assert!(store.forget(&k).await.unwrap());
        assert!(matches!(
            store.claim(&req(&k, lease)).await.unwrap(),
            ClaimOutcome::Acquired { attempt: 1, .. }
        ));
    }
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_with_the_redis_error_as_source() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let e = RedisStore::connect(&url)
        .await
        .expect_err("nothing listens there");
    assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    let source = std::error::Error::source(&e).expect("a source");
    assert!(
        source.downcast_ref::<redis::RedisError>().is_some(),
        "source is not the redis error: {source:?}"
    );

    let e = RedisStore::connect("nonsense://x")
        .await
        .expect_err("not a Redis URL");
    assert_eq!(e.kind(), StoreErrorKind::Rejected, "{e}");
}

#[tokio::test]
async fn a_store_is_a_cheap_clone_sharing_its_connection() {
    let store = connect().await;
    let copy = store.clone();
    let scope = unique_scope("clone");
    let k = RecordKey::new(&scope, "k").unwrap();
    let t = acquire(&store, &req(&k, Duration::from_secs(10))).await;
    assert_eq!(
        copy.renew(&k, t, Duration::from_secs(20)).await.unwrap(),
        Fence::Held
    );
    let rec = store.inspect(&k).await.unwrap().unwrap();
    assert!(rec.lease_remaining.unwrap() > Duration::from_secs(15));
    assert!(format!("{copy:?}").contains("single node"));
    assert!(!copy.is_cluster());
}

/// A batch step is one `FCALL` on a single node, whatever the batch size up to 128 keys,
/// and every key gets the answer the single-key step would give.
#[tokio::test]
async fn a_batch_step_is_one_function_call() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server.url()).await;
    let scope = unique_scope("batch-one-call");
    let keys: Vec<RecordKey> = (0..64)
        .map(|i| RecordKey::new(&scope, &format!("k{i}")).unwrap())
        .collect();
    let lease = Duration::from_secs(10);
    let fp = [7u8; 32];
    let reqs: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| ClaimRequest {
            fingerprint: (i % 2 == 0).then_some(&fp[..]),
            ..req(k, lease)
        })
        .collect();
    // warm up: loads the function library into the new server
    let _ = store.claim(&req(&keys[0], lease)).await.unwrap();

    reset_stats(&mut conn).await;
    let outcomes = store.claim_batch(&reqs).await.unwrap();
    assert_eq!(function_calls(&mut conn).await.0, 1, "claim batch");
    assert!(matches!(outcomes[0], ClaimOutcome::InProgress { .. }));
    let tokens: Vec<Token> = outcomes[1..]
        .iter()
        .map(|o| match o {
            ClaimOutcome::Acquired { token, attempt: 1 } => *token,
            other => panic!("expected a first Acquired, got {other:?}"),
        })
        .collect();

    reset_stats(&mut conn).await;
    let completions: Vec<_> = keys[1..]
        .iter()
        .zip(&tokens)
        .enumerate()
        .map(|(i, (k, t))| Completion {
            key: k,
            token: *t,
            output: (i % 3 != 0).then_some(b"out".as_slice()),
            ttl: TTL,
        })
        .collect();
    let fences = store.complete_batch(&completions).await.unwrap();
    assert!(fences.iter().all(|f| *f == Fence::Held));
    assert_eq!(function_calls(&mut conn).await.0, 1, "complete batch");

    for (i, k) in keys[1..].iter().enumerate() {
        let rec = store.inspect(k).await.unwrap().expect("record");
        assert_eq!(rec.state, RecordState::Completed);
        assert_eq!(
            rec.output.as_deref(),
            (i % 3 != 0).then_some(b"out".as_slice())
        );
        assert_eq!(
            rec.fingerprint.as_deref(),
            ((i + 1) % 2 == 0).then_some(&fp[..])
        );
    }
}
