//! `lsync-chaos`: the `lsync` command line built with crash points
//! (`sync-core/crash-points`), for the process-level chaos tests in
//! `crash.rs`. `LSYNC_CRASH_AT=<site>:<n>` SIGKILLs it at a named moment.

fn main() {
    sync_cli::main();
}
