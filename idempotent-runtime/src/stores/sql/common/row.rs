//! A record row as the SQL stores read it: the checks that it holds only values the
//! stores write (in SQL, [`sane`](super::base::sane), and on the decoded row, [`RowView::decode`]), and the
//! claim rules applied to it.

use super::base::{MAX_ATTEMPTS_VALUE, MAX_TIME, SqlDialect, from_micros, token_param};
use crate::error::StoreError;
use crate::error::StoreErrorKind;
use crate::key::RecordKey;
use crate::store::{
    ClaimOutcome, ClaimRequest, Completion, Fence, Record, RecordState, Release, Token,
};
use sqlx::query::Query;
use sqlx::{Executor, IntoArguments, SqlStr, Type};
use std::fmt;
use std::future::Future;
use std::time::Duration;

pub(crate) fn corrupt(message: String) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, message)
}

/// The error for a record whose row holds a value this store never writes: names the
/// record's scope (never its key, which is message data) and what is wrong.
pub(crate) fn corrupt_record(scope: &str, what: impl fmt::Display) -> StoreError {
    corrupt(format!(
        "the record of scope {scope:?} is corrupt: {what}; fix the row or forget the record"
    ))
}

/// One record row as every store reads it, checked: every value is one this store
/// writes (see [`sane`](super::base::sane)). Times are relative to the database clock at the moment of
/// the read.
#[derive(Debug)]
pub(crate) struct RowView {
    pub(crate) state: RecordState,
    /// Attempts claimed so far.
    pub(crate) attempts: u32,
    /// The `owner_token` column (non-negative).
    pub(crate) token: i64,
    /// `lease_until_us - now`, `None` when the lease column is NULL.
    pub(crate) lease_left: Option<i64>,
    /// `expires_at_us - now`.
    pub(crate) expires_left: i64,
    pub(crate) fingerprint: Option<Vec<u8>>,
    pub(crate) output: Option<Vec<u8>>,
}

impl RowView {
    /// Decodes and checks the columns `status, retry_times, owner_token,
    /// lease_until_us, expires_at_us, fingerprint, output, now_us` (integers as
    /// `BIGINT`) starting at column `at`, of a row of the record of scope `scope`. A
    /// value this store never writes (a status other than 0 or 1, a negative token,
    /// attempt count or time, a value of the wrong type) is a
    /// [`StoreErrorKind::Corrupt`] error naming the scope.
    pub(crate) fn decode(row: &impl Columns, at: usize, scope: &str) -> Result<Self, StoreError> {
        const NAMES: [&str; 8] = [
            "status",
            "retry_times",
            "owner_token",
            "lease_until_us",
            "expires_at_us",
            "fingerprint",
            "output",
            "the database clock",
        ];
        let bad = |i: usize, e: sqlx::Error| match e {
            sqlx::Error::ColumnNotFound(_) | sqlx::Error::ColumnIndexOutOfBounds { .. } => {
                StoreError::with_source(
                    StoreErrorKind::Rejected,
                    "a record row does not have the expected columns",
                    e,
                )
            }
            e => StoreError::with_source(
                StoreErrorKind::Corrupt,
                format!(
                    "the record of scope {scope:?} is corrupt: `{}` does not hold a value of \
                     its type; fix the row or forget the record",
                    NAMES[i]
                ),
                e,
            ),
        };
        let int = |i: usize| row.opt_int(at + i).map_err(|e| bad(i, e));
        let bytes = |i: usize| row.opt_bytes(at + i).map_err(|e| bad(i, e));
        let required = |i: usize| -> Result<i64, StoreError> {
            int(i)?.ok_or_else(|| corrupt_record(scope, format_args!("`{}` is NULL", NAMES[i])))
        };
        let status = required(0)?;
        let attempts = required(1)?;
        let token = required(2)?;
        let lease = int(3)?;
        let expires = required(4)?;
        let fingerprint = bytes(5)?;
        let output = bytes(6)?;
        let now = required(7)?;
        let state = match (status, lease) {
            (1, _) => RecordState::Completed,
            (0, Some(_)) => RecordState::InProgress,
            (0, None) => RecordState::Released,
            (s, _) => {
                return Err(corrupt_record(
                    scope,
                    format_args!("status {s} is neither 0 (not yet consumed) nor 1 (consumed)"),
                ));
            }
        };
        if !(0..=MAX_ATTEMPTS_VALUE).contains(&attempts) {
            return Err(corrupt_record(
                scope,
                format_args!("retry_times {attempts} is out of range"),
            ));
        }
        if !(0..i64::MAX).contains(&token) {
            return Err(corrupt_record(
                scope,
                format_args!("owner_token {token} is out of range"),
            ));
        }
        for (name, t) in [("lease_until_us", lease), ("expires_at_us", Some(expires))] {
            if let Some(t) = t
                && !(0..=MAX_TIME).contains(&t)
            {
                return Err(corrupt_record(
                    scope,
                    format_args!("{name} {t} is out of range"),
                ));
            }
        }
        if !(0..=MAX_TIME).contains(&now) {
            return Err(corrupt(format!(
                "the database clock reads {now} µs since the epoch"
            )));
        }
        Ok(RowView {
            state,
            attempts: attempts as u32,
            token,
            lease_left: lease.map(|l| l - now),
            expires_left: expires - now,
            fingerprint,
            output,
        })
    }

