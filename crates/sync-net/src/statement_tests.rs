//! Tests of signed digest statements: signing, and every reason a copy is refused.

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use sync_core::digest::{DigestId, DigestStatement, SignedStatement};
use sync_core::{DeviceId, IndexId, LibraryId, Seq};

use super::*;

fn device() -> Identity {
    Identity::generate(DeviceId::new_v7()).expect("generate an identity")
}

fn statement(owner: DeviceId, library: LibraryId) -> DigestStatement {
    DigestStatement {
        library,
        owner,
        index_id: IndexId(7),
        seq: Seq(42),
        records: 40,
        digest: DigestId([0x5a; 32]),
        pruned: Seq(3),
    }
}

fn signed(id: &Identity, library: LibraryId) -> SignedStatement {
    id.sign_statement(statement(id.device_id, library))
        .expect("sign our own statement")
}

/// What a device that ignores the owner rule would send: `statement`
/// signed with `signer`'s key, with `signer`'s certificate.
fn forged(signer: &Identity, statement: DigestStatement) -> SignedStatement {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, signer.key_pkcs8(), &rng)
        .expect("parse the signer's key");
    let signature = key
        .sign(&rng, &statement.signing_bytes())
        .expect("sign the forged statement");
    SignedStatement {
        statement,
        signature: signature.as_ref().to_vec(),
        certificate: signer.cert_der().to_vec(),
    }
}

/// Verifies against `id`'s own pin, owner and `library`.
fn verify_as(
    signed: &SignedStatement,
    id: &Identity,
    library: LibraryId,
) -> Result<(), StatementError> {
    verify_statement(signed, &id.fingerprint, id.device_id, library)
}

fn assert_names(err: &StatementError, owner: DeviceId) {
    let text = err.to_string();
    assert!(text.contains(&owner.to_string()), "{text}");
}

#[test]
fn a_signed_statement_verifies() {
    let (a, library) = (device(), LibraryId::new_v7());
    let s = signed(&a, library);
    assert_eq!(s.statement, statement(a.device_id, library));
    assert_eq!(s.certificate, a.cert_der());
    assert!(s.signature.len() <= 72, "{} bytes", s.signature.len());
    verify_as(&s, &a, library).expect("a fresh statement verifies");
    // As a third device receives it: through the wire format, and through
    // the trust store that pins `a`.
    let json = serde_json::to_vec(&s).expect("encode");
    let back: SignedStatement = serde_json::from_slice(&json).expect("decode");
    let trust = TrustStore::in_memory(DeviceId::new_v7());
    trust
        .trust(a.fingerprint, a.device_id)
        .expect("pin the owner");
    trust
        .verify_statement_pinned(&back, library)
        .expect("a forwarded statement verifies against the owner's pin");
}

/// Alters one field of a statement (given another owner and library).
type Change = fn(&mut DigestStatement, DeviceId, LibraryId);

#[test]
fn every_field_changed_after_signing_fails_with_bad_signature() {
    let (a, library) = (device(), LibraryId::new_v7());
    let original = signed(&a, library);
    let (other_owner, other_library) = (DeviceId::new_v7(), LibraryId::new_v7());
    let changes: [(&str, Change); 7] = [
        ("library", |s, _, l| s.library = l),
        ("owner", |s, o, _| s.owner = o),
        ("index_id", |s, _, _| s.index_id.0 ^= 1),
        ("seq", |s, _, _| s.seq.0 += 1),
        ("records", |s, _, _| s.records -= 1),
        ("digest", |s, _, _| s.digest.0[31] ^= 0x80),
        ("pruned", |s, _, _| s.pruned.0 += 1),
    ];
    for (field, change) in changes {
        let mut s = original.clone();
        change(&mut s.statement, other_owner, other_library);
        assert_ne!(s.statement, original.statement, "{field} unchanged");
        // Expect whatever owner and library the altered copy names, so
        // that only the signature can catch the change.
        let err = verify_statement(&s, &a.fingerprint, s.statement.owner, s.statement.library)
            .expect_err(field);
        assert_eq!(
            err,
            StatementError::BadSignature {
                owner: s.statement.owner
            },
            "{field}"
        );
        assert_names(&err, s.statement.owner);
    }
    verify_as(&original, &a, library).expect("the original still verifies");
}

