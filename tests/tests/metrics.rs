//! With the `metrics` feature, every handled message increments
//! `idempotent_messages_total{scope, outcome}`.

use idempotent_runtime::{Error, idempotent};
use idempotent_tests::metrics_support::Counts;

#[idempotent(key = "id", scope = "metered")]
async fn metered(id: u32, fail: bool) -> Result<u32, Error> {
    if fail {
        return Err(Error::MissingKey);
    }
    Ok(id)
}

#[tokio::test]
async fn outcomes_are_counted_per_scope() {
    let counts = Counts::install();
    metered(1, false).await.unwrap();
    metered(1, false).await.unwrap();
    metered(1, false).await.unwrap();
    metered(2, true).await.unwrap_err();
    let get = |outcome: &str| {
        counts.get(
            "idempotent_messages_total",
            &[("scope", "metered"), ("outcome", outcome)],
        )
    };
    assert_eq!(get("executed"), 1);
    assert_eq!(get("replayed"), 2);
    assert_eq!(get("failed"), 1);
}
