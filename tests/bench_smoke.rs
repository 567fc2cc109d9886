//! Smoke test of the benchmark harness (`benches/handover.rs`): one run in quick mode (tiny
//! sizes, a few seconds), checking that every scenario runs to the end and leaves no process
//! behind. The numbers are not judged here (test profile, tiny sizes): that is what
//! `cargo bench --bench handover` is for.

// The harness itself, compiled into this test; its `main` (the bench's entry point) is unused.
#[allow(dead_code)]
#[path = "../benches/handover.rs"]
mod bench;

#[test]
fn quick_bench_run_completes_and_leaves_no_process() {
    assert!(
        bench::run(bench::Config::from_env(true)),
        "the bench harness reported errors; see its output above"
    );
}
