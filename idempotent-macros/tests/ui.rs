//! Compile-time behaviour of `#[idempotent]`: the messages users see for mistakes
//! (`tests/ui/*.rs` with a `.stderr`) and the shapes of handler that must compile and run.
//!
//! The cases live in the workspace's `tests/ui/`; they run from this crate so that
//! trybuild builds them against the runtime without store features (no drivers).
//! Regenerate the expected output with `TRYBUILD=overwrite cargo test -p idempotent-macros --test ui`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("../tests/ui/fail/*.rs");
    t.pass("../tests/ui/pass/*.rs");
}
