//! The control socket: while `serve` (or `connect`) holds a library, the
//! commands that change it (`index`, `generate`, `trust`, `untrust`) and
//! `status` run inside that engine, sent over `<data>/control.sock`, as
//! Syncthing's CLI talks to its daemon. Only one engine may open a library
//! (the data directory's lock), so this is how a second command reaches it.
//!
//! Protocol: the client writes one JSON [`Request`] line; the server answers
//! with JSON [`Frame`] lines (output lines, progress, then `done` or
//! `failed`). The socket is owner-only (0600, in the 0700 data directory)
//! and the server also refuses a peer of another uid; a request line is
//! bounded and must arrive within a deadline; a few clients at a time.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sync_actors::SyncEngine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, info_span, warn};

use crate::ops;
use crate::output::{Output, Terminal};

/// The socket's name in a data directory.
pub const SOCKET_FILE: &str = "control.sock";

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Longest answer line a client reads.
const MAX_FRAME: u64 = 1024 * 1024;

/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Clients served at once; more wait for a slot.
const MAX_CLIENTS: usize = 8;

/// How often progress is sent to a client (the latest position only).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A command sent to the running engine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// `index PATH` (an absolute path, as bytes: any name is allowed).
    Index {
        /// The folder's path bytes.
        path: Vec<u8>,
        /// JSON output.
        json: bool,
    },
    /// `generate N --seed S`.
    Generate {
        /// Entries.
        entries: u64,
        /// Seed.
        seed: u64,
        /// JSON output.
        json: bool,
    },
    /// `trust FINGERPRINT --device ID`.
    Trust {
        /// The peer's fingerprint.
        fingerprint: String,
        /// The peer's device id.
        device: String,
    },
    /// `untrust FINGERPRINT|DEVICE`.
    Untrust {
        /// The fingerprint or device id.
        peer: String,
    },
    /// `status`.
    Status {
        /// JSON output.
        json: bool,
    },
}

impl Request {
    /// `index` of `path`, made absolute against this process's directory
    /// (the engine's may differ).
    pub fn index(path: &Path, json: bool) -> anyhow::Result<Request> {
        let path = std::path::absolute(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        Ok(Request::Index {
            path: path.as_os_str().as_bytes().to_vec(),
            json,
        })
    }
}

/// One line of the answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
enum Frame {
    /// A stdout line.
    Line { text: String },
    /// A stderr line.
    Warn { text: String },
    /// A progress display starts.
    Start { label: String, quiet: bool },
    /// The progress position.
    Progress { n: u64 },
    /// The progress display ends.
    Finish,
    /// The command succeeded.
    Done,
    /// The command failed: why.
    Failed { error: String },
}

/// The listening control socket of a running engine; removed when dropped.
pub struct ControlServer {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl ControlServer {
    /// Listens on `<data>/control.sock` for `engine`. The caller holds the
    /// data directory's lock (its engine does), so a socket file left there
    /// is a dead engine's and is replaced.
    pub fn start(data: &Path, engine: SyncEngine) -> anyhow::Result<ControlServer> {
        let path = data.join(SOCKET_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("cannot replace {}", path.display())),
        }
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let span = info_span!("control", device = %engine.device().device_id.fmt_short());
        let task = tokio::spawn(accept_loop(listener, engine).instrument(span));
        Ok(ControlServer { task, path })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, engine: SyncEngine) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(cause = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, &engine).await {
                warn!(cause = %format!("{e:#}"), "control request refused");
            }
            drop(slot);
        });
    }
}

/// Reads one request, runs it, streams its output and result back.
async fn serve_client(stream: UnixStream, engine: &SyncEngine) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let me = rustix::process::geteuid().as_raw();
    if cred.uid() != me {
        bail!(
            "control client of uid {} refused (the engine runs as uid {me})",
            cred.uid()
        );
    }
    let (read, mut write) = stream.into_split();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // Say why, so a client of another version sees it.
            let failed = Frame::Failed {
                error: format!("{e:#}"),
            };
            let mut line = serde_json::to_string(&failed).unwrap_or_default();
            line.push('\n');
            let _ = write.write_all(line.as_bytes()).await;
            return Err(e);
        }
        Err(_) => bail!("no request within {REQUEST_TIMEOUT:?}"),
    };
    tracing::info!(?request, "control request");
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let remote = Remote::new(tx);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let mut line = serde_json::to_string(&frame).unwrap_or_default();
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let result = dispatch(engine, request, &remote).await;
    remote.flush_progress();
    remote.send(match result {
        Ok(()) => Frame::Done,
        Err(e) => Frame::Failed {
            error: format!("{e:#}"),
        },
    });
    drop(remote);
    let _ = writer.await;
    Ok(())
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> anyhow::Result<Request> {
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST + 1))
        .read_line(&mut line)
        .await?;
    if line.len() as u64 > MAX_REQUEST {
        bail!("request longer than {MAX_REQUEST} bytes");
    }
    serde_json::from_str(line.trim_end()).context("malformed control request")
}

