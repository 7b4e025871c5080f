//! Where a command's output goes: this terminal, or (for a command sent to
//! a running engine over its control socket) the client that sent it, which
//! replays it on its own terminal. One command body serves both.

use std::sync::{Arc, Mutex};

use indicatif::ProgressBar;

use crate::progress;

/// A command's output: stdout lines, stderr lines and one progress counter.
pub trait Output: Send + Sync {
    /// A line of the command's result (stdout).
    fn line(&self, text: &str);
    /// A warning or detail for a person (stderr).
    fn warn(&self, text: &str);
    /// Starts a progress display (hidden for `--json`).
    fn start(&self, label: &str, quiet: bool);
    /// A callback setting the progress position (it may outlive the call).
    fn progress_sink(&self) -> sync_actors::Progress;
    /// Clears the progress display.
    fn finish(&self);
}

/// This process's stdout, stderr and a progress counter on stderr.
#[derive(Default)]
pub struct Terminal {
    bar: Mutex<Option<ProgressBar>>,
}

impl Output for Terminal {
    fn line(&self, text: &str) {
        println!("{text}");
    }

    fn warn(&self, text: &str) {
        eprintln!("{text}");
    }

    fn start(&self, label: &str, quiet: bool) {
        if let Ok(mut bar) = self.bar.lock() {
            *bar = Some(progress::counter(label, quiet));
        }
    }

    fn progress_sink(&self) -> sync_actors::Progress {
        let bar = self.bar.lock().ok().and_then(|b| b.clone());
        Arc::new(move |n| {
            if let Some(b) = &bar {
                b.set_position(n);
            }
        })
    }

    fn finish(&self) {
        if let Ok(mut bar) = self.bar.lock()
            && let Some(b) = bar.take()
        {
            b.finish_and_clear();
        }
    }
}