    /// The record this row describes; `None` when it has expired.
    pub(crate) fn into_record(self) -> Option<Record> {
        if self.expires_left <= 0 {
            return None;
        }
        let mut r = Record::new(self.state, self.attempts, Token(self.token as u64));
        r.lease_remaining = match (self.state, self.lease_left) {
            (RecordState::InProgress, Some(l)) if l > 0 => Some(from_micros(l)),
            _ => None,
        };
        r.expires_in = Some(from_micros(self.expires_left));
        r.fingerprint = self.fingerprint;
        r.output = self.output;
        Some(r)
    }

    /// Whether this row is the live record completed by the claim `token`: a
    /// completion by that claim was applied before (its reply may have been lost).
    pub(crate) fn completed_by(&self, token: Token) -> bool {
        self.expires_left > 0
            && self.state == RecordState::Completed
            && self.token == token_param(token)
    }

    /// Whether this row is the live record released by the claim `token` (a released
    /// row keeps its owner's token, so a release repeated by the same owner finds it).
    pub(crate) fn released_by(&self, token: Token) -> bool {
        self.expires_left > 0
            && self.state == RecordState::Released
            && self.token == token_param(token)
    }

    /// Applies the claim rules (see [`ClaimOutcome`]) to this row, as read.
    pub(crate) fn decide(self, req: &ClaimRequest<'_>) -> Decision {
        if self.expires_left <= 0 {
            return Decision::Claimable { expired: true };
        }
        if let (Some(have), Some(want)) = (&self.fingerprint, req.fingerprint)
            && have.as_slice() != want
        {
            return Decision::Answer(ClaimOutcome::FingerprintMismatch);
        }
        match (self.state, self.lease_left) {
            (RecordState::Completed, _) => {
                return Decision::Answer(ClaimOutcome::Completed {
                    output: self.output,
                });
            }
            (RecordState::InProgress, Some(left)) if left > 0 => {
                return Decision::Answer(ClaimOutcome::InProgress {
                    retry_after: from_micros(left),
                });
            }
            _ => {}
        }
        if let Some(max) = req.max_attempts
            && self.attempts >= max
        {
            return Decision::Answer(ClaimOutcome::Exhausted {
                attempts: self.attempts,
            });
        }
        Decision::Claimable { expired: false }
    }
}

/// The outcome of a claim the database says it acquired, from the token and attempt
/// number its write returned.
pub(crate) fn acquired(token: i64, attempt: i64, scope: &str) -> Result<ClaimOutcome, StoreError> {
    match (u64::try_from(token), u32::try_from(attempt)) {
        (Ok(token), Ok(attempt)) if attempt > 0 => Ok(ClaimOutcome::Acquired {
            token: Token(token),
            attempt,
        }),
        _ => Err(corrupt_record(
            scope,
            format_args!("a claim wrote owner_token {token} and retry_times {attempt}"),
        )),
    }
}

/// A compare-and-set write of one key by the claim that owns it: the step, and what
/// it writes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Owned<'a> {
    /// Completes the claim.
    Complete(Completion<'a>),
    /// Releases the claim.
    Release(Release<'a>),
    /// Extends the claim's lease.
    Renew {
        key: &'a RecordKey,
        token: Token,
        lease: Duration,
    },
}

impl<'a> Owned<'a> {
    /// The key written.
    pub(crate) fn key(&self) -> &'a RecordKey {
        match *self {
            Owned::Complete(c) => c.key,
            Owned::Release(r) => r.key,
            Owned::Renew { key, .. } => key,
        }
    }

    /// The token of the claim writing.
    #[cfg_attr(not(any(feature = "mysql", feature = "postgres")), allow(dead_code))]
    pub(crate) fn token(&self) -> Token {
        match *self {
            Owned::Complete(c) => c.token,
            Owned::Release(r) => r.token,
            Owned::Renew { token, .. } => token,
        }
    }

    /// The step's name, for errors.
    pub(crate) fn op(&self) -> &'static str {
        match self {
            Owned::Complete(_) => "complete",
            Owned::Release(_) => "release",
            Owned::Renew { .. } => "renew",
        }
    }
}

