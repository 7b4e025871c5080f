//! Crash points for the chaos tests: named places in the engine where a
//! test can have the process killed (SIGKILL, no cleanup of any kind), to
//! show that a crash at that exact moment loses nothing.
//!
//! Only with the `crash-points` feature; without it [`crash_point`] is an
//! empty inline function. With it, `LSYNC_CRASH_AT=<site>:<n>` in the
//! environment kills the process on the `n`th time (from 1) it reaches
//! `site`. The sites are listed in [`SITES`].

/// Every crash point site, with where it sits.
pub const SITES: &[(&str, &str)] = &[
    (
        "index.walk",
        "the indexer's folder walk, at a progress tick",
    ),
    (
        "commit.txn",
        "a local commit, after one of its transactions committed",
    ),
    ("send.batch", "the sender, after a state batch was queued"),
    (
        "apply.batch",
        "the receiver, after a batch was applied, before its ack",
    ),
    (
        "export.built",
        "snapshot export, file written, not yet hashed",
    ),
    (
        "export.hashed",
        "snapshot export, file hashed, manifest not yet saved",
    ),
    (
        "download.chunk",
        "snapshot download, after a chunk and its state were saved",
    ),
    (
        "import.verified",
        "snapshot import, file verified, nothing copied yet",
    ),
    (
        "import.copied",
        "snapshot import, copy committed, download files not yet removed",
    ),
];

/// Reaching a crash point: kills the process if the environment asks for
/// this site and this is the asked-for hit (feature `crash-points`).
#[inline]
pub fn crash_point(site: &'static str) {
    #[cfg(feature = "crash-points")]
    armed::hit(site);
    #[cfg(not(feature = "crash-points"))]
    let _ = site;
}

#[cfg(feature = "crash-points")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    fn plan() -> &'static Option<(String, u64)> {
        PLAN.get_or_init(|| {
            let v = std::env::var("LSYNC_CRASH_AT").ok()?;
            let (site, n) = v.rsplit_once(':')?;
            Some((site.to_string(), n.parse().ok()?))
        })
    }

    pub(super) fn hit(site: &'static str) {
        let Some((want, n)) = plan() else { return };
        if want != site {
            return;
        }
        if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("crash point {site} (hit {n}): SIGKILL");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
            // SIGKILL cannot be caught; if it somehow failed, die anyway.
            std::process::abort();
        }
    }
}
