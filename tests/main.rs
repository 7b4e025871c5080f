//! Workspace integration tests: one test binary, modules share the `harness`.

mod harness;
mod faults;
mod strategies;
