//! The compile errors a wrong service gives are the ones `HttpService`'s docs quote: the
//! two make-service shapes axum users try first, and a router without its state, are each
//! reported as "`X` is not a service handover can serve", with the notes that say what to
//! pass instead. `tests/compile_fail/*.stderr` hold rustc's exact output (trybuild erases line
//! numbers outside the case file, so edits elsewhere in src/ do not break them; a new rustc
//! may word things differently: `TRYBUILD=overwrite cargo test --all-features --test
//! compile_errors`, then read the diff).

#[test]
fn a_wrong_service_is_reported_with_handovers_note() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/compile_fail/*.rs");
}
