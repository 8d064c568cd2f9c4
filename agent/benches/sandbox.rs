//! Sandbox benchmarks (being written).
fn main() {}
