//! Command-line arguments (the contract users' scripts rely on).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

/// Bulk entry sync between a user's devices.
#[derive(Parser, Debug)]
#[command(name = "lsync", version, about)]
pub struct Cli {
    /// The device's data directory.
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The `--data` directory, required by device commands.
    pub fn data(&self) -> anyhow::Result<PathBuf> {
        match &self.data {
            Some(d) => Ok(d.clone()),
            None => bail!("this command needs --data DIR"),
        }
    }
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Two embedded devices, paired and synced, with a summary.
    Demo(DemoArgs),
    /// The benchmark: sender and receiver as two processes.
    Bench(BenchArgs),
    /// Create a device: library, key, certificate.
    Init {
        /// Device name.
        #[arg(long)]
        name: Option<String>,
        /// Join an existing library (its id, from `lsync id` on another device).
        #[arg(long)]
        library: Option<String>,
    },
    /// Print the device id and certificate fingerprint.
    Id {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Pin a peer's certificate fingerprint.
    Trust {
        /// The peer's fingerprint (`lsync id` on the peer).
        fingerprint: String,
        /// The peer's device id (otherwise learned at the first handshake).
        #[arg(long)]
        device: Option<String>,
    },
    /// Index a real folder as a location.
    Index {
        /// The folder.
        path: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Generate a synthetic, realistic location.
    Generate {
        /// Number of entries.
        #[arg(long)]
        entries: u64,
        /// Seed of the tree's shape.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Accept trusted peers and sync until SIGINT/SIGTERM.
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:7000.
        #[arg(long)]
        listen: String,
    },
    /// Connect to a peer and sync.
    Connect {
        /// The peer's address.
        addr: String,
        /// Exit 0 once both devices hold each other's records.
        #[arg(long)]
        until_synced: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds (with --until-synced).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Per owner: entries, tombstones, seq or watermark, fingerprint.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One process of `lsync bench` (sender, receiver or floor); internal.
    #[command(hide = true)]
    BenchNode(crate::bench::NodeArgs),
}

/// `lsync demo` arguments.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Entries to generate on device A.
    #[arg(long, default_value_t = 1_000_000, conflicts_with = "path")]
    pub entries: u64,
    /// Index this real folder on device A instead.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// `lsync bench` arguments.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Entries in the generated location.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Also write BENCHMARKS plot data for several sizes (10K, 100K, N).
    #[arg(long)]
    pub sweep: bool,
}
