//! The `lsync` command line as a library: demo, bench, and a device's
//! lifecycle (init, id, invite, join, trust, untrust, trusted, index,
//! generate, serve, connect, status).
//! `src/main.rs` is the `lsync` binary; the workspace tests build the same
//! entry point into their own binary to drive it as separate processes.

mod bench;
mod cli;
mod control;
mod demo;
mod device;
mod generate;
mod ops;
mod output;
mod progress;
mod sync;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Parses the command line, runs the command, exits non-zero with one line
/// on stderr when it fails.
pub fn main() {
    let cli = Cli::parse();
    // Logs go to stderr under RUST_LOG; by default only `serve` logs, so
    // other commands print their one line of error and nothing else.
    let default_log = match cli.command {
        Command::Serve { .. } => "info",
        _ => "off",
    };
    init_tracing(default_log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        fail(e);
    }
}

/// One clear line on stderr and a non-zero exit; no backtrace.
fn fail(e: anyhow::Error) -> ! {
    eprintln!("error: {e:#}");
    std::process::exit(1);
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let data = cli.data();
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Init { name, library } => device::init(&data?, name, library).await,
        Command::Id { json } => device::id(&data?, json).await,
        Command::Invite { address, json } => device::invite(&data?, address, json).await,
        Command::Join {
            invite,
            name,
            address,
            json,
        } => device::join(&data?, &invite, name, address, json).await,
        Command::Trust {
            fingerprint,
            device,
        } => device::trust(&data?, &fingerprint, &device).await,
        Command::Untrust { peer } => device::untrust(&data?, &peer).await,
        Command::Trusted { json } => device::trusted(&data?, json).await,
        Command::Index { path, json } => device::index(&data?, &path, json).await,
        Command::Generate {
            entries,
            seed,
            json,
        } => generate::run(&data?, entries, seed, json).await,
        Command::Serve {
            listen,
            index,
            rescan,
            tuning,
        } => sync::serve(&data?, &listen, &index, rescan, tuning).await,
        Command::Connect {
            addr,
            until_synced,
            json,
            timeout,
        } => sync::connect(&data?, &addr, until_synced, json, timeout).await,
        Command::Status { json } => device::status(&data?, json).await,
        Command::BenchNode(args) => bench::node::run(&data?, args).await,
    }
}
