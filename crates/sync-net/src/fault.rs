//! Fault injection for tests (feature `test-utils`): a stream wrapper that
//! cuts, delays or corrupts what it writes, and constructors for faulty
//! connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Cut the stream after this many complete frames were written.
    pub cut_after_frames: Option<u64>,
    /// Cut the stream after this many bytes were written (possibly mid-frame).
    pub cut_after_bytes: Option<u64>,
    /// Hold every write back this long.
    pub delay: Option<Duration>,
    /// Invert (xor 0xFF) the byte at this offset of the written bytes.
    pub flip_byte_at: Option<u64>,
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
        let s = Self::with_format(inner, plan, format);
        s.armed.store(false, Ordering::SeqCst);
        let arm = s.armed.clone();
        (s, arm)
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

fn mem_wrap(plan: FaultPlan) -> MemWrap {
    Box::new(move |s: BoxStream| {
        let (f, arm) = FaultyStream::disarmed(s, plan, FrameFormat::Sync);
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
