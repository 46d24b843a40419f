//! TPM node attestation by credential activation, both halves against a real swtpm whose EK
//! certificate was made by `swtpm_setup --create-ek-cert` with a local "manufacturer" CA:
//! the agent's `TpmAttestation` produces the evidence and activates the credential; the
//! issuer's `TpmAttestor` checks the evidence and makes the credential in software.

use agent::daemon::node::tpm::TpmAttestation;
use agent::daemon::node::NodeAttestation;
use der::{Decode, Encode};
use issuer::attestation::tpm::TpmAttestor;
use issuer::attestation::{AttestedNode, NodeAttestor, PendingAttestation, Refusal, Step};
use plant_tests::swtpm::Swtpm;
use proto::agent::{evidence, Challenge, Evidence, TpmEvidence};
use sha2::Digest;
use tss_esapi::traits::Marshall;

const CSR: &[u8] = b"node svid csr (not examined by the tpm method)";

/// DER certificates from a PEM file.
fn certificates(path: &std::path::Path) -> Vec<Vec<u8>> {
    let pem = std::fs::read(path).expect("read CA PEM");
    x509_cert::Certificate::load_pem_chain(&pem)
        .expect("PEM certificates")
        .iter()
        .map(|c| c.to_der().expect("DER"))
        .collect()
}

fn attestor_for(tpm: &Swtpm) -> TpmAttestor {
    TpmAttestor::new(certificates(&tpm.ek_ca_certificate())).expect("attestor")
}

fn agent_for(tpm: &Swtpm) -> TpmAttestation {
    TpmAttestation::open(&tpm.tcti_string()).expect("open the TPM")
}

fn tpm_evidence(evidence: &Evidence) -> &TpmEvidence {
    match &evidence.method {
        Some(evidence::Method::Tpm(tpm)) => tpm,
        other => panic!("not TPM evidence: {other:?}"),
    }
}

fn with_tpm_evidence(tpm: TpmEvidence) -> Evidence {
    Evidence {
        csr: CSR.to_vec(),
        method: Some(evidence::Method::Tpm(tpm)),
    }
}

fn challenge(step: Step) -> (Challenge, Box<dyn PendingAttestation>) {
    match step {
        Step::Challenge { challenge, pending } => (challenge, pending),
        Step::Attested(node) => panic!("attested without a challenge: {node:?}"),
    }
}

fn refusal(result: Result<Step, Refusal>) -> Refusal {
    match result {
        Err(refusal) => refusal,
        Ok(step) => panic!("evidence accepted: {step:?}"),
    }
}

/// The hex SHA-256 of the EK certificate's SubjectPublicKeyInfo, computed independently.
fn ek_id(evidence: &TpmEvidence) -> String {
    let certificate = x509_cert::Certificate::from_der(&evidence.ek_certificate).expect("EK cert");
    let spki = certificate
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .expect("SPKI");
    hex::encode(sha2::Sha256::digest(&spki))
}

