//! Fault injection for tests (feature `test-utils`): a stream wrapper that
//! cuts, delays or corrupts what it writes, a frame-level wrapper that
//! duplicates, reorders or stalls whole frames, and constructors for faulty
//! connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::NetConfig;
use crate::conn::{BoxStream, Connection};
use crate::error::NetError;
use crate::net::{MemWrap, Wrap, dial_inner, memory_pair_inner};

/// What to do to the bytes a stream writes. All offsets and counts start
/// when the wrapper is armed (for the constructors below: after `Hello`).
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// Cut the stream after this many complete frames were written.
    pub cut_after_frames: Option<u64>,
    /// Cut the stream after this many bytes were written (possibly mid-frame).
    pub cut_after_bytes: Option<u64>,
    /// Hold every write back this long.
    pub delay: Option<Duration>,
    /// Invert (xor 0xFF) the byte at this offset of the written bytes.
    pub flip_byte_at: Option<u64>,
    /// Write these frames (0-based indices since arming) twice in a row.
    /// Frame-level faults act on sync frames, so only the in-memory
    /// transport applies them (under TLS they would only break a record).
    pub duplicate_frames: Vec<u64>,
    /// Hold each of these frames back and write it after the frame that
    /// follows it (the two arrive swapped).
    pub swap_frames: Vec<u64>,
    /// Before writing this frame, stall the stream this long.
    pub stall_before_frame: Option<(u64, Duration)>,
    /// Counts the faults that actually fired (a plan's trigger may never be
    /// reached). Share one log between plans to sum over links.
    pub log: Arc<FaultLog>,
}

/// Faults that fired, by kind (shared between wrappers; atomics).
#[derive(Debug, Default)]
pub struct FaultLog {
    cuts: AtomicU64,
    flips: AtomicU64,
    delays: AtomicU64,
    stalls: AtomicU64,
    duplicates: AtomicU64,
    swaps: AtomicU64,
}

/// A snapshot of a [`FaultLog`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Streams cut (at a frame or a byte).
    pub cuts: u64,
    /// Bytes flipped.
    pub flips: u64,
    /// Streams whose writes were delayed.
    pub delays: u64,
    /// Stalls before a frame.
    pub stalls: u64,
    /// Frames written twice.
    pub duplicates: u64,
    /// Frames written after the frame that followed them.
    pub swaps: u64,
}

impl FaultLog {
    /// The counts so far.
    pub fn counts(&self) -> FaultCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounts {
            cuts: get(&self.cuts),
            flips: get(&self.flips),
            delays: get(&self.delays),
            stalls: get(&self.stalls),
            duplicates: get(&self.duplicates),
            swaps: get(&self.swaps),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl FaultPlan {
    /// Whether the plan has frame-level faults (duplicate, swap, stall).
    pub fn has_frame_faults(&self) -> bool {
        !self.duplicate_frames.is_empty()
            || !self.swap_frames.is_empty()
            || self.stall_before_frame.is_some()
    }
}

/// How the wrapper recognises frame boundaries for `cut_after_frames`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrameFormat {
    /// Sync frames: `u32` big-endian payload length, a flags byte, the payload.
    #[default]
    Sync,
    /// TLS records: type, version (2 bytes), `u16` big-endian length, the
    /// payload. Used under TLS, where sync frames are not visible.
    TlsRecord,
}

#[derive(Clone, Copy, Debug)]
struct FrameParser {
    format: FrameFormat,
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
}

impl FrameParser {
    fn new(format: FrameFormat) -> Self {
        FrameParser {
            format,
            header: [0; 5],
            header_len: 0,
            remaining: 0,
        }
    }

    fn payload_len(&self) -> u64 {
        let h = self.header;
        match self.format {
            FrameFormat::Sync => u64::from(u32::from_be_bytes([h[0], h[1], h[2], h[3]])),
            FrameFormat::TlsRecord => u64::from(u16::from_be_bytes([h[3], h[4]])),
        }
    }

    /// Consumes `data` until `max_frames` frames complete; returns
    /// (bytes consumed, frames completed).
    fn feed(&mut self, data: &[u8], max_frames: u64) -> (usize, u64) {
        let (mut i, mut frames) = (0usize, 0u64);
        while i < data.len() && frames < max_frames {
            if self.header_len < 5 {
                let take = (5 - self.header_len).min(data.len() - i);
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&data[i..i + take]);
                self.header_len += take;
                i += take;
                if self.header_len == 5 {
                    self.remaining = self.payload_len();
                    if self.remaining == 0 {
                        frames += 1;
                        self.header_len = 0;
                    }
                }
            } else {
                let take = self.remaining.min((data.len() - i) as u64);
                self.remaining -= take;
                i += take as usize;
                if self.remaining == 0 {
                    frames += 1;
                    self.header_len = 0;
                }
            }
        }
        (i, frames)
    }
}

