//! Authenticated, encrypted peer connections: device identity, trust store,
//! TLS 1.3 with pinned certificates, the `Hello` exchange and framing.
//!
//! Each device has a key and a self-signed certificate ([`Identity`]). A
//! peer is trusted by pinning its certificate's SHA-256 fingerprint, bound
//! to exactly one DeviceId ([`TrustStore`]; one id per certificate, one
//! certificate per id, never our own id): any other certificate is refused
//! during the TLS handshake, before any application byte. After TLS, both
//! sides send `Hello` first; protocol version and library must match, and
//! the DeviceId in `Hello` must be the one pinned for the certificate.
//! Devices pair by exchanging an [`Invite`]: one string carrying the
//! library id, the device id and the fingerprint.
//! An owner signs what it holds of its own records with the same key
//! ([`Identity::sign_statement`]); any device checks such a statement
//! against the owner's pin ([`verify_statement`],
//! [`TrustStore::verify_statement_pinned`]), whoever forwarded it.
//!
//! [`Listener::accept`] and [`dial`] give a [`Connection`], which splits
//! into a [`ConnReader`] and a cloneable [`ConnWriter`]. [`memory_pair`]
//! gives the same over an in-memory pipe (no TLS), and with the
//! `test-utils` feature the [`fault`] module injects failures.
#![warn(clippy::print_stdout, clippy::print_stderr)]

mod admission;
mod conn;
mod error;
#[cfg(feature = "test-utils")]
pub mod fault;
mod fingerprint;
mod identity;
mod invite;
mod net;
mod statement;
mod tls;
mod trust;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use sync_core::{LibraryId, Limits};

pub use admission::ListenerStats;
pub use conn::{ConnReader, ConnWriter, Connection, PeerInfo};
pub use error::NetError;
pub use fingerprint::{CertFingerprint, ParseFingerprintError};
pub use identity::{CERT_FILE, DEVICE_ID_FILE, Identity, KEY_FILE};
pub use invite::{
    INVITE_PREFIX, INVITE_VERSION, Invite, MAX_ADDRESS, ParseInviteError, check_address,
};
pub use net::{Listener, dial, memory_pair};
pub use statement::{
    MAX_STATEMENT_CERTIFICATE, MAX_STATEMENT_SIGNATURE, StatementError, verify_statement,
};
pub use trust::TrustStore;

/// Everything a listener or dialer needs: who we are, whom we trust, and the limits.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Our key and certificate.
    pub identity: Arc<Identity>,
    /// The pinned peers.
    pub trust: TrustStore,
    /// The library both sides must share.
    pub library: LibraryId,
    /// Our human-readable name, sent in `Hello`.
    pub name: String,
    /// Frame size limits.
    pub limits: Limits,
    /// Limit for TCP connect + TLS handshake + `Hello` exchange (default 10 s).
    pub handshake_timeout: Duration,
    /// A connection on which nothing arrives for this long fails with
    /// `NetError::Idle`; also the longest a write may stall (default 60 s).
    pub idle_timeout: Duration,
    /// A keepalive frame is sent after this long without writing (default 15 s).
    pub keepalive_interval: Duration,
    /// Frames queued per connection before `send` waits (default 64).
    pub outbound_queue: usize,
    /// Connections a listener serves at once, running handshakes included
    /// (default 64); when all are authenticated, newcomers get `Error { Busy }`.
    pub max_connections: usize,
    /// TLS handshakes (peers not yet authenticated) a listener runs at once
    /// (default 16); more sockets wait for a slot.
    pub max_handshaking: usize,
    /// Accepted sockets that may wait for a handshake slot (default 64);
    /// beyond it, the oldest socket of the source holding the most (waiting
    /// and running, ties broken by that source's strikes) is closed. A
    /// source is an IPv4 address or an IPv6 /64.
    pub max_waiting: usize,
    /// TLS handshakes a listener runs at once for one source (an IPv4
    /// address or an IPv6 /64; default 4), so that one host cannot take
    /// every handshake slot.
    pub max_handshaking_per_ip: usize,
    /// How long a running TLS handshake keeps its slot against a waiting
    /// socket (default 500 ms; a LAN handshake takes milliseconds). After
    /// it, when the slots are full, the oldest handshake of the source
    /// running the most is closed to start the waiting socket: stalled
    /// handshakes cannot hold the slots a trusted peer needs.
    pub handshake_grace: Duration,
}

impl NetConfig {
    /// A configuration with default limits and timeouts.
    pub fn new(
        identity: Arc<Identity>,
        trust: TrustStore,
        library: LibraryId,
        name: String,
    ) -> NetConfig {
        NetConfig {
            identity,
            trust,
            library,
            name,
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(15),
            outbound_queue: 64,
            max_connections: 64,
            max_handshaking: 16,
            max_waiting: 64,
            max_handshaking_per_ip: 4,
            handshake_grace: Duration::from_millis(500),
        }
    }
}
