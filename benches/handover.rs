//! Benchmark harness (see README, "Benchmarks"). Placeholder until written.
fn main() {}