async fn dispatch(engine: &SyncEngine, request: Request, out: &Remote) -> anyhow::Result<()> {
    match request {
        Request::Index { path, json } => {
            ops::index(engine, Path::new(OsStr::from_bytes(&path)), json, out).await
        }
        Request::Generate {
            entries,
            seed,
            json,
        } => ops::generate(engine, entries, seed, json, out).await,
        Request::Trust {
            fingerprint,
            device,
        } => ops::trust(
            &engine.net_config().trust,
            engine.fingerprint(),
            &fingerprint,
            &device,
            out,
        ),
        Request::Untrust { peer } => ops::untrust(&engine.net_config().trust, &peer, out),
        Request::Status { json } => ops::status(engine, json, out).await,
    }
}

/// Output sent to a control client. Progress is kept as the latest
/// position and sent at most every [`PROGRESS_EVERY`], so a fast walk
/// cannot queue a frame per file.
struct Remote {
    tx: mpsc::UnboundedSender<Frame>,
    position: Arc<AtomicU64>,
    sent: AtomicU64,
    ticker: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Remote {
    fn new(tx: mpsc::UnboundedSender<Frame>) -> Remote {
        Remote {
            tx,
            position: Arc::new(AtomicU64::new(0)),
            sent: AtomicU64::new(0),
            ticker: std::sync::Mutex::new(None),
        }
    }

    fn send(&self, frame: Frame) {
        let _ = self.tx.send(frame);
    }

    /// Sends the latest progress position if it moved.
    fn flush_progress(&self) {
        let n = self.position.load(Ordering::Relaxed);
        if self.sent.swap(n, Ordering::Relaxed) != n {
            self.send(Frame::Progress { n });
        }
    }

    fn stop_ticker(&self) {
        if let Some(t) = self.ticker.lock().ok().and_then(|mut t| t.take()) {
            t.abort();
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop_ticker();
    }
}

impl Output for Remote {
    fn line(&self, text: &str) {
        self.send(Frame::Line { text: text.into() });
    }

    fn warn(&self, text: &str) {
        self.send(Frame::Warn { text: text.into() });
    }

    fn start(&self, label: &str, quiet: bool) {
        self.send(Frame::Start {
            label: label.into(),
            quiet,
        });
        self.position.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        let (tx, position) = (self.tx.clone(), self.position.clone());
        let ticker = tokio::spawn(async move {
            let mut sent = 0;
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let n = position.load(Ordering::Relaxed);
                if n != sent && tx.send(Frame::Progress { n }).is_err() {
                    return;
                }
                sent = n;
            }
        });
        self.stop_ticker();
        if let Ok(mut t) = self.ticker.lock() {
            *t = Some(ticker);
        }
    }

    fn progress_sink(&self) -> sync_actors::Progress {
        let position = self.position.clone();
        Arc::new(move |n| position.store(n, Ordering::Relaxed))
    }

    fn finish(&self) {
        self.stop_ticker();
        self.flush_progress();
        self.send(Frame::Finish);
    }
}

/// Sends `request` to the engine running on `data`, replaying its output
/// on this terminal. `Ok(None)`: no engine listens there (no socket, or a
/// dead engine's), so the caller runs the command itself.
pub async fn forward(data: &Path, request: &Request) -> anyhow::Result<Option<()>> {
    let path = data.join(SOCKET_FILE);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        // No engine there, a dead engine's socket, or a path too long for
        // a socket name (then no engine could listen on it either).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::InvalidInput
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e).context(format!("cannot reach the engine at {}", path.display())),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let terminal = Terminal::default();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_FRAME).read_line(&mut line).await?;
        if n == 0 {
            terminal.finish();
            bail!("the running engine closed the control connection before answering");
        }
        let frame: Frame = serde_json::from_str(line.trim_end())
            .context("malformed answer from the running engine")?;
        match frame {
            Frame::Line { text } => terminal.line(&text),
            Frame::Warn { text } => terminal.warn(&text),
            Frame::Start { label, quiet } => terminal.start(&label, quiet),
            Frame::Progress { n } => (terminal.progress_sink())(n),
            Frame::Finish => terminal.finish(),
            Frame::Done => return Ok(Some(())),
            Frame::Failed { error } => {
                terminal.finish();
                bail!("{error}");
            }
        }
    }
}
