//! Workspace integration tests: one test binary, modules share the `harness`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod correctness;
mod crash;
mod dialing;
mod disk_full;
mod faults;
mod gc;
mod given_up;
mod harness;
mod hostile;
mod hostile_bytes;
mod hostile_orders;
mod hostile_verify;
mod indexer;
mod load;
mod pairing;
mod restore;
mod simulation;
mod strategies;
mod tidy;
mod verify;
