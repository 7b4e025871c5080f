//! Workspace integration tests: one test binary, modules share the `harness`.

mod faults;
mod harness;
mod hostile;
mod strategies;
mod tidy;
