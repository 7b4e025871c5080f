//! `lsync bench`: the benchmark (built by the benchmark issue).

use crate::cli::BenchArgs;

/// Runs the benchmark.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`lsync bench` is not built yet")
}
