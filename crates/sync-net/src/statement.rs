//! Signed digest statements: an owner signs what it holds of its own
//! records ([`DigestStatement`]) with its device key, and any device checks
//! a copy against the certificate pinned for that owner, whoever forwarded
//! it.
//!
//! The signature is ECDSA P-256 with SHA-256 (ASN.1 DER encoding) over
//! [`DigestStatement::signing_bytes`], whose domain prefix keeps it apart
//! from anything the same key signs in TLS 1.3. The statement carries the
//! owner's certificate: its SHA-256 must be the fingerprint pinned for the
//! owner, and its public key verifies the signature. Chains, names and
//! validity dates are not checked, as in the TLS handshake: the pin is the
//! trust.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls::pki_types::{CertificateDer, alg_id};
use sync_core::digest::{DigestStatement, SignedStatement};
use sync_core::{DeviceId, LibraryId};

use crate::error::NetError;
use crate::fingerprint::CertFingerprint;
use crate::identity::Identity;
use crate::trust::TrustStore;

/// The largest certificate a signed statement may carry, in bytes (a
/// device certificate is about 400).
pub const MAX_STATEMENT_CERTIFICATE: usize = 16 * 1024;
/// The largest signature a signed statement may carry, in bytes (a DER
/// ECDSA P-256 signature is at most 72).
pub const MAX_STATEMENT_SIGNATURE: usize = 256;

/// Why a signed statement is not accepted as its owner's word. Every
/// variant names the owner the statement claims (or was expected from).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    /// The certificate or the signature is larger than any real one:
    /// refused before any parsing or hashing.
    #[error(
        "the statement claiming owner {owner} carries a {field} of {len} bytes, \
         more than the {max} allowed: refused unread"
    )]
    Oversized {
        /// The owner the statement claims.
        owner: DeviceId,
        /// `"certificate"` or `"signature"`.
        field: &'static str,
        /// Its length, in bytes.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The statement names another owner than the one expected.
    #[error("the statement claims owner {owner}, but one by owner {expected} was expected")]
    WrongOwner {
        /// The owner the statement claims.
        owner: DeviceId,
        /// The owner expected.
        expected: DeviceId,
    },
    /// The statement is about another library (not replayable here).
    #[error("the statement of owner {owner} is about library {library}, not library {expected}")]
    WrongLibrary {
        /// The owner the statement claims.
        owner: DeviceId,
        /// The library the statement names.
        library: LibraryId,
        /// The library expected.
        expected: LibraryId,
    },
    /// No certificate is pinned for the owner the statement claims.
    #[error(
        "no certificate is pinned for owner {owner}: its statement cannot be verified \
         (pair with that device first)"
    )]
    OwnerNotTrusted {
        /// The owner the statement claims.
        owner: DeviceId,
    },
    /// The statement carries a certificate other than the one pinned for
    /// its owner (another device's key, or a forgery).
    #[error(
        "the statement of owner {owner} carries certificate {fingerprint}, \
         not certificate {pinned} pinned for that owner"
    )]
    CertificateNotPinned {
        /// The owner the statement claims.
        owner: DeviceId,
        /// SHA-256 of the certificate carried.
        fingerprint: CertFingerprint,
        /// The fingerprint pinned for the owner.
        pinned: CertFingerprint,
    },
    /// The certificate is the pinned one, but no ECDSA P-256 public key can
    /// be read from it.
    #[error("the pinned certificate of owner {owner} cannot verify statements: {reason}")]
    BadCertificate {
        /// The owner the statement claims.
        owner: DeviceId,
        /// What is wrong with it.
        reason: String,
    },
    /// The signature does not verify with the owner's key: the statement
    /// was altered, or not signed by its owner.
    #[error(
        "the signature on the statement of owner {owner} does not verify: \
         it was altered, or not signed by that owner"
    )]
    BadSignature {
        /// The owner the statement claims.
        owner: DeviceId,
    },
}

impl Identity {
    /// Signs a statement about this device's own records with the device
    /// key, and attaches this device's certificate.
    ///
    /// Refused with [`NetError::ForeignStatement`] when `statement.owner`
    /// is not this device; [`NetError::Identity`] when the device key is
    /// not an ECDSA P-256 key (one placed by hand) or signing fails. The
    /// key is parsed at each call (about as long as the signature itself;
    /// statements are signed a few times a second at most).
    pub fn sign_statement(&self, statement: DigestStatement) -> Result<SignedStatement, NetError> {
        if statement.owner != self.device_id {
            return Err(NetError::ForeignStatement {
                owner: statement.owner,
                device: self.device_id,
            });
        }
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, self.key_pkcs8(), &rng)
            .map_err(|e| {
                NetError::Identity(format!(
                    "the device key cannot sign digest statements (an ECDSA P-256 key is needed): {e}"
                ))
            })?;
        let signature = key
            .sign(&rng, &statement.signing_bytes())
            .map_err(|_| NetError::Identity("signing a digest statement failed".to_string()))?;
        Ok(SignedStatement {
            statement,
            signature: signature.as_ref().to_vec(),
            certificate: self.cert_der().to_vec(),
        })
    }
}

