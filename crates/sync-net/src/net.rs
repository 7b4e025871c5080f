//! `Listener`, `dial` and `memory_pair`: how connections are made. Which
//! accepted sockets may handshake is decided in `admission.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::Instrument;

use crate::NetConfig;
use crate::admission::{Admission, HeldStream, ListenerStats, Outcome, Start};
use crate::conn::{BoxStream, Connection, Establish, establish, refuse_busy};
use crate::error::{NetError, map_io_error};
use crate::fingerprint::CertFingerprint;
use crate::tls;

/// Accepts authenticated connections on a TCP port.
#[derive(Debug)]
pub struct Listener {
    local: SocketAddr,
    rx: Mutex<mpsc::Receiver<Connection>>,
    admission: Arc<Admission>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        self.admission.close();
    }
}

impl Listener {
    /// Binds `addr` (e.g. `"0.0.0.0:7070"`, or port 0 for any) and starts
    /// accepting in the background.
    pub async fn bind(addr: &str, config: NetConfig) -> Result<Listener, NetError> {
        let tls = tls::server_config(&config)?;
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(config.max_connections.max(1));
        let admission = Arc::new(Admission::new(&config));
        let span = tracing::info_span!("listener", local = %local);
        let task = tokio::spawn(
            accept_loop(tcp, config, TlsAcceptor::from(tls), tx, admission.clone())
                .instrument(span),
        );
        tracing::info!(local = %local, "listening");
        Ok(Listener {
            local,
            rx: Mutex::new(rx),
            admission,
            task,
        })
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next connection that passed TLS and `Hello`. Failed handshakes
    /// (garbage, unknown certificate, wrong device/version/library, stall)
    /// are logged with the peer address and skipped.
    ///
    /// Accepting never waits on a handshake: at most `max_handshaking` run
    /// at once (`max_handshaking_per_ip` per source: an IPv4 address or an
    /// IPv6 /64), other sockets wait (at most `max_waiting`), sources with
    /// the fewest running handshakes first, then those whose sockets failed
    /// or stalled least recently; a handshake running longer than
    /// `handshake_grace`, or from a source running two more than the
    /// waiting socket's, loses its place to it. Beyond `max_connections`
    /// authenticated connections, newcomers get `Error { Busy }`. One device
    /// holds at most 4 connections: a newer one closes its oldest (whose
    /// `recv` then fails). See [`Listener::stats`] and `admission.rs`.
    /// Cancel-safe.
    pub async fn accept(&self) -> Result<Connection, NetError> {
        self.rx.lock().await.recv().await.ok_or(NetError::Closed)
    }

    /// A snapshot of what the listener did with the sockets it accepted.
    pub fn stats(&self) -> ListenerStats {
        self.admission.stats()
    }
}

async fn accept_loop(
    tcp: TcpListener,
    config: NetConfig,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<Connection>,
    admission: Arc<Admission>,
) {
    let config = Arc::new(config);
    let mut arrived = None;
    loop {
        for start in admission.admit(arrived.take()) {
            let id = start.id;
            let span = tracing::info_span!("handshake", peer = %start.peer);
            let (acceptor, config, adm) = (acceptor.clone(), config.clone(), admission.clone());
            let task = if start.busy {
                tokio::spawn(refuse(start, adm, acceptor, config).instrument(span))
            } else {
                let tx = tx.clone();
                tokio::spawn(handshake(start, adm, acceptor, config, tx).instrument(span))
            };
            admission.spawned(id, task.abort_handle());
        }
        let wake = admission.next_wake();
        // Never reached: the branch is disabled without a wake-up time.
        let at = wake.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(x) => arrived = Some(x),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = admission.changed() => {}
            () = tokio::time::sleep_until(at), if wake.is_some() => {}
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Runs one server-side handshake: TLS (in the admission table, evictable),
/// then `Hello` (out of it: the peer holds a pinned certificate, and the
/// slot is charged to its device), all within `handshake_timeout` of the
/// socket's arrival.
async fn handshake(
    start: Start,
    admission: Arc<Admission>,
    acceptor: TlsAcceptor,
    config: Arc<NetConfig>,
    tx: mpsc::Sender<Connection>,
) {
    let Start {
        id,
        sock,
        peer,
        deadline,
        ..
    } = start;
    let tls = tokio::time::timeout_at(deadline, async {
        sock.set_nodelay(true)?;
        acceptor.accept(sock).await.map_err(map_io_error)
    })
    .await;
    let stream = match tls {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return admission.finish(id, peer, Some(Outcome::Failed(e))),
        Err(_) => return admission.finish(id, peer, Some(Outcome::TimedOut)),
    };
    // The device the certificate is pinned to (TLS checked the pin).
    let pinned = tls::peer_fingerprint(stream.get_ref().1.peer_certificates()).and_then(|fp| {
        let device = config
            .trust
            .lookup(&fp)
            .ok_or(NetError::UnknownCertificate)?;
        Ok((fp, device))
    });
    let (fp, device) = match pinned {
        Ok(pinned) => pinned,
        Err(e) => return admission.finish(id, peer, Some(Outcome::Failed(e))),
    };
    // From here the slot is charged to the device and lives in the stream.
    let Some(ticket) = admission.leave_table(id, device) else {
        return; // evicted as TLS completed
    };
    let stream = HeldStream::new(Box::new(stream), ticket);
    let hello = establish(
        Box::new(stream),
        Establish::new(&config, peer.to_string(), fp),
    );
    match tokio::time::timeout_at(deadline, hello).await {
        Ok(Ok(conn)) => {
            admission.authenticated();
            tracing::info!(peer = %peer, device = %conn.peer.device, name = %conn.peer.name, "accepted");
            let _ = tx.send(conn).await;
        }
        Ok(Err(e)) => admission.report(peer, Outcome::Failed(e)),
        Err(_) => admission.report(peer, Outcome::TimedOut),
    }
}

/// Refuses a socket with `Error { Busy }` (after TLS, so the peer can read it).
async fn refuse(
    start: Start,
    admission: Arc<Admission>,
    acceptor: TlsAcceptor,
    config: Arc<NetConfig>,
) {
    let refusal = async {
        let stream = acceptor.accept(start.sock).await.map_err(map_io_error)?;
        refuse_busy(Box::new(stream), &config).await;
        Ok::<(), NetError>(())
    };
    let _ = tokio::time::timeout_at(start.deadline, refusal).await;
    admission.finish(start.id, start.peer, None);
}

/// Wraps the TCP stream before TLS (fault injection); returns the stream and
/// the flag that arms the wrapper once `Hello` is exchanged.
pub(crate) type Wrap = Box<dyn FnOnce(BoxStream) -> (BoxStream, Option<Arc<AtomicBool>>) + Send>;

/// Dials `addr`, runs TLS 1.3 with mutual pinned authentication and the
/// `Hello` exchange, all within `handshake_timeout`.
pub async fn dial(addr: &str, config: &NetConfig) -> Result<Connection, NetError> {
    dial_inner(addr, config, sync_core::PROTOCOL_VERSION, None).await
}

pub(crate) async fn dial_inner(
    addr: &str,
    config: &NetConfig,
    protocol: u32,
    wrap: Option<Wrap>,
) -> Result<Connection, NetError> {
    let span = tracing::info_span!("dial", peer = %addr);
    let attempt = async {
        let tls = tls::client_config(config)?;
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let peer_addr = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        let boxed: BoxStream = Box::new(sock);
        let (io, arm) = match wrap {
            Some(w) => w(boxed),
            None => (boxed, None),
        };
        let name =
            ServerName::try_from(tls::SERVER_NAME).map_err(|e| NetError::Tls(e.to_string()))?;
        let stream = TlsConnector::from(tls)
            .connect(name, io)
            .await
            .map_err(map_io_error)?;
        let fp = tls::peer_fingerprint(stream.get_ref().1.peer_certificates())?;
        let mut e = Establish::new(config, peer_addr, fp);
        e.protocol = protocol;
        e.arm = arm;
        establish(Box::new(stream), e).await
    };
    let result = tokio::time::timeout(config.handshake_timeout, attempt)
        .instrument(span.clone())
        .await
        .unwrap_or(Err(NetError::HandshakeTimeout));
    if let Err(e) = &result {
        span.in_scope(|| tracing::debug!(peer = %addr, error = %e, "dial failed"));
    }
    result
}

/// Connects `a` and `b` over an in-memory pipe (`tokio::io::duplex`).
/// There is NO TLS: nothing is encrypted, and each side's "certificate" is
/// simply the other config's identity fingerprint. The checks are the same
/// as over the network: each side must have pinned the other's fingerprint,
/// and the `Hello` exchange checks version, library and DeviceId.
/// Returns `(a's connection, b's connection)`.
pub async fn memory_pair(
    a: &NetConfig,
    b: &NetConfig,
) -> Result<(Connection, Connection), NetError> {
    memory_pair_inner(a, b, None, None).await
}

/// Wraps one side's end of the pipe; returns the arming flag.
pub(crate) type MemWrap = Box<dyn FnOnce(BoxStream) -> (BoxStream, Arc<AtomicBool>) + Send>;

pub(crate) async fn memory_pair_inner(
    a: &NetConfig,
    b: &NetConfig,
    wrap_a: Option<MemWrap>,
    wrap_b: Option<MemWrap>,
) -> Result<(Connection, Connection), NetError> {
    let (sa, sb) = tokio::io::duplex(256 << 10);
    fn side<'c>(
        config: &'c NetConfig,
        peer: CertFingerprint,
        s: BoxStream,
        wrap: Option<MemWrap>,
    ) -> (BoxStream, Establish<'c>) {
        let (io, arm) = match wrap {
            Some(w) => {
                let (io, arm) = w(s);
                (io, Some(arm))
            }
            None => (s, None),
        };
        let mut e = Establish::new(config, "memory".to_string(), peer);
        e.arm = arm;
        (io, e)
    }
    let (io_a, ea) = side(a, b.identity.fingerprint, Box::new(sa), wrap_a);
    let (io_b, eb) = side(b, a.identity.fingerprint, Box::new(sb), wrap_b);
    let limit = a.handshake_timeout.max(b.handshake_timeout);
    tokio::time::timeout(limit, async {
        tokio::try_join!(establish(io_a, ea), establish(io_b, eb))
    })
    .await
    .unwrap_or(Err(NetError::HandshakeTimeout))
}
