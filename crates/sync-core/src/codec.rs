//! The frame codec: `u32` big-endian payload length, a flags byte, then the
//! postcard-encoded `Message`, lz4-compressed when that saves space.
//!
//! Limits are checked before any allocation: the length header against
//! `max_frame`, an lz4 block's declared size against `max_decompressed` and
//! against what its bytes can expand to ([`LZ4_MAX_EXPANSION`]): lz4_flex's
//! `decompress_size_prepended` allocates, zeroed, whatever a 4-byte header
//! declares (up to 4 GiB), before reading a byte of the block. The
//! message's own lengths are bounded while it is deserialized (see
//! [`crate::message`]).

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{DecodeError, EncodeError};
use crate::message::Message;

/// Flags bit 0: the payload is an lz4 block with its size prepended.
pub const FLAG_LZ4: u8 = 0b0000_0001;
/// Bytes before the payload: length (4) and flags (1).
pub const HEADER_LEN: usize = 5;

/// Size limits of the codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted or produced (default 16 MiB).
    pub max_frame: usize,
    /// Largest decompressed payload accepted (default 64 MiB).
    pub max_decompressed: usize,
    /// Payloads at least this large are tried with lz4 (default 512 bytes).
    pub compress_threshold: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 << 20,
            max_decompressed: 64 << 20,
            compress_threshold: 512,
        }
    }
}

/// The most an lz4 block can expand: output bytes per byte of the block
/// (after its 4-byte size header).
///
/// A block is a run of sequences: a token byte, literals (copied, one
/// output byte each), a 2-byte offset, and `k` extension bytes of at most
/// 255 each that lengthen the match beyond the token's `4 + 15`. Besides
/// its literals, a sequence of `3 + k` bytes thus writes at most
/// `19 + 255 k` bytes, less than `255 (3 + k)`. So no block of `n` bytes,
/// whatever its encoder, decompresses to more than `255 n`.
pub const LZ4_MAX_EXPANSION: u64 = 255;

/// Decompresses a size-prepended lz4 block after checking its declared
/// size against `max` and against what the block's bytes can expand to
/// ([`LZ4_MAX_EXPANSION`]), before anything is allocated for it. Shared by
/// frames, record batches and snapshot chunks: a lying size prefix costs
/// at most 255 times the bytes the peer sent, never the whole limit.
///
/// ```
/// use sync_core::{DecodeError, codec::{compress, decompress_checked}};
/// let block = compress(&[7; 10_000]);
/// assert_eq!(decompress_checked(&block, 1 << 20).unwrap(), vec![7; 10_000]);
/// // 64 bytes cannot hold 30 MiB: refused before a buffer is allocated.
/// let mut lying = (30u32 << 20).to_le_bytes().to_vec();
/// lying.extend_from_slice(&[0xff; 64]);
/// assert!(matches!(decompress_checked(&lying, 64 << 20), Err(DecodeError::Lz4(_))));
/// ```
pub fn decompress_checked(block: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let Some((head, body)) = block.split_first_chunk::<4>() else {
        return Err(DecodeError::Lz4(format!(
            "block of {} bytes has no size header",
            block.len()
        )));
    };
    let declared = u64::from(u32::from_le_bytes(*head));
    if declared > max as u64 {
        return Err(DecodeError::DecompressedTooLarge {
            declared,
            max: max as u64,
        });
    }
    let most = (body.len() as u64).saturating_mul(LZ4_MAX_EXPANSION);
    if declared > most {
        return Err(DecodeError::Lz4(format!(
            "a block of {} bytes cannot expand to the {declared} it declares",
            body.len()
        )));
    }
    lz4_flex::block::decompress_size_prepended(block).map_err(|e| DecodeError::Lz4(e.to_string()))
}

/// Compresses `data` as a size-prepended lz4 block.
pub fn compress(data: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress_prepend_size(data)
}

/// Reads the postcard varint tag at the start of a message payload.
fn peek_tag(payload: &[u8]) -> Result<u32, DecodeError> {
    let mut value: u64 = 0;
    for (i, byte) in payload.iter().take(5).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(value)
                .map_err(|_| DecodeError::Malformed("message tag overflows u32".into()));
        }
    }
    Err(DecodeError::Malformed("message tag is not a varint".into()))
}

