//! With the `metrics` feature, every handled message increments
//! `idempotent_messages_total{scope, outcome}`.

use idempotent_runtime::{Error, idempotent};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Counts(Mutex<HashMap<String, Arc<Count>>>);

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::SeqCst);
    }
    fn absolute(&self, n: u64) {
        self.0.store(n, Ordering::SeqCst);
    }
}

struct TestRecorder(Arc<Counts>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let c = self.0.0.lock().unwrap().entry(name).or_default().clone();
        Counter::from_arc(c)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[idempotent(key = "id", scope = "metered")]
async fn metered(id: u32, fail: bool) -> Result<u32, Error> {
    if fail {
        return Err(Error::MissingKey);
    }
    Ok(id)
}

#[tokio::test]
async fn outcomes_are_counted_per_scope() {
    let counts = Arc::new(Counts::default());
    metrics::set_global_recorder(TestRecorder(counts.clone())).unwrap();
    metered(1, false).await.unwrap();
    metered(1, false).await.unwrap();
    metered(1, false).await.unwrap();
    metered(2, true).await.unwrap_err();
    let get = |outcome: &str| {
        let name = format!("idempotent_messages_total{{outcome={outcome},scope=metered}}");
        counts
            .0
            .lock()
            .unwrap()
            .get(&name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    };
    assert_eq!(get("executed"), 1);
    assert_eq!(get("replayed"), 2);
    assert_eq!(get("failed"), 1);
}
