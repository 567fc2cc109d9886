//! Hitless restarts (issue 11): what the tests of connection hand-off need.

mod support;

// The support's own tests run here, once, rather than in every test crate that shares
// `support`.
#[path = "support/idle_tests.rs"]
mod idle_tests;
#[path = "support/proxy_tests.rs"]
mod proxy_tests;