#[test]
fn another_devices_certificate_fails_with_certificate_not_pinned() {
    let (a, b, library) = (device(), device(), LibraryId::new_v7());
    // B signs a statement claiming A's records with its own key and
    // certificate: the signature is valid, the certificate is not A's.
    let s = forged(&b, statement(a.device_id, library));
    verify_statement(&s, &b.fingerprint, a.device_id, library)
        .expect("the forgery is self-consistent: only the pin tells it apart");
    let err = verify_as(&s, &a, library).expect_err("B's certificate is not pinned for A");
    assert_eq!(
        err,
        StatementError::CertificateNotPinned {
            owner: a.device_id,
            fingerprint: b.fingerprint,
            pinned: a.fingerprint,
        }
    );
    assert_names(&err, a.device_id);
    // The trust store checks against A's pin, not the certificate's.
    let trust = TrustStore::in_memory(DeviceId::new_v7());
    trust.trust(a.fingerprint, a.device_id).expect("pin A");
    trust.trust(b.fingerprint, b.device_id).expect("pin B");
    assert_eq!(trust.verify_statement_pinned(&s, library), Err(err));
}

#[test]
fn a_statement_claiming_another_owner_fails_with_wrong_owner() {
    let (a, b, library) = (device(), device(), LibraryId::new_v7());
    // Checked against B's pin (its certificate's), expecting B: the
    // statement claims A.
    let s = forged(&b, statement(a.device_id, library));
    let err = verify_as(&s, &b, library).expect_err("B's key speaks for B only");
    assert_eq!(
        err,
        StatementError::WrongOwner {
            owner: a.device_id,
            expected: b.device_id,
        }
    );
    assert_names(&err, a.device_id);
    assert_names(&err, b.device_id);
    // A genuine statement of A's is not B's either.
    let genuine = signed(&a, library);
    assert!(matches!(
        verify_statement(&genuine, &a.fingerprint, b.device_id, library),
        Err(StatementError::WrongOwner { owner, expected }) if owner == a.device_id && expected == b.device_id
    ));
    // And B's identity refuses to sign it in the first place.
    assert!(matches!(
        b.sign_statement(statement(a.device_id, library)),
        Err(NetError::ForeignStatement { owner, device }) if owner == a.device_id && device == b.device_id
    ));
}

#[test]
fn sign_statement_refuses_a_foreign_owner() {
    let (a, other, library) = (device(), DeviceId::new_v7(), LibraryId::new_v7());
    let err = a
        .sign_statement(statement(other, library))
        .expect_err("not our records");
    let text = err.to_string();
    assert!(
        matches!(err, NetError::ForeignStatement { owner, device } if owner == other && device == a.device_id),
        "{err:?}"
    );
    assert!(text.contains(&other.to_string()), "{text}");
    assert!(text.contains(&a.device_id.to_string()), "{text}");
}

#[test]
fn truncated_or_garbage_signatures_fail_with_bad_signature() {
    let (a, library) = (device(), LibraryId::new_v7());
    let good = signed(&a, library);
    let mut flipped = good.signature.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let mut other_statement = statement(a.device_id, library);
    other_statement.seq = Seq(43);
    let signatures = [
        Vec::new(),
        good.signature[..good.signature.len() - 1].to_vec(),
        good.signature[..good.signature.len() / 2].to_vec(),
        flipped,
        vec![0x30; 72],
        vec![0xff; MAX_STATEMENT_SIGNATURE],
        // A valid signature by the same key, over another statement.
        a.sign_statement(other_statement)
            .expect("sign another statement")
            .signature,
    ];
    for (i, signature) in signatures.into_iter().enumerate() {
        let s = SignedStatement {
            signature,
            ..good.clone()
        };
        assert_eq!(
            verify_as(&s, &a, library),
            Err(StatementError::BadSignature { owner: a.device_id }),
            "signature {i}"
        );
    }
}