/// A batch of completions or of releases, as the stores' batch steps take it.
pub(crate) struct OwnedBatch<'a> {
    /// The operation, for errors.
    pub(crate) op: &'static str,
    /// The steps, all of one kind, in the order of the batch.
    pub(crate) items: Vec<Owned<'a>>,
}

impl<'a> OwnedBatch<'a> {
    /// The batch `op` of `items`, each made a step by `step`, once the database `DB`
    /// can store every key.
    pub(crate) fn new<DB: SqlDialect, T: Copy>(
        op: &'static str,
        items: &[T],
        step: fn(T) -> Owned<'a>,
    ) -> Result<Self, StoreError> {
        let items: Vec<Owned<'a>> = items.iter().map(|&i| step(i)).collect();
        items.iter().try_for_each(|w| DB::storable(w.key()))?;
        Ok(OwnedBatch { op, items })
    }

    /// Whether the batch completes (else it releases).
    #[cfg_attr(not(any(feature = "mysql", feature = "postgres")), allow(dead_code))]
    pub(crate) fn completes(&self) -> bool {
        matches!(self.items.first(), Some(Owned::Complete(_)))
    }
}

/// The fence of a compare-and-set write that matched no row, given the row read right
/// after it: [`Fence::Held`] when the row shows the same step already applied by the
/// same claim (a retry after a lost reply: the record is Completed, or Released, under
/// the step's token), else [`Fence::Lost`]. The row is read for a renewal all the same,
/// so that a corrupt record is an error rather than a lost claim.
pub(crate) fn unmatched_fence(seen: Option<&RowView>, w: &Owned<'_>) -> Fence {
    match (w, seen) {
        (Owned::Complete(c), Some(row)) if row.completed_by(c.token) => Fence::Held,
        (Owned::Release(r), Some(row)) if row.released_by(r.token) => Fence::Held,
        _ => Fence::Lost,
    }
}

/// Reads the row `q` selects (the record's columns, as [`RowView::decode`] takes them)
/// on `conn`, checked; `None` when there is none. `err` wraps a driver error.
pub(crate) async fn read_row<'c, DB, E>(
    conn: E,
    q: Query<'_, DB, DB::Arguments>,
    scope: &str,
    err: impl FnOnce(sqlx::Error) -> StoreError,
) -> Result<Option<RowView>, StoreError>
where
    DB: SqlDialect,
    DB::Arguments: IntoArguments<DB>,
    E: Executor<'c, Database = DB>,
    DB::Row: Columns,
{
    let row = q.fetch_all(conn).await.map_err(err)?.pop();
    row.map(|r| RowView::decode(&r, 0, scope)).transpose()
}

/// The fence of a single-key compare-and-set write `w` that matched `rows` rows:
/// [`Fence::Held`] when it matched; else the key's row is read back (`read`) and
/// [`unmatched_fence`] answers, so that a corrupt record is an error and a step already
/// applied by the same claim (its reply lost) is Held.
pub(crate) async fn fence_of(
    rows: u64,
    w: &Owned<'_>,
    read: impl Future<Output = Result<Option<RowView>, StoreError>>,
) -> Result<Fence, StoreError> {
    if rows > 0 {
        return Ok(Fence::Held);
    }
    Ok(unmatched_fence(read.await?.as_ref(), w))
}

/// What a claim does with a row it read.
#[derive(Debug)]
pub(crate) enum Decision {
    /// The row answers the claim without a write.
    Answer(ClaimOutcome),
    /// The row may be taken over: it expired (start afresh) or it is Released / its
    /// lease ran out (count one more attempt).
    Claimable {
        #[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
        expired: bool,
    },
}

/// What a claim does after its read.
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
pub(crate) enum Plan {
    /// The row answers the claim without a write.
    Answer(ClaimOutcome),
    /// No row: insert one.
    Insert,
    /// Take over the expired row read (compare-and-set on its token).
    TakeOverExpired { token: i64 },
    /// Take over the released or lapsed row read (compare-and-set on its token and
    /// attempts).
    TakeOver { token: i64, attempts: i64 },
}

