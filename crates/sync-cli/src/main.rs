//! `lsync`: the command-line face of the sync engine — demo, bench, and a
//! device's lifecycle: init, id, trust, index, generate, serve, connect, status.

fn main() {
    sync_cli::main();
}