/// Decodes a message from an uncompressed payload. Lists are bounded
/// while they are deserialized (a `Watermarks` of more than
/// [`MAX_OWNERS`](crate::message::MAX_OWNERS) owners is refused as
/// `Malformed`, naming the bound, before it is allocated).
pub fn decode_message(payload: &[u8]) -> Result<Message, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError::EmptyPayload);
    }
    let tag = peek_tag(payload)?;
    if tag >= Message::VARIANT_COUNT {
        return Err(DecodeError::UnknownTag(tag));
    }
    let (msg, rest) = postcard::take_from_bytes::<Message>(payload).map_err(|e| {
        DecodeError::Malformed(
            Message::declared_over_bounds(payload).unwrap_or_else(|| e.to_string()),
        )
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// The tokio-util codec for `Message` frames.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec {
    limits: Limits,
}

impl FrameCodec {
    /// A codec with the given limits.
    pub fn new(limits: Limits) -> Self {
        FrameCodec { limits }
    }

    /// The codec's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Encodes one message as a complete frame into `dst`. Refuses a frame
    /// longer than `max_frame` (`FrameTooLarge`) and a message the peer
    /// would refuse for its size, such as a `Watermarks` of more than
    /// [`MAX_OWNERS`](crate::message::MAX_OWNERS) owners (`Serialize`).
    pub fn encode_frame(&self, msg: &Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if let Some(why) = msg.over_bounds() {
            return Err(EncodeError::Serialize(why));
        }
        let raw = postcard::to_stdvec(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
        // Batch payloads and snapshot chunks are lz4 blocks already: a
        // second pass costs a compression attempt per frame and saves nothing.
        let packed_inside = matches!(
            msg,
            Message::StateBatch { .. } | Message::SnapshotChunk { .. }
        );
        let (flags, payload) = if raw.len() >= self.limits.compress_threshold && !packed_inside {
            let packed = compress(&raw);
            if packed.len() < raw.len() {
                (FLAG_LZ4, packed)
            } else {
                (0, raw)
            }
        } else {
            (0, raw)
        };
        if payload.len() > self.limits.max_frame || raw_len_exceeds(&payload, flags, &self.limits) {
            return Err(EncodeError::FrameTooLarge {
                len: payload.len() as u64,
                max: self.limits.max_frame as u64,
            });
        }
        dst.reserve(HEADER_LEN + payload.len());
        dst.put_u32(payload.len() as u32);
        dst.put_u8(flags);
        dst.put_slice(&payload);
        Ok(())
    }
}

/// A compressed frame whose content the peer would refuse as too large.
fn raw_len_exceeds(payload: &[u8], flags: u8, limits: &Limits) -> bool {
    flags & FLAG_LZ4 != 0
        && payload.len() >= 4
        && u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize
            > limits.max_decompressed
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        let flags = src[4];
        if len > self.limits.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len: len as u64,
                max: self.limits.max_frame as u64,
            });
        }
        if len == 0 {
            return Err(DecodeError::EmptyPayload);
        }
        if flags & !FLAG_LZ4 != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        if src.len() < HEADER_LEN + len {
            // Within the limit: reserving now avoids repeated reallocation.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len);
        if flags & FLAG_LZ4 != 0 {
            let raw = decompress_checked(&payload, self.limits.max_decompressed)?;
            decode_message(&raw).map(Some)
        } else {
            decode_message(&payload).map(Some)
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        match self.decode(buf)? {
            Some(msg) => Ok(Some(msg)),
            None if buf.is_empty() => Ok(None),
            None => {
                let need = if buf.len() >= 4 {
                    HEADER_LEN as u64 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64
                } else {
                    HEADER_LEN as u64
                };
                Err(DecodeError::Truncated {
                    have: buf.len() as u64,
                    need,
                })
            }
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_frame(&msg, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_frame(msg, dst)
    }
}

#[cfg(test)]
mod tests;