/// An `AsyncRead + AsyncWrite` wrapper applying a [`FaultPlan`] to the bytes
/// it writes. Once cut, it shuts the inner stream's write side down (the
/// peer sees the stream end) and further writes fail with `BrokenPipe`,
/// reads with `ConnectionReset`.
pub struct FaultyStream<S> {
    inner: S,
    plan: FaultPlan,
    armed: Arc<AtomicBool>,
    parser: FrameParser,
    written: u64,
    frames: u64,
    cut: bool,
    inner_shut: bool,
    sleep: Option<Pin<Box<Sleep>>>,
    delayed: bool,
    scratch: Vec<u8>,
}

impl<S> std::fmt::Debug for FaultyStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStream")
            .field("plan", &self.plan)
            .field("written", &self.written)
            .field("frames", &self.frames)
            .field("cut", &self.cut)
            .finish_non_exhaustive()
    }
}

impl<S> FaultyStream<S> {
    /// Wraps `inner`, armed now, counting sync frames.
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        Self::with_format(inner, plan, FrameFormat::Sync)
    }

    /// Wraps `inner`, armed now, recognising frames in `format`.
    pub fn with_format(inner: S, plan: FaultPlan, format: FrameFormat) -> Self {
        FaultyStream {
            inner,
            plan,
            armed: Arc::new(AtomicBool::new(true)),
            parser: FrameParser::new(format),
            written: 0,
            frames: 0,
            cut: false,
            inner_shut: false,
            sleep: None,
            delayed: false,
            scratch: Vec::new(),
        }
    }

    /// Wraps `inner` disarmed: bytes pass untouched (and uncounted) until
    /// the returned flag is set.
    pub fn disarmed(inner: S, plan: FaultPlan, format: FrameFormat) -> (Self, Arc<AtomicBool>) {
        let arm = Arc::new(AtomicBool::new(false));
        (Self::armed_by(inner, plan, format, arm.clone()), arm)
    }

    /// Wraps `inner`, active while `arm` is set (one flag can arm a stack
    /// of wrappers).
    pub fn armed_by(inner: S, plan: FaultPlan, format: FrameFormat, arm: Arc<AtomicBool>) -> Self {
        let mut s = Self::with_format(inner, plan, format);
        s.armed = arm;
        s
    }

    /// Whether the stream has been cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Bytes written since arming.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Complete frames written since arming.
    pub fn frames_written(&self) -> u64 {
        self.frames
    }

    fn limit_reached(&self) -> bool {
        self.plan.cut_after_bytes.is_some_and(|n| self.written >= n)
            || self.plan.cut_after_frames.is_some_and(|n| self.frames >= n)
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "fault injection: stream cut")
}

