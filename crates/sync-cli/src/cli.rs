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
        /// Create it in an existing library (its id, from `lsync id` on
        /// another device); `join` does this and pairs the two.
        #[arg(long)]
        library: Option<String>,
    },
    /// Print the device id and certificate fingerprint.
    Id {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print a pairing string for another device: `lsync join STRING` there.
    Invite {
        /// An address the other device can dial this one at (HOST:PORT),
        /// carried in the string.
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Pair with the device that printed this string (`lsync invite`):
    /// creates this device in its library if `--data` holds none (checks
    /// the library otherwise), pins the other device, and prints what to
    /// run on it to pin this one back.
    Join {
        /// The pairing string.
        invite: String,
        /// Device name, if this creates the device.
        #[arg(long)]
        name: Option<String>,
        /// An address the other device can dial this one at (HOST:PORT),
        /// carried in the reply string.
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Pin a peer's certificate as its device id (for scripts; `invite`
    /// and `join` do it for you). A pin is never replaced: `untrust` first.
    Trust {
        /// The peer's fingerprint (`lsync id` on the peer).
        fingerprint: String,
        /// The peer's device id (`lsync id` on the peer).
        #[arg(long)]
        device: String,
    },
    /// Remove a peer's pin: a running `serve` or `connect` closes its
    /// sessions at once, and its handshakes are refused from then on.
    Untrust {
        /// The peer's certificate fingerprint or device id.
        peer: String,
    },
    /// List the pinned peers.
    Trusted {
        /// JSON output.
        #[arg(long)]
        json: bool,
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
        /// Index this folder while serving (repeatable). It is re-indexed on
        /// every start; its changes reach peers as they are committed.
        #[arg(long = "index", value_name = "PATH")]
        index: Vec<PathBuf>,
        /// Re-index the folders every this many seconds (a rescan; without
        /// it they are indexed once).
        #[arg(long, value_name = "SECS")]
        rescan: Option<f64>,
        #[command(flatten)]
        tuning: Tuning,
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
/// Engine tuning for tests and experiments (hidden from help).
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// Records per state batch.
    #[arg(long, hide = true)]
    pub batch_size: Option<usize>,
    /// Pending records from which a peer gets a bulk notice and pulls.
    #[arg(long, hide = true)]
    pub bulk_from: Option<u64>,
    /// Pending records from which a peer holding nothing gets a snapshot.
    #[arg(long, hide = true)]
    pub snapshot_from: Option<u64>,
}

impl Tuning {
    /// Applies the options given to an engine configuration.
    pub fn apply(self, config: &mut sync_actors::EngineConfig) {
        if let Some(n) = self.batch_size {
            config.batch_size = n;
        }
        if let Some(n) = self.bulk_from {
            config.thresholds.bulk_from = n;
        }
        if let Some(n) = self.snapshot_from {
            config.thresholds.snapshot_from = n;
        }
    }
}

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
