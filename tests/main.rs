//! Workspace integration tests: one test binary, modules share the `harness`.