impl<S: AsyncWrite + Unpin> FaultyStream<S> {
    /// Shuts the inner write side down once, then reports the cut.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if !self.cut {
            bump(&self.plan.log.cuts);
        }
        self.cut = true;
        if !self.inner_shut {
            let _ = ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
            self.inner_shut = true;
        }
        Poll::Ready(broken())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FaultyStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fault injection: stream cut",
            )));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FaultyStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.cut || (this.armed.load(Ordering::SeqCst) && this.limit_reached()) {
            return this.poll_cut(cx).map(Err);
        }
        if !this.armed.load(Ordering::SeqCst) || buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if let Some(delay) = this.plan.delay
            && !this.delayed
        {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
            this.delayed = true;
            if this.written == 0 {
                bump(&this.plan.log.delays);
            }
        }
        let mut allowed = buf.len();
        if let Some(limit) = this.plan.cut_after_bytes {
            allowed = allowed.min(usize::try_from(limit - this.written).unwrap_or(usize::MAX));
        }
        if let Some(limit) = this.plan.cut_after_frames {
            let left = limit - this.frames;
            let mut probe = this.parser;
            let (consumed, frames) = probe.feed(&buf[..allowed], left);
            if frames == left {
                allowed = consumed;
            }
        }
        let start = this.written;
        let data: &[u8] = match this.plan.flip_byte_at {
            Some(at) if at >= start && at < start + allowed as u64 => {
                this.scratch.clear();
                this.scratch.extend_from_slice(&buf[..allowed]);
                this.scratch[(at - start) as usize] ^= 0xFF;
                bump(&this.plan.log.flips);
                &this.scratch
            }
            _ => &buf[..allowed],
        };
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.delayed = false;
        this.written += n as u64;
        let (_, frames) = this.parser.feed(&buf[..n], u64::MAX);
        this.frames += frames;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut {
            return this.poll_cut(cx).map(Err);
        }
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        if this.armed.load(Ordering::SeqCst) && this.limit_reached() {
            return this.poll_cut(cx).map(Err);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cut {
            return this.poll_cut(cx).map(Err);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// An `AsyncRead + AsyncWrite` wrapper that sees the sync frames written
/// through it whole and applies a plan's frame-level faults: a frame
/// written twice, two frames swapped, a stall before a frame. Frames are
/// assembled from the writes, so a frame goes out only once it is complete.
pub struct FrameShuffler<S> {
    inner: S,
    plan: FaultPlan,
    armed: Arc<AtomicBool>,
    parser: FrameParser,
    /// The frame being assembled.
    cur: Vec<u8>,
    /// Frames released, waiting to be written to `inner`.
    out: Vec<u8>,
    out_pos: usize,
    /// A frame held back to be written after the next one.
    held: Option<Vec<u8>>,
    /// Complete frames seen since arming.
    frames: u64,
    /// Bytes of `out` that may go before the stall (the frames before it).
    stall_at: Option<usize>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> std::fmt::Debug for FrameShuffler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameShuffler")
            .field("plan", &self.plan)
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl<S> FrameShuffler<S> {
    /// Wraps `inner`, active while `arm` is set.
    pub fn new(inner: S, plan: FaultPlan, arm: Arc<AtomicBool>) -> Self {
        FrameShuffler {
            inner,
            plan,
            armed: arm,
            parser: FrameParser::new(FrameFormat::Sync),
            cur: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            held: None,
            frames: 0,
            stall_at: None,
            sleep: None,
        }
    }

    /// Complete frames seen since arming.
    pub fn frames_seen(&self) -> u64 {
        self.frames
    }

    /// Releases the frame just assembled in `cur` according to the plan.
    fn release(&mut self) {
        let index = self.frames;
        self.frames += 1;
        let frame = std::mem::take(&mut self.cur);
        if let Some((at, delay)) = self.plan.stall_before_frame
            && at == index
        {
            self.stall_at = Some(self.out.len());
            self.sleep = Some(Box::pin(tokio::time::sleep(delay)));
        }
        if self.plan.swap_frames.contains(&index) && self.held.is_none() {
            self.held = Some(frame);
            return;
        }
        self.out.extend_from_slice(&frame);
        if self.plan.duplicate_frames.contains(&index) {
            self.out.extend_from_slice(&frame);
            bump(&self.plan.log.duplicates);
        }
        if let Some(held) = self.held.take() {
            self.out.extend_from_slice(&held);
            bump(&self.plan.log.swaps);
        }
        self.cur = frame;
        self.cur.clear();
    }
}

impl<S: AsyncWrite + Unpin> FrameShuffler<S> {
    /// Writes the released frames to `inner`, honouring a pending stall.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let mut end = self.out.len();
            if let Some(at) = self.stall_at {
                if self.out_pos >= at {
                    if let Some(sleep) = self.sleep.as_mut() {
                        ready!(sleep.as_mut().poll(cx));
                        bump(&self.plan.log.stalls);
                    }
                    self.sleep = None;
                    self.stall_at = None;
                } else {
                    end = at;
                }
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.stall_at = self.stall_at.map(|_| 0);
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameShuffler<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameShuffler<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.armed.load(Ordering::SeqCst) {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let mut i = 0;
        while i < buf.len() {
            let (consumed, frames) = this.parser.feed(&buf[i..], 1);
            this.cur.extend_from_slice(&buf[i..i + consumed]);
            i += consumed;
            if frames == 1 {
                this.release();
            }
        }
        // Start writing now; what is left goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

fn mem_wrap(plan: FaultPlan) -> MemWrap {
    Box::new(move |s: BoxStream| {
        let arm = Arc::new(AtomicBool::new(false));
        let s: BoxStream = if plan.has_frame_faults() {
            Box::new(FrameShuffler::new(s, plan.clone(), arm.clone()))
        } else {
            s
        };
        let f = FaultyStream::armed_by(s, plan, FrameFormat::Sync, arm.clone());
        (Box::new(f) as BoxStream, arm)
    })
}

/// [`crate::memory_pair`] with a fault plan on each side's writes, armed
/// after the `Hello` exchange (frames and bytes count from there).
pub async fn memory_pair_with_faults(
    a: &NetConfig,
    b: &NetConfig,
    a_plan: FaultPlan,
    b_plan: FaultPlan,
) -> Result<(Connection, Connection), NetError> {
    memory_pair_inner(a, b, Some(mem_wrap(a_plan)), Some(mem_wrap(b_plan))).await
}

/// [`crate::dial`] with real TLS and the fault wrapper around the TCP
/// stream (below TLS: a flipped byte breaks the TLS record, as on a real
/// link), armed after the `Hello` exchange. `cut_after_frames` counts TLS
/// records here (one per small frame written, roughly).
pub async fn dial_with_faults(
    addr: &str,
    config: &NetConfig,
    plan: FaultPlan,
) -> Result<Connection, NetError> {
    let wrap: Wrap = Box::new(move |s: BoxStream| {
        let (f, arm) = FaultyStream::disarmed(s, plan, FrameFormat::TlsRecord);
        (Box::new(f) as BoxStream, Some(arm))
    });
    dial_inner(addr, config, sync_core::PROTOCOL_VERSION, Some(wrap)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A sync frame whose one-byte payload is `tag`.
    fn tagged(tag: u8) -> Vec<u8> {
        vec![0, 0, 0, 1, 0, tag]
    }

    /// Writes frames 0..n (one write each, plus one write split in two)
    /// through a shuffler with `plan`; returns the tags in arrival order.
    async fn shuffled(plan: FaultPlan, n: u8) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = FrameShuffler::new(a, plan, Arc::new(AtomicBool::new(true)));
        for tag in 0..n {
            let f = tagged(tag);
            if tag == 1 {
                w.write_all(&f[..2]).await.unwrap();
                w.write_all(&f[2..]).await.unwrap();
            } else {
                w.write_all(&f).await.unwrap();
            }
            w.flush().await.unwrap();
        }
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len() % 6, 0, "whole frames only");
        got.chunks(6).map(|c| c[5]).collect()
    }

    #[tokio::test]
    async fn frames_are_duplicated_swapped_and_stalled_whole() {
        let dup = FaultPlan {
            duplicate_frames: vec![1, 3],
            ..FaultPlan::default()
        };
        let log = dup.log.clone();
        assert_eq!(shuffled(dup, 5).await, vec![0, 1, 1, 2, 3, 3, 4]);
        assert_eq!(log.counts().duplicates, 2, "the log counts what fired");
        let swap = FaultPlan {
            swap_frames: vec![1],
            ..FaultPlan::default()
        };
        assert_eq!(shuffled(swap, 4).await, vec![0, 2, 1, 3]);
        // A swapped last frame is held until the next one: it never comes.
        let swap_last = FaultPlan {
            swap_frames: vec![2],
            ..FaultPlan::default()
        };
        assert_eq!(shuffled(swap_last, 3).await, vec![0, 1]);
        let stall = FaultPlan {
            stall_before_frame: Some((2, Duration::from_millis(200))),
            ..FaultPlan::default()
        };
        let t = std::time::Instant::now();
        let log = stall.log.clone();
        assert_eq!(shuffled(stall, 4).await, vec![0, 1, 2, 3]);
        assert_eq!(log.counts().stalls, 1);
        assert!(t.elapsed() >= Duration::from_millis(200), "stalled");
    }

    #[tokio::test]
    async fn disarmed_shuffler_passes_bytes_through() {
        let (a, mut b) = tokio::io::duplex(1 << 10);
        let plan = FaultPlan {
            duplicate_frames: vec![0],
            ..FaultPlan::default()
        };
        let mut w = FrameShuffler::new(a, plan, Arc::new(AtomicBool::new(false)));
        w.write_all(&tagged(7)).await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, tagged(7));
    }

    #[test]
    fn parser_counts_frames_across_chunks() {
        let mut frame = vec![0, 0, 0, 3, 0, 1, 2, 3];
        frame.extend_from_slice(&[0, 0, 0, 1, 0, 9]);
        let mut p = FrameParser::new(FrameFormat::Sync);
        assert_eq!(p.feed(&frame[..6], u64::MAX), (6, 0));
        assert_eq!(p.feed(&frame[6..], u64::MAX), (8, 2));
        let mut p = FrameParser::new(FrameFormat::Sync);
        assert_eq!(p.feed(&frame, 1), (8, 1));
    }
}
