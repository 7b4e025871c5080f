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
//! bounded and must arrive within a deadline.
//!
//! A client cannot hold the engine up: a connection waiting for its
//! request takes no command slot (a few commands run at once, more wait),
//! past [`MAX_CONNECTIONS`] open connections a new one is refused at once
//! rather than left hanging, and a client that stops reading its answer is
//! dropped after [`WRITE_TIMEOUT`]. A command whose client goes away (Ctrl-C
//! on a forwarded `index`) still runs to its end inside the engine, as it
//! would have if started there: its commits are transactional either way.

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
use sync_storage::DirLock;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, info_span, warn};

use crate::device::start_engine;
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

/// Commands run at once; more wait for a slot (told so).
const MAX_RUNNING: usize = 8;

/// Connections open at once (reading their request, waiting or running);
/// past it a new connection is refused at once.
const MAX_CONNECTIONS: usize = 64;

/// A client must take each answer line within this, or it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a command waits for the control socket of an engine that holds
/// the library but does not listen yet (it is starting).
const STARTUP_GRACE: Duration = Duration::from_secs(5);

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
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let running = Arc::new(Semaphore::new(MAX_RUNNING));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(cause = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(open) = connections.clone().try_acquire_owned() else {
            // Refused at once, never awaited: the answer fits in the new
            // socket's empty buffer, and this loop must not wait on a client.
            warn!("control connection refused: {MAX_CONNECTIONS} already open");
            let _ = stream.try_write(&frame_line(&Frame::Failed {
                error: format!(
                    "too many control connections open ({MAX_CONNECTIONS}): try again later"
                ),
            }));
            continue;
        };
        let (engine, running) = (engine.clone(), running.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, &engine, &running).await {
                warn!(cause = %format!("{e:#}"), "control request refused");
            }
            drop(open);
        });
    }
}

/// `frame` as one answer line.
fn frame_line(frame: &Frame) -> Vec<u8> {
    let mut line = serde_json::to_vec(frame).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Reads one request (holding no command slot), waits for a slot, runs the
/// request, streams its output and result back.
async fn serve_client(
    stream: UnixStream,
    engine: &SyncEngine,
    running: &Arc<Semaphore>,
) -> anyhow::Result<()> {
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
            let _ =
                tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&frame_line(&failed))).await;
            return Err(e);
        }
        Err(_) => bail!("no request within {REQUEST_TIMEOUT:?}"),
    };
    tracing::info!(?request, "control request");
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let remote = Remote::new(tx);
    let writer = tokio::spawn(write_frames(rx, write, WRITE_TIMEOUT));
    let slot = match running.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            remote.warn(&format!(
                "waiting: {MAX_RUNNING} commands are running in the engine"
            ));
            running.clone().acquire_owned().await?
        }
    };
    let result = dispatch(engine, request, &remote).await;
    drop(slot);
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

/// Writes the answer's frames as they come, until the channel closes; gives
/// up on a client that takes none of a line within `timeout` (it stopped
/// reading), so it cannot keep its connection, or queue frames, forever.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::UnboundedReceiver<Frame>,
    mut write: W,
    timeout: Duration,
) {
    while let Some(frame) = rx.recv().await {
        match tokio::time::timeout(timeout, write.write_all(&frame_line(&frame))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                warn!("control client stopped reading its answer: dropped after {timeout:?}");
                return;
            }
        }
    }
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
            let path = Path::new(OsStr::from_bytes(&path));
            // The engine's working directory is not the client's.
            if !path.is_absolute() {
                bail!(
                    "index path {} is relative: send an absolute path",
                    path.display()
                );
            }
            if path.as_os_str().as_bytes().contains(&0) {
                bail!("index path {} holds a NUL byte", path.display());
            }
            ops::index(engine, path, json, out).await
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
    match write.write_all(line.as_bytes()).await {
        Ok(()) => {}
        // The engine may refuse (too many connections) and close before
        // the request is written: its answer is still there to read.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(e).context("cannot send the command to the running engine"),
    }
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

/// Where a command that changes the library runs.
pub enum Route {
    /// The engine holding the library ran it (its output was replayed).
    Forwarded,
    /// No engine held the library: this one, started for the command.
    Local(SyncEngine),
}

/// Sends `request` to the engine holding `data`, or starts one here if
/// none does. An engine that holds the library but does not listen yet (a
/// `serve` starting: the lock is taken before the socket is bound) is
/// waited for up to [`STARTUP_GRACE`]; one that never listens (its data
/// path too long for a socket name) is named in the error.
pub async fn route(data: &Path, request: &Request) -> anyhow::Result<Route> {
    let deadline = tokio::time::Instant::now() + STARTUP_GRACE;
    loop {
        if forward(data, request).await?.is_some() {
            return Ok(Route::Forwarded);
        }
        let held = match DirLock::holder(data) {
            None => match start_engine(data).await {
                Ok(engine) => return Ok(Route::Local(engine)),
                // Taken since the probe: by an engine that is starting.
                Err(e) => match DirLock::holder(data) {
                    Some(pid) => pid,
                    None => return Err(e),
                },
            },
            Some(pid) => pid,
        };
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "data directory {} is in use by another engine ({}) that takes no commands: \
                 it has no control socket at {} (a data directory path too long for a socket \
                 name?); run this once it has stopped",
                data.display(),
                held.map(|p| format!("pid {p}"))
                    .unwrap_or_else(|| "pid unknown".into()),
                data.join(SOCKET_FILE).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Attack: a client sends a request and never reads the answer. The
    /// writer gives up once a line stays unwritten for its timeout, so the
    /// connection (and the frames queued for it) does not live forever.
    #[tokio::test]
    async fn a_client_that_never_reads_is_dropped() {
        // A tiny buffer whose other end is kept open and never read.
        let (client, server) = tokio::io::duplex(64);
        let (tx, rx) = mpsc::unbounded_channel();
        for i in 0..100 {
            tx.send(Frame::Line {
                text: format!("line {i}"),
            })
            .unwrap();
        }
        let writer = tokio::spawn(write_frames(rx, server, Duration::from_millis(200)));
        let ended = tokio::time::timeout(Duration::from_secs(10), writer).await;
        assert!(
            ended.is_ok(),
            "the writer waits forever on a client that does not read"
        );
        // The channel is closed: what the command still sends is dropped.
        assert!(tx.send(Frame::Done).is_err());
        drop(client);
    }
}
