//! `Connection`: an authenticated peer link after the `Hello` exchange,
//! split into a `ConnReader` and a cloneable `ConnWriter` (a writer task
//! owns the write half, drains a bounded queue and sends keepalives).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sync_core::untrusted::for_log;
use sync_core::{DeviceId, ErrorCode, FrameCodec, Limits, Message, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::NetConfig;
use crate::error::{NetError, map_io_error};
use crate::fingerprint::CertFingerprint;

/// Any byte stream a connection can run over (TLS over TCP, a duplex pipe, a fault wrapper).
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {}
/// A boxed [`AsyncStream`].
pub(crate) type BoxStream = Box<dyn AsyncStream>;

/// The largest `Hello` (or refusal) accepted before the peer is authenticated by `Hello`.
const HELLO_MAX_FRAME: usize = 64 << 10;
/// Frames below this size are coalesced into one write.
const COALESCE_BELOW: usize = 16 << 10;
/// Flush the coalescing buffer when it grows past this size.
const COALESCE_MAX: usize = 256 << 10;
/// Read buffer headroom kept before each read.
const READ_CHUNK: usize = 64 << 10;

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's DeviceId: from its `Hello`, checked against the pin of its certificate.
    pub device: DeviceId,
    /// The peer's human-readable name (from its `Hello`; not authenticated;
    /// bounded and escaped by [`sync_core::untrusted::for_log`]).
    pub name: String,
    /// The peer's socket address, or `"memory"` for in-memory connections.
    pub addr: String,
    /// The fingerprint of the peer's certificate.
    pub fingerprint: CertFingerprint,
}

/// An established, authenticated connection to a peer.
///
/// "Established" means that OUR checks passed (TLS pin, then the peer's
/// `Hello`). Both sides send `Hello` without waiting for a verdict, so when
/// only the peer refuses us (say it pinned our certificate to another
/// DeviceId), its refusal arrives as the first frame: the first `recv`
/// returns `Err(NetError::Refused { .. })`.
#[derive(Debug)]
pub struct Connection {
    /// Who the peer is.
    pub peer: PeerInfo,
    reader: ConnReader,
    writer: ConnWriter,
}

impl Connection {
    /// Splits the connection into its peer info, reader and writer.
    pub fn split(self) -> (PeerInfo, ConnReader, ConnWriter) {
        (self.peer, self.reader, self.writer)
    }

    /// A handle on the connection's writer (cloneable).
    pub fn writer(&self) -> ConnWriter {
        self.writer.clone()
    }

    /// Receives the next message; see [`ConnReader::recv`].
    pub async fn recv(&mut self) -> Result<Option<Message>, NetError> {
        self.reader.recv().await
    }

    /// Sends a message; see [`ConnWriter::send`].
    pub async fn send(&self, msg: Message) -> Result<(), NetError> {
        self.writer.send(msg).await
    }
}

/// Reads frames from one connection.
pub struct ConnReader {
    io: ReadHalf<BoxStream>,
    buf: BytesMut,
    codec: FrameCodec,
    idle_timeout: Duration,
    eof: bool,
    span: tracing::Span,
    // Keeps the listener's connection slot while either half lives.
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for ConnReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnReader")
            .field("buffered", &self.buf.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl ConnReader {
    /// The next message from the peer. `Ok(None)`: the peer closed the
    /// connection cleanly. Keepalive frames are swallowed. A `Message::Error`
    /// from the peer is returned as `Err(NetError::Refused { .. })`.
    /// `Err(NetError::Idle)` when nothing at all (not even a keepalive)
    /// arrived within `idle_timeout`, including a peer stalled mid-frame.
    pub async fn recv(&mut self) -> Result<Option<Message>, NetError> {
        let span = self.span.clone();
        async {
            loop {
                let decoded = if self.eof {
                    self.codec.decode_eof(&mut self.buf)
                } else {
                    self.codec.decode(&mut self.buf)
                };
                match decoded {
                    Ok(Some(Message::Keepalive)) => {
                        tracing::trace!("keepalive");
                        continue;
                    }
                    Ok(Some(Message::Error { code, message })) => {
                        // The peer's text: bounded and escaped before it
                        // reaches any log line or event.
                        let message = for_log(&message).into_owned();
                        tracing::debug!(?code, %message, "peer sent an error");
                        return Err(NetError::Refused { code, message });
                    }
                    Ok(Some(msg)) => return Ok(Some(msg)),
                    Ok(None) if self.eof => return Ok(None),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "undecodable frame");
                        return Err(NetError::Decode(e));
                    }
                }
                self.fill().await?;
            }
        }
        .instrument(span)
        .await
    }

