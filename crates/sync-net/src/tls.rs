//! TLS 1.3 configuration with mutual authentication by pinned certificate
//! fingerprints. Signatures are still checked by rustls (ring provider);
//! chains, names and validity dates are not: the pin is the trust.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::NetConfig;
use crate::error::NetError;
use crate::fingerprint::CertFingerprint;
use crate::trust::TrustStore;

/// The server name the dialer puts in its ClientHello (never verified).
pub(crate) const SERVER_NAME: &str = "lsync-device";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the certificates whose fingerprint is pinned in the trust store.
#[derive(Debug)]
struct PinnedVerifier {
    trust: TrustStore,
    algorithms: WebPkiSupportedAlgorithms,
    role: &'static str,
}

impl PinnedVerifier {
    fn new(trust: TrustStore, role: &'static str) -> PinnedVerifier {
        PinnedVerifier {
            trust,
            algorithms: provider().signature_verification_algorithms,
            role,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = CertFingerprint::of_der(end_entity.as_ref());
        // Pins added or removed by another process (`lsync trust` beside a
        // running engine) count from the next handshake: one `stat` unless
        // the file changed.
        if let Err(e) = self.trust.refresh() {
            tracing::warn!(cause = %e, "cannot check the trust store for changes");
        }
        if self.trust.lookup(&fp).is_some() {
            Ok(())
        } else {
            tracing::warn!(fingerprint = %fp, role = self.role, "refusing unpinned certificate");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn tls_err(e: rustls::Error) -> NetError {
    NetError::Tls(e.to_string())
}

/// The dialer's configuration: TLS 1.3 only, our certificate, pinned server
/// certificates, no session resumption (every handshake re-checks the pin).
pub(crate) fn client_config(config: &NetConfig) -> Result<Arc<rustls::ClientConfig>, NetError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(
            config.trust.clone(),
            "server",
        )))
        .with_client_auth_cert(
            vec![config.identity.rustls_cert()],
            config.identity.rustls_key(),
        )
        .map_err(tls_err)?;
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(tls))
}

/// The listener's configuration: TLS 1.3 only, mandatory client
/// certificates checked against the pins, no tickets or session cache.
pub(crate) fn server_config(config: &NetConfig) -> Result<Arc<rustls::ServerConfig>, NetError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(PinnedVerifier::new(
            config.trust.clone(),
            "client",
        )))
        .with_single_cert(
            vec![config.identity.rustls_cert()],
            config.identity.rustls_key(),
        )
        .map_err(tls_err)?;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(tls))
}

/// The fingerprint of the peer's end-entity certificate after a completed handshake.
pub(crate) fn peer_fingerprint(
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<CertFingerprint, NetError> {
    certs
        .and_then(|certs| certs.first())
        .map(|c| CertFingerprint::of_der(c.as_ref()))
        .ok_or(NetError::UnknownCertificate)
}
