//! A `metrics` recorder for tests: counters kept by name and sorted labels, read back
//! with [`Counts::get`]. Compiled with the `metrics` feature only.
#![cfg(feature = "metrics")]

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The counters recorded so far.
#[derive(Debug, Default)]
pub struct Counts(Mutex<HashMap<String, Arc<Count>>>);

impl Counts {
    /// Installs a recorder feeding new counts as the process's global recorder.
    ///
    /// # Panics
    /// When a global recorder is installed already.
    pub fn install() -> Arc<Counts> {
        let counts = Arc::new(Counts::default());
        metrics::set_global_recorder(TestRecorder(counts.clone()))
            .expect("no other global metrics recorder");
        counts
    }

    /// The value of `name{labels}`, labels as `key=value` in any order; 0 if never
    /// incremented.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let key = counter_name(name, labels.iter().map(|(k, v)| format!("{k}={v}")));
        self.0
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

fn counter_name(name: &str, labels: impl Iterator<Item = String>) -> String {
    let mut labels: Vec<String> = labels.collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

#[derive(Debug, Default)]
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
        let name = counter_name(
            key.name(),
            key.labels().map(|l| format!("{}={}", l.key(), l.value())),
        );
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
