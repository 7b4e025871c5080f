//! The `lsync` binary.

fn main() {}
