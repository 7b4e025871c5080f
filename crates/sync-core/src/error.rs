//! Errors of decoding and encoding frames and record batches.

/// Why bytes from a peer were refused. One variant per kind of bad input.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length header declares more than the negotiated maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame with a zero-length payload.
    #[error("frame has an empty payload")]
    EmptyPayload,
    /// The flags byte has bits this version does not know.
    #[error("frame flags {0:#04x} carry unknown bits")]
    UnknownFlags(u8),
    /// The stream ended inside a frame.
    #[error("truncated frame: stream ended after {have} of {need} bytes")]
    Truncated {
        /// Bytes received.
        have: u64,
        /// Bytes the frame needs.
        need: u64,
    },
    /// An lz4 block declares a decompressed size above the maximum.
    #[error("compressed payload declares {declared} bytes, the maximum is {max}")]
    DecompressedTooLarge {
        /// Declared size.
        declared: u64,
        /// The limit.
        max: u64,
    },
    /// The lz4 block is corrupt.
    #[error("corrupt lz4 block: {0}")]
    Lz4(String),
    /// The message tag names no variant.
    #[error("unknown message tag {0}")]
    UnknownTag(u32),
    /// The payload is not a valid message or batch.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A record batch holds more records than allowed.
    #[error("record batch holds {count} records, the maximum is {max}")]
    TooManyRecords {
        /// Records in the batch.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A record batch's column does not have one value per record.
    #[error("record batch column `{column}` has {len} values for {count} records")]
    ColumnLength {
        /// Column name.
        column: &'static str,
        /// Values in the column.
        len: u64,
        /// Records in the batch.
        count: u64,
    },
    /// A record batch refers to something outside it (parent, location, name bytes).
    #[error("record batch column `{column}` refers to index {index}, outside the batch")]
    BadReference {
        /// Column name.
        column: &'static str,
        /// The offending index.
        index: u64,
    },
    /// An entry kind code this version does not know.
    #[error("unknown entry kind code {0}")]
    UnknownKind(u8),
    /// The batch's record count differs from what the frame declared.
    #[error("batch declares {declared} records but holds {actual}")]
    CountMismatch {
        /// Declared count.
        declared: u64,
        /// Actual count.
        actual: u64,
    },
    /// Reading the underlying stream failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame exceeds the maximum.
    #[error("encoded frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Encoded length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Serialization failed.
    #[error("serialize: {0}")]
    Serialize(String),
    /// Writing the underlying stream failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