impl TrustStore {
    /// Verifies `signed` against the certificate pinned for the owner it
    /// claims ([`verify_statement`]); [`StatementError::OwnerNotTrusted`]
    /// when none is pinned. This device's own id is never pinned: verify
    /// its own statements with [`verify_statement`] and its fingerprint.
    pub fn verify_statement_pinned(
        &self,
        signed: &SignedStatement,
        library: LibraryId,
    ) -> Result<(), StatementError> {
        let owner = signed.statement.owner;
        let pinned = self
            .fingerprint_of(owner)
            .ok_or(StatementError::OwnerNotTrusted { owner })?;
        verify_statement(signed, &pinned, owner, library)
    }
}

/// Verifies that `signed` is `expected_owner`'s own statement about
/// `library`: sizes first (before any parsing), then the owner and the
/// library named, then that the certificate's SHA-256 is `pinned`, then the
/// signature with the certificate's ECDSA P-256 key.
///
/// `pinned` must be the fingerprint pinned for `expected_owner` (see
/// [`TrustStore::verify_statement_pinned`], which looks it up): the pin is
/// what binds a key to an owner, never the certificate's contents.
pub fn verify_statement(
    signed: &SignedStatement,
    pinned: &CertFingerprint,
    expected_owner: DeviceId,
    library: LibraryId,
) -> Result<(), StatementError> {
    let owner = signed.statement.owner;
    check_sizes(signed)?;
    check_claims(&signed.statement, expected_owner, library)?;
    let fingerprint = CertFingerprint::of_der(&signed.certificate);
    if fingerprint != *pinned {
        return Err(StatementError::CertificateNotPinned {
            owner,
            fingerprint,
            pinned: *pinned,
        });
    }
    let point = p256_public_key(&signed.certificate)
        .map_err(|reason| StatementError::BadCertificate { owner, reason })?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(&signed.statement.signing_bytes(), &signed.signature)
        .map_err(|_| StatementError::BadSignature { owner })
}

/// Refuses a certificate or a signature larger than any real one.
fn check_sizes(signed: &SignedStatement) -> Result<(), StatementError> {
    let owner = signed.statement.owner;
    for (field, len, max) in [
        (
            "certificate",
            signed.certificate.len(),
            MAX_STATEMENT_CERTIFICATE,
        ),
        ("signature", signed.signature.len(), MAX_STATEMENT_SIGNATURE),
    ] {
        if len > max {
            return Err(StatementError::Oversized {
                owner,
                field,
                len,
                max,
            });
        }
    }
    Ok(())
}

/// Refuses a statement naming another owner or another library.
fn check_claims(
    statement: &DigestStatement,
    expected_owner: DeviceId,
    library: LibraryId,
) -> Result<(), StatementError> {
    let owner = statement.owner;
    if owner != expected_owner {
        return Err(StatementError::WrongOwner {
            owner,
            expected: expected_owner,
        });
    }
    if statement.library != library {
        return Err(StatementError::WrongLibrary {
            owner,
            library: statement.library,
            expected: library,
        });
    }
    Ok(())
}

/// The uncompressed P-256 point (65 bytes) of a DER certificate's key.
fn p256_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let der = CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("it is not an X.509 certificate ({e})"))?;
    let spki = cert.subject_public_key_info();
    p256_point(spki.as_ref())
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "its key is not an uncompressed ECDSA P-256 key".to_string())
}

/// The point of a SubjectPublicKeyInfo (DER, outer SEQUENCE included) of
/// an uncompressed P-256 key: SEQUENCE (89 bytes) { SEQUENCE (19 bytes)
/// { id-ecPublicKey, prime256v1 }, BIT STRING (66 bytes, no unused bits)
/// { 0x04, X, Y } }. DER has one encoding of it, so anything else is
/// another kind of key.
fn p256_point(spki: &[u8]) -> Option<&[u8]> {
    let rest = spki.strip_prefix(&[0x30, 0x59, 0x30, 0x13][..])?;
    let rest = rest.strip_prefix(alg_id::ECDSA_P256.as_ref())?;
    let point = rest.strip_prefix(&[0x03, 0x42, 0x00][..])?;
    (point.len() == 65 && point[0] == 0x04).then_some(point)
}

#[cfg(test)]
#[path = "statement_tests.rs"]
mod statement_tests;
