//! `NetError`: every way establishing or using a peer connection can fail.

use sync_core::{DecodeError, DeviceId, EncodeError, ErrorCode};

use crate::fingerprint::CertFingerprint;

/// Why a connection could not be established, or failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The peer presented a certificate whose fingerprint we have not pinned.
    #[error("the peer's certificate is not trusted")]
    UnknownCertificate,
    /// The peer refused our certificate during the TLS handshake (it has not pinned us).
    #[error("the peer does not trust our certificate")]
    NotTrustedByPeer,
    /// The peer's `Hello` claims a DeviceId other than the one pinned for its certificate.
    #[error("peer claims device {claimed} but its certificate is pinned to {pinned}")]
    IdentityMismatch {
        /// The DeviceId in the peer's `Hello`.
        claimed: DeviceId,
        /// The DeviceId pinned for the peer's certificate.
        pinned: DeviceId,
    },
    /// The peer speaks another protocol version.
    #[error("protocol mismatch: ours {ours}, theirs {theirs}")]
    ProtocolMismatch {
        /// Our [`sync_core::PROTOCOL_VERSION`].
        ours: u32,
        /// The version in the peer's `Hello`.
        theirs: u32,
    },
    /// The peer's `Hello` names another library.
    #[error("the peer belongs to another library")]
    LibraryMismatch,
    /// The TLS handshake and `Hello` exchange did not finish within `handshake_timeout`.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Nothing (not even a keepalive) arrived within `idle_timeout`.
    #[error("connection idle for too long")]
    Idle,
    /// A TLS error (bad record, unexpected message, alert, ...).
    #[error("tls: {0}")]
    Tls(String),
    /// The peer sent bytes that are not a valid frame.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded (for instance: too large).
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
    /// The peer sent a typed refusal (`Message::Error`).
    #[error("refused by peer ({code:?}): {message}")]
    Refused {
        /// The peer's reason.
        code: ErrorCode,
        /// The peer's detail.
        message: String,
    },
    /// The peer's first frame was not `Hello` (or another out-of-place frame).
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// The connection is closed (the writer task has stopped).
    #[error("connection closed")]
    Closed,
    /// The outbound queue is full (`try_send` only; `send` waits instead).
    #[error("outbound queue full")]
    QueueFull,
    /// Too many connections: the listener refused this one.
    #[error("too many connections")]
    TooManyConnections,
    /// A socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The device key or certificate could not be created, read or parsed.
    #[error("identity: {0}")]
    Identity(String),
    /// A digest statement about another owner's records: a device signs
    /// statements about its own records only.
    #[error(
        "device {device} cannot sign a digest statement about owner {owner}: \
         a device signs statements about its own records only"
    )]
    ForeignStatement {
        /// The owner the statement names.
        owner: DeviceId,
        /// This device.
        device: DeviceId,
    },
    /// The trust store file could not be read, parsed or written.
    #[error("trust store: {0}")]
    Trust(String),
    /// The trust store file is larger than any real one: refused unread.
    #[error(
        "{path} is {len} bytes, more than the {max} a trust store may hold: \
         it is not a trust store; remove it or restore it from a backup"
    )]
    TrustFileTooLarge {
        /// The trust store file.
        path: String,
        /// Its size (at least), in bytes.
        len: u64,
        /// The largest size read.
        max: u64,
    },
    /// A pin would bind this device's own id: a device never trusts a
    /// certificate as itself.
    #[error("device {device} is this device: a device never pins its own id")]
    OwnDevice {
        /// This device's id.
        device: DeviceId,
    },
    /// The device id is already pinned to another certificate: one device
    /// id, one certificate, and a binding is never silently replaced.
    #[error(
        "device {device} is already pinned to certificate {fingerprint}; \
         to pin it to another one, remove the old pin first: `lsync untrust {device}`"
    )]
    DeviceAlreadyPinned {
        /// The device id asked for.
        device: DeviceId,
        /// The certificate it is pinned to.
        fingerprint: CertFingerprint,
    },
    /// The certificate is already pinned to another device id.
    #[error(
        "certificate {fingerprint} is already pinned to device {device}; \
         to pin it to another id, remove the old pin first: `lsync untrust {fingerprint}`"
    )]
    FingerprintAlreadyPinned {
        /// The certificate asked for.
        fingerprint: CertFingerprint,
        /// The device it is pinned to.
        device: DeviceId,
    },
    /// The trust store holds a pin without a device id (written by an older
    /// `lsync trust` without `--device`, which let the peer claim any id).
    #[error(
        "{path}: the pin of certificate {fingerprint} has no device id, so that \
         peer could claim any device; pin it again with its id, \
         `lsync trust {fingerprint} --device <its device_id from lsync id>`, \
         or remove it: `lsync untrust {fingerprint}`"
    )]
    UnboundPin {
        /// The trust store file.
        path: String,
        /// The certificate pinned without a device id.
        fingerprint: CertFingerprint,
    },
    /// The device key file is readable or writable by group or others.
    #[error(
        "{path} is accessible to group or others (mode {mode:o}): the device key must be \
         private to its owner; fix it with `chmod 600 {path}`"
    )]
    KeyPermissions {
        /// The key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The device key file or the identity directory belongs to another
    /// user: its owner could read or replace the key.
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {euid}): the device identity must \
         belong to the user running lsync; fix it with `chown {euid} {path}` (or run lsync as its owner)"
    )]
    KeyOwner {
        /// The key file or identity directory.
        path: String,
        /// Its owner's uid.
        owner: u32,
        /// The effective uid of this process.
        euid: u32,
    },
}

/// Maps an IO error from a TLS stream to a typed error: rustls errors travel
/// inside `std::io::Error`.
pub(crate) fn map_io_error(err: std::io::Error) -> NetError {
    use rustls::AlertDescription as A;
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return NetError::Io(err);
    };
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            NetError::UnknownCertificate
        }
        rustls::Error::AlertReceived(
            A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied
            | A::CertificateRequired,
        ) => NetError::NotTrustedByPeer,
        other => NetError::Tls(other.to_string()),
    }
}