#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
impl Plan {
    /// The plan for the row a claim read (`None`: no row).
    pub(crate) fn of(req: &ClaimRequest<'_>, seen: Option<RowView>) -> Plan {
        let Some(seen) = seen else {
            return Plan::Insert;
        };
        let (token, attempts) = (seen.token, i64::from(seen.attempts));
        match seen.decide(req) {
            Decision::Answer(outcome) => Plan::Answer(outcome),
            Decision::Claimable { expired: true } => Plan::TakeOverExpired { token },
            Decision::Claimable { expired: false } => Plan::TakeOver { token, attempts },
        }
    }
}

/// The conditional writes of a claim that reads first (MySQL, SQLite): one statement
/// per [`Plan`] that writes, in the database's SQL.
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
pub(crate) struct PlanSql {
    /// [`Plan::Insert`]: inserts the absent key.
    pub(crate) insert: SqlStr,
    /// [`Plan::TakeOver`]: compare-and-set on the token and attempts read.
    pub(crate) take_over: SqlStr,
    /// [`Plan::TakeOverExpired`]: compare-and-set on the token read.
    pub(crate) take_over_expired: SqlStr,
}

/// The outcome of a repeated claim of a key within one batch, given the first one's:
/// what a second claim right after the first would get.
pub(crate) fn repeated(first: &ClaimOutcome, req: &ClaimRequest<'_>) -> ClaimOutcome {
    match first {
        ClaimOutcome::Acquired { .. } => ClaimOutcome::InProgress {
            retry_after: req.lease,
        },
        other => other.clone(),
    }
}

/// The claim-retry loop: evaluates `attempt` (a block: one read and conditional
/// write, or one claim statement, in the caller's function, so `?` and `.await` work
/// in it) until it is `Some`, at most [`CLAIM_RETRIES`](super::base::CLAIM_RETRIES) times; `None` from it (or
/// `continue`) means the row changed under it and the claim is tried again. Answers
/// the outcome, or the error [`contended`] when the claim kept losing races.
macro_rules! retrying {
    ($attempt:block) => {{
        let mut outcome = None;
        for _ in 0..$crate::stores::sql::common::base::CLAIM_RETRIES {
            outcome = $attempt;
            if outcome.is_some() {
                break;
            }
        }
        outcome.ok_or_else($crate::stores::sql::common::row::contended)
    }};
}
pub(crate) use retrying;

/// The columns of a record row, read by index; implemented for the rows of every
/// database the stores run on.
pub(crate) trait Columns {
    /// An integer column (`BIGINT`), `NULL` as `None`.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, sqlx::Error>;
    /// An integer column that is never `NULL`.
    fn int(&self, i: usize) -> Result<i64, sqlx::Error>;
    /// A binary column, `NULL` as `None`.
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// A binary column that is never `NULL`.
    fn bytes(&self, i: usize) -> Result<Vec<u8>, sqlx::Error>;
}

impl<R> Columns for R
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: for<'r> sqlx::Decode<'r, R::Database> + Type<R::Database>,
{
    fn opt_int(&self, i: usize) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(i)
    }
    fn int(&self, i: usize) -> Result<i64, sqlx::Error> {
        self.try_get(i)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, sqlx::Error> {
        self.try_get(i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, sqlx::Error> {
        self.try_get(i)
    }
}

/// The error when a claim kept losing races on the same row.
pub(crate) fn contended() -> StoreError {
    StoreError::new(
        StoreErrorKind::Other,
        "the record changed under every claim attempt; retry later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_claims_are_corrupt() {
        assert!(acquired(-1, 1, "s").is_err());
    }

    /// The suite cannot make a claim lose every race; the loop's bound and its error
    /// are checked here, and that `continue` in an attempt means "try again".
    #[test]
    fn the_claim_retry_loop_is_bounded() {
        let mut tries = 0;
        let lost: Result<(), StoreError> = retrying!({
            tries += 1;
            None
        });
        assert_eq!(tries, crate::stores::sql::common::base::CLAIM_RETRIES);
        let e = lost.unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Other);
        assert!(
            e.to_string().contains("changed under every claim attempt"),
            "{e}"
        );

        let mut tries = 0;
        let won = retrying!({
            tries += 1;
            if tries < 3 {
                continue;
            }
            Some(tries)
        });
        assert_eq!(won.unwrap(), 3);
    }
}