#[test]
fn a_real_tpm_activates_the_issuers_software_credential_and_is_attested() {
    let tpm = Swtpm::start_manufactured();
    let attestor = attestor_for(&tpm);
    let mut agent = agent_for(&tpm);
    assert_eq!(agent.method(), "tpm");
    assert!(agent.can_reattest());

    let evidence = agent.evidence(CSR).expect("evidence");
    let (sent, pending) = challenge(attestor.begin(&evidence).expect("evidence accepted"));
    let answer = agent.answer(&sent, CSR).expect("ActivateCredential");
    let node: AttestedNode = pending.verify(&answer).expect("answer accepted");
    assert_eq!(node.method, "tpm");
    assert!(node.can_reattest);
    assert_eq!(node.id, ek_id(tpm_evidence(&evidence)));

    // Again, with a fresh AK: the same node, because the id is the EK's.
    let again = agent.evidence(CSR).expect("evidence");
    assert_ne!(
        tpm_evidence(&again).ak_public,
        tpm_evidence(&evidence).ak_public
    );
    let (sent, pending) = challenge(attestor.begin(&again).expect("evidence accepted"));
    let answer = agent.answer(&sent, CSR).expect("ActivateCredential");
    assert_eq!(pending.verify(&answer).expect("answer accepted"), node);

    // Nothing left loaded: swtpm keeps transient objects and sessions after the connection
    // closes (no resource manager), so a leak would show here.
    drop(agent);
    for capability in ["handles-transient", "handles-loaded-session"] {
        let out = std::process::Command::new("tpm2_getcap")
            .arg(capability)
            .env("TPM2TOOLS_TCTI", tpm.tcti_string())
            .env("TSS2_LOG", "all+NONE")
            .output()
            .expect("tpm2_getcap (apt package tpm2-tools)");
        assert!(out.status.success(), "tpm2_getcap {capability} failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "{capability} left behind: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn an_ek_from_an_unconfigured_manufacturer_is_refused() {
    let trusted = Swtpm::start_manufactured();
    let stranger = Swtpm::start_manufactured();
    let attestor = attestor_for(&trusted);
    let evidence = agent_for(&stranger).evidence(CSR).expect("evidence");
    let refused = refusal(attestor.begin(&evidence));
    assert_eq!(refused.reason, "ek_untrusted");
    assert!(
        refused.message.contains("swtpm-localca"),
        "the message names the EK certificate's issuer: {}",
        refused.message
    );

    // The root alone does not vouch for an EK certificate its intermediate signed: a TPM
    // carries no chain. The refusal names the missing intermediate and where it goes.
    let root_only = TpmAttestor::new(certificates(&stranger.ek_root_certificate())).expect("root");
    let refused = refusal(root_only.begin(&evidence));
    assert_eq!(refused.reason, "ek_untrusted");
    assert!(
        refused.message.contains("\"CN=swtpm-localca\"")
            && refused.message.contains("[attestation.tpm] intermediates"),
        "{}",
        refused.message
    );
}

#[test]
fn an_ek_chain_through_a_configured_intermediate_attests_and_without_its_root_does_not() {
    let tpm = Swtpm::start_manufactured();
    let other = Swtpm::start_manufactured();
    let mut agent = agent_for(&tpm);
    let evidence = agent.evidence(CSR).expect("evidence");

    // Root as the anchor, the signing CA as an intermediate: the whole chain is checked.
    let chained = TpmAttestor::new(certificates(&tpm.ek_root_certificate()))
        .expect("root")
        .with_intermediates(certificates(&tpm.ek_ca_certificate()))
        .expect("intermediate");
    let (sent, pending) = challenge(chained.begin(&evidence).expect("chain accepted"));
    let answer = agent.answer(&sent, CSR).expect("ActivateCredential");
    assert_eq!(
        pending.verify(&answer).expect("attested").id,
        ek_id(tpm_evidence(&evidence))
    );

    // The intermediate under another manufacturer's root: the refusal names the root the
    // chain needs.
    let wrong_root = TpmAttestor::new(certificates(&other.ek_root_certificate()))
        .expect("root")
        .with_intermediates(certificates(&tpm.ek_ca_certificate()))
        .expect("intermediate");
    let refused = refusal(wrong_root.begin(&evidence));
    assert_eq!(refused.reason, "ek_untrusted");
    assert!(
        refused.message.contains("\"CN=swtpm-localca-rootca\"")
            && refused
                .message
                .contains("through the intermediate(s) \"CN=swtpm-localca\"")
            && refused.message.contains("ek_ca"),
        "{}",
        refused.message
    );
}

/// The TPM's EK certificate issued again by its manufacturer CA with the validity
/// `not_before..not_after` (same key, same issuer, same extensions as rcgen makes them).
fn ek_certificate_valid(
    tpm: &Swtpm,
    evidence: &TpmEvidence,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Vec<u8> {
    let dir = tpm.ek_ca_certificate().parent().expect("ek-ca").to_owned();
    // swtpm_localca's key may be PKCS#1; rcgen reads PKCS#8.
    let key = plant_tests::openssl(&[
        "pkey",
        "-in",
        &dir.join("signkey.pem").display().to_string(),
    ])
    .expect("openssl pkey");
    let key = rcgen::KeyPair::from_pem(&key).expect("CA key");
    let ca = std::fs::read_to_string(tpm.ek_ca_certificate()).expect("CA certificate");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca, key).expect("issuer");
    let ek = x509_cert::Certificate::from_der(&evidence.ek_certificate).expect("EK cert");
    let spki = ek
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .expect("SPKI");
    let public = rcgen::SubjectPublicKeyInfo::from_der(&spki).expect("EK key");
    let mut params = rcgen::CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params
        .signed_by(&public, &issuer)
        .expect("EK certificate")
        .der()
        .to_vec()
}

#[test]
fn an_expired_ek_certificate_is_refused_unless_it_never_expires() {
    let tpm = Swtpm::start_manufactured();
    let attestor = attestor_for(&tpm);
    let mut agent = agent_for(&tpm);
    let evidence = agent.evidence(CSR).expect("evidence");
    let now = time::OffsetDateTime::now_utc();
    let with_certificate = |der: Vec<u8>| {
        with_tpm_evidence(TpmEvidence {
            ek_certificate: der,
            ..tpm_evidence(&evidence).clone()
        })
    };

    let expired = ek_certificate_valid(
        &tpm,
        tpm_evidence(&evidence),
        now - time::Duration::days(400),
        now - time::Duration::days(1),
    );
    let refused = refusal(attestor.begin(&with_certificate(expired)));
    assert_eq!(refused.reason, "ek_expired", "{}", refused.message);
    assert!(
        refused.message.contains("expired at"),
        "{}",
        refused.message
    );

    let not_yet = ek_certificate_valid(
        &tpm,
        tpm_evidence(&evidence),
        now + time::Duration::days(1),
        now + time::Duration::days(400),
    );
    assert_eq!(
        refusal(attestor.begin(&with_certificate(not_yet))).reason,
        "ek_not_yet_valid"
    );

    // The manufacturers' "no expiration", 99991231235959Z: attested, by the real TPM.
    let forever = ek_certificate_valid(
        &tpm,
        tpm_evidence(&evidence),
        now - time::Duration::days(400),
        time::macros::datetime!(9999-12-31 23:59:59 UTC),
    );
    let (sent, pending) = challenge(
        attestor
            .begin(&with_certificate(forever))
            .expect("a 9999 EK certificate is accepted"),
    );
    let answer = agent.answer(&sent, CSR).expect("ActivateCredential");
    pending.verify(&answer).expect("attested");
}

#[test]
fn an_unrestricted_attestation_key_is_refused() {
    let tpm = Swtpm::start_manufactured();
    let attestor = attestor_for(&tpm);
    let evidence = agent_for(&tpm).evidence(CSR).expect("evidence");
    let unrestricted = tss_esapi::utils::create_unrestricted_signing_ecc_public(
        tss_esapi::structures::EccScheme::EcDsa(tss_esapi::structures::HashScheme::new(
            tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256,
        )),
        tss_esapi::interface_types::ecc::EccCurve::NistP256,
    )
    .expect("template");
    let area = unrestricted.marshall().expect("marshal");
    let mut ak_public = (area.len() as u16).to_be_bytes().to_vec();
    ak_public.extend_from_slice(&area);
    let forged = with_tpm_evidence(TpmEvidence {
        ak_public,
        ..tpm_evidence(&evidence).clone()
    });
    let refused = refusal(attestor.begin(&forged));
    assert_eq!(refused.reason, "ak_attributes");
    assert!(
        refused.message.contains("restricted"),
        "{}",
        refused.message
    );
}

#[test]
fn an_answer_from_an_earlier_challenge_does_not_verify_a_new_one() {
    let tpm = Swtpm::start_manufactured();
    let attestor = attestor_for(&tpm);
    let mut agent = agent_for(&tpm);
    let evidence = agent.evidence(CSR).expect("evidence");
    let (first, first_pending) = challenge(attestor.begin(&evidence).expect("accepted"));
    let old_answer = agent.answer(&first, CSR).expect("ActivateCredential");
    assert!(first_pending.verify(&old_answer).is_ok());

    let (_second, second_pending) = challenge(attestor.begin(&evidence).expect("accepted"));
    let refused = second_pending
        .verify(&old_answer)
        .expect_err("replay refused");
    assert_eq!(refused.reason, "wrong_answer");
}

#[test]
fn a_credential_for_another_tpms_ek_cannot_be_activated() {
    let tpm = Swtpm::start_manufactured();
    let other = Swtpm::start_manufactured();
    let attestor = TpmAttestor::new(
        [
            certificates(&tpm.ek_ca_certificate()),
            certificates(&other.ek_ca_certificate()),
        ]
        .concat(),
    )
    .expect("attestor");
    let mut agent = agent_for(&tpm);
    let mut other_agent = agent_for(&other);
    let mine = agent.evidence(CSR).expect("evidence");
    let theirs = other_agent.evidence(CSR).expect("evidence");

    // The other TPM's EK with this TPM's AK: a credential only the other TPM can open, for
    // an AK it does not hold.
    let mixed = with_tpm_evidence(TpmEvidence {
        ak_public: tpm_evidence(&mine).ak_public.clone(),
        ..tpm_evidence(&theirs).clone()
    });
    let (sent, _pending) = challenge(attestor.begin(&mixed).expect("each part is valid"));
    assert!(
        agent.answer(&sent, CSR).is_err(),
        "this TPM lacks the other's EK"
    );
    assert!(
        other_agent.answer(&sent, CSR).is_err(),
        "the other lacks this AK"
    );

    // This TPM's EK certificate with the other TPM's EK public area.
    let mismatched = with_tpm_evidence(TpmEvidence {
        ek_public: tpm_evidence(&theirs).ek_public.clone(),
        ..tpm_evidence(&mine).clone()
    });
    assert_eq!(refusal(attestor.begin(&mismatched)).reason, "ek_mismatch");
}

#[test]
fn malformed_evidence_is_refused_without_a_panic() {
    let tpm = Swtpm::start_manufactured();
    let attestor = attestor_for(&tpm);
    let good = tpm_evidence(&agent_for(&tpm).evidence(CSR).expect("evidence")).clone();

    let mut cases: Vec<TpmEvidence> = Vec::new();
    for field in 0..3 {
        let original = [&good.ek_certificate, &good.ek_public, &good.ak_public][field];
        let variants = [
            Vec::new(),
            vec![0xff; 7],
            original[..original.len() / 2].to_vec(),
            [original.as_slice(), &[0]].concat(),
            original.iter().map(|b| b ^ 0x5a).collect(),
        ];
        for bytes in variants {
            let mut evidence = good.clone();
            *[
                &mut evidence.ek_certificate,
                &mut evidence.ek_public,
                &mut evidence.ak_public,
            ][field] = bytes;
            cases.push(evidence);
        }
    }
    for case in cases {
        let refused = refusal(attestor.begin(&with_tpm_evidence(case)));
        assert!(
            ["malformed", "ek_untrusted", "ek_mismatch"].contains(&refused.reason),
            "unexpected refusal {refused:?}"
        );
    }
    // Every single-byte change to either public area: refused or (where the byte does not
    // matter, e.g. inside the AK's auth policy) accepted, but never a panic.
    for field in [1, 2] {
        let original = if field == 1 {
            &good.ek_public
        } else {
            &good.ak_public
        };
        for at in 0..original.len() {
            let mut mutated = original.clone();
            mutated[at] ^= 0xa5;
            let mut evidence = good.clone();
            if field == 1 {
                evidence.ek_public = mutated;
            } else {
                evidence.ak_public = mutated;
            }
            let _ = attestor.begin(&with_tpm_evidence(evidence));
        }
    }
    let no_method = Evidence {
        csr: CSR.to_vec(),
        method: None,
    };
    assert_eq!(refusal(attestor.begin(&no_method)).reason, "malformed");
}

#[test]
fn attestation_shares_the_tpm_with_a_key_the_process_holds_open() {
    use hsm::Signer;
    // swtpm serves one connection at a time: attestation must go through the same owner
    // thread as the node's TPM key, or it would wait forever behind the key's connection.
    let tpm = Swtpm::start_manufactured();
    let key = hsm::TpmKey::create(&hsm::TpmKeyRef {
        object: hsm::TpmObject::Blob(tpm.dir().join("node.tpmkey")),
        tcti: Some(tpm.tcti()),
    })
    .expect("a TPM key");
    key.sign(b"before").expect("sign");

    let attestor = attestor_for(&tpm);
    let mut agent = agent_for(&tpm);
    let evidence = agent.evidence(CSR).expect("evidence");
    let (sent, pending) = challenge(attestor.begin(&evidence).expect("accepted"));
    let answer = agent.answer(&sent, CSR).expect("ActivateCredential");
    pending.verify(&answer).expect("attested");

    key.sign(b"after").expect("the key still signs");
}

/// `tpm2` (tpm2-tools) against `tpm`, in `dir`; its stdout.
fn tpm2(tpm: &Swtpm, dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(format!("tpm2_{}", args[0]))
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tpm.tcti_string())
        .env("TSS2_LOG", "all+NONE")
        .output()
        .expect("tpm2-tools (apt package tpm2-tools)");
    assert!(
        out.status.success(),
        "tpm2_{}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a manufacturer whose TPMs carry an ECC P-256 EK does: derive that EK (TCG template
/// L-2), certify it with its CA (here swtpm's local CA, which also signed the RSA EK's
/// certificate) and store the certificate at NV index 0x01c0000a. swtpm_setup 0.7 certifies
/// a P-384 EK instead, at 0x01c00016.
fn provision_ecc_p256_ek_certificate(tpm: &Swtpm) {
    let dir = tempfile::tempdir().expect("tempdir");
    tpm2(
        tpm,
        dir.path(),
        &[
            "createek", "-G", "ecc", "-c", "ek.ctx", "-u", "ek.pem", "-f", "pem",
        ],
    );
    tpm2(tpm, dir.path(), &["flushcontext", "-t"]);
    let pem = std::fs::read_to_string(dir.path().join("ek.pem")).expect("EK PEM");
    let spki = plant_tests::pem_blocks(&pem, "PUBLIC KEY")
        .pop()
        .expect("a PUBLIC KEY block");
    let now = time::OffsetDateTime::now_utc();
    let ca_dir = tpm.ek_ca_certificate().parent().expect("ek-ca").to_owned();
    let key = plant_tests::openssl(&[
        "pkey",
        "-in",
        &ca_dir.join("signkey.pem").display().to_string(),
    ])
    .expect("openssl pkey");
    let key = rcgen::KeyPair::from_pem(&key).expect("CA key");
    let ca = std::fs::read_to_string(tpm.ek_ca_certificate()).expect("CA certificate");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca, key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.not_before = now - time::Duration::days(1);
    params.not_after = time::macros::datetime!(9999-12-31 23:59:59 UTC);
    let public = rcgen::SubjectPublicKeyInfo::from_der(&spki).expect("EK key");
    let certificate = params.signed_by(&public, &issuer).expect("EK certificate");
    std::fs::write(dir.path().join("ek.der"), certificate.der()).expect("write");
    let size = certificate.der().len().to_string();
    tpm2(
        tpm,
        dir.path(),
        &[
            "nvdefine",
            "0x01c0000a",
            "-C",
            "o",
            "-s",
            &size,
            "-a",
            "ownerwrite|ownerread|authread|no_da",
        ],
    );
    tpm2(
        tpm,
        dir.path(),
        &["nvwrite", "0x01c0000a", "-C", "o", "-i", "ek.der"],
    );
}

#[test]
fn a_tpm_attests_with_its_ecc_p256_ek_and_that_is_another_node_than_its_rsa_ek() {
    let tpm = Swtpm::start_manufactured();
    provision_ecc_p256_ek_certificate(&tpm);
    let attestor = attestor_for(&tpm);
    let mut ecc = TpmAttestation::open_with(&tpm.tcti_string(), hsm::EndorsementKind::Ecc)
        .expect("open the TPM");
    let evidence = ecc.evidence(CSR).expect("evidence with the ECC EK");
    let certificate =
        x509_cert::Certificate::from_der(&tpm_evidence(&evidence).ek_certificate).expect("EK");
    assert_eq!(
        certificate
            .tbs_certificate
            .subject_public_key_info
            .algorithm
            .oid
            .to_string(),
        "1.2.840.10045.2.1",
        "an EC key (swtpm_setup certifies both EKs)"
    );
    let (sent, pending) = challenge(attestor.begin(&evidence).expect("ECC EK accepted"));
    let answer = ecc
        .answer(&sent, CSR)
        .expect("ActivateCredential with the ECC EK");
    let node = pending.verify(&answer).expect("attested");
    assert_eq!(node.id, ek_id(tpm_evidence(&evidence)));

    // `auto` keeps the RSA EK when it is certified: a node that attested with it stays the
    // same node.
    let mut auto = agent_for(&tpm);
    let rsa = auto.evidence(CSR).expect("evidence");
    assert_ne!(ek_id(tpm_evidence(&rsa)), node.id);
    let (sent, pending) = challenge(attestor.begin(&rsa).expect("RSA EK accepted"));
    let answer = auto.answer(&sent, CSR).expect("ActivateCredential");
    assert_eq!(
        pending.verify(&answer).expect("attested").id,
        ek_id(tpm_evidence(&rsa))
    );

    // A credential made for the ECC EK does not open with the RSA one.
    let (sent, _pending) = challenge(attestor.begin(&evidence).expect("accepted"));
    assert!(auto.answer(&sent, CSR).is_err());
}
