//! What the end-to-end broker tests share beyond [`assert_applied_once`](crate::assert_applied_once):
//! names unique to one test run, so concurrent runs against the same servers never meet.

/// A random suffix unique to this test run, for stream, queue, topic, group and business ids.
pub fn run_id() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