    /// Reads more bytes into the buffer, under the idle timeout.
    async fn fill(&mut self) -> Result<(), NetError> {
        self.buf.reserve(READ_CHUNK);
        let n = tokio::time::timeout(self.idle_timeout, self.io.read_buf(&mut self.buf))
            .await
            .map_err(|_| NetError::Idle)?
            .map_err(map_io_error)?;
        if n == 0 {
            self.eof = true;
        }
        Ok(())
    }

    /// Reads exactly one frame without any special handling (the handshake's `Hello`).
    async fn next_raw(&mut self) -> Result<Option<Message>, NetError> {
        loop {
            let decoded = if self.eof {
                self.codec.decode_eof(&mut self.buf)
            } else {
                self.codec.decode(&mut self.buf)
            };
            match decoded? {
                Some(msg) => return Ok(Some(msg)),
                None if self.eof => return Ok(None),
                None => self.fill().await?,
            }
        }
    }
}

enum Cmd {
    Frame(Bytes),
    Close(oneshot::Sender<()>),
}

/// Sends frames to one connection. Clones share the same bounded queue and writer task.
#[derive(Clone)]
pub struct ConnWriter {
    tx: mpsc::Sender<Cmd>,
    codec: FrameCodec,
    bytes_sent: Arc<AtomicU64>,
    abort: CancellationToken,
}

impl std::fmt::Debug for ConnWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnWriter")
            .field("bytes_sent", &self.bytes_sent())
            .field("closed", &self.tx.is_closed())
            .finish_non_exhaustive()
    }
}

impl ConnWriter {
    fn encode(&self, msg: &Message) -> Result<Bytes, NetError> {
        let mut buf = BytesMut::new();
        self.codec.encode_frame(msg, &mut buf)?;
        Ok(buf.freeze())
    }

    /// Queues a message. Waits while the queue (`outbound_queue` frames) is
    /// full: backpressure from a slow peer reaches the caller. The frame is
    /// encoded here, so an oversized message fails with `NetError::Encode`.
    /// `Err(NetError::Closed)` once the connection is closed or broken.
    pub async fn send(&self, msg: Message) -> Result<(), NetError> {
        let frame = self.encode(&msg)?;
        self.tx
            .send(Cmd::Frame(frame))
            .await
            .map_err(|_| NetError::Closed)
    }

    /// Queues a message without waiting: `Err(NetError::QueueFull)` when the queue is full.
    pub fn try_send(&self, msg: Message) -> Result<(), NetError> {
        let frame = self.encode(&msg)?;
        self.tx.try_send(Cmd::Frame(frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NetError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => NetError::Closed,
        })
    }

    /// Writes every frame queued before this call, then shuts down the
    /// write side (TLS close_notify): the peer's reader sees a clean close.
    /// Later sends fail with `NetError::Closed`.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Cmd::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Drops the connection now: queued frames are discarded and the
    /// writer task ends without waiting on the peer (a revoked peer gets
    /// nothing more). The socket closes once the reader is dropped too.
    pub fn abort(&self) {
        self.abort.cancel();
    }

