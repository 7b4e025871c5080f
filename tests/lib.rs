//! Integration-test crate: the tests live in `main.rs` and its modules.