#[test]
fn a_garbage_certificate_whose_hash_is_pinned_fails_with_bad_certificate() {
    let (a, library) = (device(), LibraryId::new_v7());
    let good = signed(&a, library);
    let mut trailing = a.cert_der().to_vec();
    trailing.push(0);
    let certificates = [
        Vec::new(),
        b"not a certificate".to_vec(),
        a.cert_der()[..a.cert_der().len() - 1].to_vec(),
        trailing,
        vec![0x30; MAX_STATEMENT_CERTIFICATE],
    ];
    for (i, certificate) in certificates.into_iter().enumerate() {
        let pinned = CertFingerprint::of_der(&certificate);
        let s = SignedStatement {
            certificate,
            ..good.clone()
        };
        let err = verify_statement(&s, &pinned, a.device_id, library).expect_err("garbage");
        assert!(
            matches!(&err, StatementError::BadCertificate { owner, reason }
                if *owner == a.device_id && reason.contains("not an X.509 certificate")),
            "certificate {i}: {err:?}"
        );
        assert_names(&err, a.device_id);
    }
}

#[test]
fn a_certificate_with_another_kind_of_key_fails_with_bad_certificate() {
    let (a, library) = (device(), LibraryId::new_v7());
    let good = signed(&a, library);
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = rcgen::KeyPair::generate_for(alg).expect("generate a key");
        let cert = rcgen::CertificateParams::new(vec!["lsync-device".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-sign");
        let certificate = cert.der().to_vec();
        let pinned = CertFingerprint::of_der(&certificate);
        let s = SignedStatement {
            certificate,
            ..good.clone()
        };
        let err = verify_statement(&s, &pinned, a.device_id, library).expect_err("not P-256");
        assert!(
            matches!(&err, StatementError::BadCertificate { reason, .. } if reason.contains("P-256")),
            "{alg:?}: {err:?}"
        );
    }
    // A P-256 certificate whose point is not in uncompressed form (the
    // certificate's own signature is never checked: the pin is the trust).
    let mut certificate = a.cert_der().to_vec();
    let spki_end = [0x03, 0x42, 0x00, 0x04];
    let at = certificate
        .windows(spki_end.len())
        .position(|w| w == spki_end)
        .expect("the key's BIT STRING")
        + 3;
    certificate[at] = 0x05;
    let pinned = CertFingerprint::of_der(&certificate);
    let s = SignedStatement {
        certificate,
        ..good.clone()
    };
    let err = verify_statement(&s, &pinned, a.device_id, library).expect_err("not a point");
    assert!(
        matches!(&err, StatementError::BadCertificate { reason, .. } if reason.contains("P-256")),
        "{err:?}"
    );
}

#[test]
fn oversized_fields_are_refused_before_parsing() {
    let (a, library) = (device(), LibraryId::new_v7());
    let good = signed(&a, library);
    let big_cert = vec![0x30; MAX_STATEMENT_CERTIFICATE + 1];
    let big_cert_pin = CertFingerprint::of_der(&big_cert);
    let s = SignedStatement {
        certificate: big_cert,
        ..good.clone()
    };
    // Pinned, and for the right owner: only the size refuses it.
    let err = verify_statement(&s, &big_cert_pin, a.device_id, library).expect_err("too big");
    assert_eq!(
        err,
        StatementError::Oversized {
            owner: a.device_id,
            field: "certificate",
            len: MAX_STATEMENT_CERTIFICATE + 1,
            max: MAX_STATEMENT_CERTIFICATE,
        }
    );
    assert_names(&err, a.device_id);
    // Checked before the owner, the library and the pin.
    let err = verify_statement(&s, &a.fingerprint, DeviceId::new_v7(), LibraryId::new_v7())
        .expect_err("too big");
    assert!(
        matches!(
            err,
            StatementError::Oversized {
                field: "certificate",
                ..
            }
        ),
        "{err:?}"
    );

    let s = SignedStatement {
        signature: vec![0x30; MAX_STATEMENT_SIGNATURE + 1],
        ..good
    };
    assert_eq!(
        verify_as(&s, &a, library),
        Err(StatementError::Oversized {
            owner: a.device_id,
            field: "signature",
            len: MAX_STATEMENT_SIGNATURE + 1,
            max: MAX_STATEMENT_SIGNATURE,
        })
    );
}

#[test]
fn a_statement_for_another_library_fails_with_wrong_library() {
    let (a, library, other) = (device(), LibraryId::new_v7(), LibraryId::new_v7());
    let s = signed(&a, other);
    let err = verify_as(&s, &a, library).expect_err("another library");
    assert_eq!(
        err,
        StatementError::WrongLibrary {
            owner: a.device_id,
            library: other,
            expected: library,
        }
    );
    assert_names(&err, a.device_id);
    verify_as(&s, &a, other).expect("valid in its own library");
}

#[test]
fn the_trust_store_verifies_against_the_pin_of_the_claimed_owner() {
    let (me, a, library) = (device(), device(), LibraryId::new_v7());
    let trust = TrustStore::in_memory(me.device_id);
    let s = signed(&a, library);
    let unknown = StatementError::OwnerNotTrusted { owner: a.device_id };
    assert_eq!(
        trust.verify_statement_pinned(&s, library),
        Err(unknown.clone())
    );
    assert_names(&unknown, a.device_id);
    trust.trust(a.fingerprint, a.device_id).expect("pin A");
    trust
        .verify_statement_pinned(&s, library)
        .expect("verifies once A is pinned");
    assert!(matches!(
        trust.verify_statement_pinned(&s, LibraryId::new_v7()),
        Err(StatementError::WrongLibrary { .. })
    ));
    trust.untrust_device(a.device_id).expect("unpin A");
    assert_eq!(trust.verify_statement_pinned(&s, library), Err(unknown));
    // This device is never pinned: its own statements go through
    // `verify_statement` with its own fingerprint.
    let own = signed(&me, library);
    assert_eq!(
        trust.verify_statement_pinned(&own, library),
        Err(StatementError::OwnerNotTrusted {
            owner: me.device_id
        })
    );
    verify_as(&own, &me, library).expect("own statement");
}

#[test]
fn an_identity_loaded_from_disk_signs_verifiable_statements() {
    let dir = tempfile::tempdir().expect("tempdir");
    let library = LibraryId::new_v7();
    let created = Identity::load_or_create(dir.path(), DeviceId::new_v7()).expect("create");
    let loaded = Identity::load(dir.path()).expect("load");
    let s = signed(&loaded, library);
    verify_as(&s, &created, library).expect("the loaded key is the created one");
}

#[test]
fn a_device_key_that_is_not_p256_cannot_sign() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["lsync-device".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-sign");
    let device_id = DeviceId::new_v7();
    std::fs::write(dir.path().join(crate::CERT_FILE), cert.pem()).expect("write cert");
    std::fs::write(
        dir.path().join(crate::DEVICE_ID_FILE),
        format!("{device_id}\n"),
    )
    .expect("write id");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.path().join(crate::KEY_FILE))
        .and_then(|mut f| f.write_all(key.serialize_pem().as_bytes()))
        .expect("write key");
    let id = Identity::load(dir.path()).expect("a P-384 key loads (TLS can use it)");
    let err = id
        .sign_statement(statement(device_id, LibraryId::new_v7()))
        .expect_err("statements are P-256 only");
    assert!(
        matches!(&err, NetError::Identity(m) if m.contains("P-256")),
        "{err:?}"
    );
}
