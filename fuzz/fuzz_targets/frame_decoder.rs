//! Fuzz target: arbitrary bytes into `sync_core::FrameCodec` as a tokio-util
//! `Decoder`, fed in arbitrary splits, then `decode_eof`. Must never panic;
//! a decoded message must re-encode to a frame that decodes to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sync_core::{FrameCodec, Limits};
use tokio_util::codec::Decoder;

/// Feeds `data` to `codec` in pieces whose sizes come from `splits`, decoding
/// after each piece like `FramedRead` does, then calls `decode_eof`.
fn run(codec: &mut FrameCodec, splits: &[u8], data: &[u8]) {
    let mut buf = BytesMut::new();
    let mut rest = data;
    let mut sizes = splits.iter().cycle();
    while !rest.is_empty() {
        let n = if splits.is_empty() {
            rest.len()
        } else {
            (usize::from(*sizes.next().unwrap_or(&0)) + 1).min(rest.len())
        };
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => check_round_trip(codec, &msg),
                Ok(None) => break,
                // A decode error closes the connection: nothing more is read.
                Err(_) => return,
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(msg)) => check_round_trip(codec, &msg),
            Ok(None) | Err(_) => return,
        }
    }
}

fn check_round_trip(codec: &FrameCodec, msg: &sync_core::Message) {
    let mut out = BytesMut::new();
    if codec.encode_frame(msg, &mut out).is_ok() {
        let again = codec
            .clone()
            .decode(&mut out)
            .expect("a frame we encoded must decode")
            .expect("a frame we encoded is complete");
        assert_eq!(&again, msg, "re-encoded frame decodes to another message");
        assert!(out.is_empty(), "re-encoded frame left bytes behind");
    }
}

fuzz_target!(|input: &[u8]| {
    // Byte 0: limits (default, or small ones so the limit paths are reached);
    // byte 1: how many split sizes follow; then the split sizes; then the stream.
    let Some((&mode, input)) = input.split_first() else {
        return;
    };
    let Some((&nsplits, input)) = input.split_first() else {
        return;
    };
    let nsplits = usize::from(nsplits % 16).min(input.len());
    let (splits, data) = input.split_at(nsplits);
    let limits = if mode & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_frame: 64 + usize::from(mode >> 1) * 16,
            max_decompressed: 256 + usize::from(mode >> 1) * 64,
            compress_threshold: 32,
        }
    };
    let mut codec = FrameCodec::new(limits);
    run(&mut codec, splits, data);
});