    /// Resolves once the writer task has ended (the link broke or was
    /// closed): a reader blocked on a silent peer can stop waiting.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Total bytes of frames written to the stream so far (keepalives included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Whether the writer task has stopped (closed, or the stream broke).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Writes `data` fully, failing if no progress is made within `stall`.
async fn write_all_timed(
    io: &mut WriteHalf<BoxStream>,
    mut data: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = tokio::time::timeout(stall, io.write(data))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

struct WriterTask {
    io: WriteHalf<BoxStream>,
    rx: mpsc::Receiver<Cmd>,
    keepalive: Bytes,
    keepalive_interval: Duration,
    stall: Duration,
    bytes_sent: Arc<AtomicU64>,
    abort: CancellationToken,
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl WriterTask {
    async fn run(mut self) {
        let abort = self.abort.clone();
        tokio::select! {
            res = self.serve() => match res {
                Ok(()) => tracing::debug!("writer closed"),
                Err(e) => tracing::debug!(error = %map_io_error(e), "writer stopped"),
            },
            () = abort.cancelled() => tracing::debug!("writer aborted"),
        }
    }

    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        write_all_timed(&mut self.io, data, self.stall).await?;
        self.bytes_sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        let mut batch = BytesMut::new();
        loop {
            let first = match tokio::time::timeout(self.keepalive_interval, self.rx.recv()).await {
                Ok(Some(cmd)) => cmd,
                Ok(None) => break,
                Err(_) => Cmd::Frame(self.keepalive.clone()),
            };
            let mut close = None;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Cmd::Frame(frame) if frame.len() >= COALESCE_BELOW => {
                        if !batch.is_empty() {
                            self.write(&batch).await?;
                            batch.clear();
                        }
                        self.write(&frame).await?;
                    }
                    Cmd::Frame(frame) => {
                        batch.extend_from_slice(&frame);
                        if batch.len() >= COALESCE_MAX {
                            self.write(&batch).await?;
                            batch.clear();
                        }
                    }
                    Cmd::Close(ack) => {
                        close = Some(ack);
                        break;
                    }
                }
                next = self.rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.write(&batch).await?;
                batch.clear();
            }
            tokio::time::timeout(self.stall, self.io.flush())
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "flush stalled")
                })??;
            if let Some(ack) = close {
                self.rx.close();
                let res = self.shutdown().await;
                let _ = ack.send(());
                return res;
            }
        }
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        tokio::time::timeout(self.stall, self.io.shutdown())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "shutdown stalled"))?
    }
}

/// Everything needed to run the `Hello` exchange on an established stream.
pub(crate) struct Establish<'a> {
    pub config: &'a NetConfig,
    pub addr: String,
    /// Fingerprint of the peer's certificate (from TLS, or the peer's config in memory).
    pub peer_fp: CertFingerprint,
    /// The protocol version we announce (tests override it).
    pub protocol: u32,
    pub permit: Option<Arc<OwnedSemaphorePermit>>,
    /// Set once `Hello` is exchanged (fault injection starts there).
    pub arm: Option<Arc<AtomicBool>>,
}

impl<'a> Establish<'a> {
    pub(crate) fn new(config: &'a NetConfig, addr: String, peer_fp: CertFingerprint) -> Self {
        Establish {
            config,
            addr,
            peer_fp,
            protocol: PROTOCOL_VERSION,
            permit: None,
            arm: None,
        }
    }
}

async fn write_frame(
    io: &mut WriteHalf<BoxStream>,
    codec: &FrameCodec,
    msg: &Message,
) -> Result<(), NetError> {
    let mut buf = BytesMut::new();
    codec.encode_frame(msg, &mut buf)?;
    io.write_all(&buf).await.map_err(map_io_error)?;
    io.flush().await.map_err(map_io_error)?;
    Ok(())
}

/// Sends a typed refusal, closes, and returns `err`.
async fn refuse(
    mut wr: WriteHalf<BoxStream>,
    codec: &FrameCodec,
    code: ErrorCode,
    err: NetError,
) -> NetError {
    let msg = Message::Error {
        code,
        message: err.to_string(),
    };
    if let Err(e) = write_frame(&mut wr, codec, &msg).await {
        tracing::debug!(error = %e, "could not send refusal");
    }
    let _ = wr.shutdown().await;
    err
}

/// Sends `Error { Busy }` instead of `Hello` and closes.
pub(crate) async fn refuse_busy(stream: BoxStream, config: &NetConfig) {
    let (_rd, wr) = tokio::io::split(stream);
    let codec = FrameCodec::new(config.limits);
    let _ = refuse(wr, &codec, ErrorCode::Busy, NetError::TooManyConnections).await;
}

/// Runs the `Hello` exchange over an authenticated stream: both sides send
/// `Hello` first; protocol and library must match and the peer's DeviceId
/// must be the one pinned for its certificate (never our own).
/// On mismatch a typed `Message::Error` is sent before closing.
pub(crate) async fn establish(stream: BoxStream, e: Establish<'_>) -> Result<Connection, NetError> {
    let config = e.config;
    let Some(pinned) = config.trust.lookup(&e.peer_fp) else {
        return Err(NetError::UnknownCertificate);
    };
    let (rd, mut wr) = tokio::io::split(stream);
    let codec = FrameCodec::new(config.limits);
    let hello_codec = FrameCodec::new(Limits {
        max_frame: config.limits.max_frame.min(HELLO_MAX_FRAME),
        max_decompressed: config.limits.max_decompressed.min(HELLO_MAX_FRAME),
        ..config.limits
    });
    let ours = Message::Hello {
        protocol: e.protocol,
        device: config.identity.device_id,
        library: config.library,
        name: config.name.clone(),
    };
    write_frame(&mut wr, &codec, &ours).await?;

    let mut reader = ConnReader {
        io: rd,
        buf: BytesMut::new(),
        codec: hello_codec,
        idle_timeout: config.handshake_timeout,
        eof: false,
        span: tracing::Span::none(),
        _permit: e.permit.clone(),
    };
    let first = match reader.next_raw().await {
        Ok(Some(msg)) => msg,
        Ok(None) => return Err(NetError::Closed),
        Err(NetError::Decode(d)) => {
            let err = NetError::Decode(d);
            return Err(refuse(wr, &codec, ErrorCode::Malformed, err).await);
        }
        Err(NetError::Idle) => return Err(NetError::HandshakeTimeout),
        Err(other) => return Err(other),
    };
    let (device, name) = match first {
        Message::Hello {
            protocol,
            device,
            library,
            name,
        } => {
            if protocol != e.protocol {
                let err = NetError::ProtocolMismatch {
                    ours: e.protocol,
                    theirs: protocol,
                };
                return Err(refuse(wr, &codec, ErrorCode::ProtocolMismatch, err).await);
            }
            if library != config.library {
                return Err(refuse(
                    wr,
                    &codec,
                    ErrorCode::LibraryMismatch,
                    NetError::LibraryMismatch,
                )
                .await);
            }
            // The pin holds exactly one device id, never ours: a peer is
            // who its certificate was pinned as, whatever its Hello says.
            if pinned != device || device == config.identity.device_id {
                let err = NetError::IdentityMismatch {
                    claimed: device,
                    pinned,
                };
                return Err(refuse(wr, &codec, ErrorCode::IdentityMismatch, err).await);
            }
            (device, for_log(&name).into_owned())
        }
        Message::Error { code, message } => {
            return Err(if code == ErrorCode::Busy {
                NetError::TooManyConnections
            } else {
                NetError::Refused {
                    code,
                    message: for_log(&message).into_owned(),
                }
            });
        }
        other => {
            let err = NetError::Unexpected(other.kind());
            return Err(refuse(wr, &codec, ErrorCode::Unexpected, err).await);
        }
    };
    if let Some(arm) = &e.arm {
        arm.store(true, Ordering::SeqCst);
    }

    let peer = PeerInfo {
        device,
        name,
        addr: e.addr,
        fingerprint: e.peer_fp,
    };
    let span = tracing::info_span!("conn", peer = %peer.addr, device = %device.fmt_short());
    span.in_scope(|| tracing::debug!(name = %peer.name, "connection established"));

    reader.codec = codec;
    reader.idle_timeout = config.idle_timeout;
    reader.span = span.clone();

    let (tx, rx) = mpsc::channel(config.outbound_queue.max(1));
    let bytes_sent = Arc::new(AtomicU64::new(0));
    let abort = CancellationToken::new();
    let mut keepalive = BytesMut::new();
    codec.encode_frame(&Message::Keepalive, &mut keepalive)?;
    let task = WriterTask {
        io: wr,
        rx,
        keepalive: keepalive.freeze(),
        keepalive_interval: config.keepalive_interval,
        stall: config.idle_timeout,
        bytes_sent: bytes_sent.clone(),
        abort: abort.clone(),
        _permit: e.permit,
    };
    tokio::spawn(task.run().instrument(span));
    Ok(Connection {
        peer,
        reader,
        writer: ConnWriter {
            tx,
            codec,
            bytes_sent,
            abort,
        },
    })
}
