//! `x509pop`: proof of possession of a device certificate this issuer enrolled over EST.
//!
//! The evidence's first certificate must be, byte for byte, one in the inventory, and still
//! valid (not revoked, expired or superseded by a re-enrollment). The agent then signs
//! `nonce || SHA-256(csr)` with the device key: the 32-byte nonce makes the answer fresh, and
//! the CSR digest binds it to the key the node SVID will certify, so an answer overheard on
//! one attestation can't carry another key.
//!
//! Only certificates of the labels in `[agent_api] x509pop_labels` attest (never an operator
//! profile's).
//!
//! The node id is the certificate's subject commonName with every character outside
//! `[A-Za-z0-9._-]` replaced by `_` (a SPIFFE path segment allows exactly those):
//! `spiffe://<td>/agent/x509pop/<cn>`. The commonName alone is not the node's identity: the
//! node record is bound to the certificate's lineage ([`certificate_lineage`]), which the
//! issuer assigned, and a certificate of another lineage with the same commonName is refused
//! (`node_conflict`, in the agent API) until an operator evicts the node.

use std::sync::Arc;

use der::Decode;
use proto::agent::{
    challenge, challenge_response, evidence, Challenge, ChallengeResponse, Evidence,
    X509PopChallenge,
};
use sha2::Digest;

use super::{AttestedNode, NodeAttestor, PendingAttestation, Refusal, Step};
use crate::clock::Clock;
use crate::serial::Serial;
use crate::store::{AttestedWith, CertificateRecord, CertificateStore, Status};
use crate::Error;

/// The method name, as in `spiffe://<td>/agent/x509pop/<cn>`.
pub const METHOD: &str = "x509pop";

/// Longest certificate accepted as evidence.
const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// Longest renewal chain walked back to find a lineage; far beyond any real device (a
/// certificate renewed daily for 270 years), it only bounds a corrupt store's loop.
const MAX_RENEWAL_CHAIN: usize = 100_000;

/// Attests nodes holding a device certificate from this issuer's inventory.
#[derive(Debug)]
pub struct X509PopAttestor {
    certificates: Arc<dyn CertificateStore>,
    clock: Arc<dyn Clock>,
    /// The labels whose certificates may attest (validated at startup: never an operator
    /// profile).
    labels: Vec<String>,
}

impl X509PopAttestor {
    /// An attestor judging certificates against `certificates`, taking those of `labels`.
    pub fn new(
        certificates: Arc<dyn CertificateStore>,
        clock: Arc<dyn Clock>,
        labels: Vec<String>,
    ) -> Self {
        Self {
            certificates,
            clock,
            labels,
        }
    }
}

/// The lineage of a device certificate: `certificate:<serial>` of the first certificate of
/// its renewal chain (an enrollment starts a chain; simplereenroll names the certificate it
/// renews in `renews`). The issuer assigned it: no enrollee chooses it, and every renewal
/// keeps it. The one place node bindings and revocations derive a lineage from; point it at
/// the inventory's own lineage id once certificate records carry one.
pub fn certificate_lineage(
    certificates: &dyn CertificateStore,
    record: &CertificateRecord,
) -> Result<String, Error> {
    // Renewals recorded since lineages were kept name their root directly; older ones are
    // found by walking the `renews` chain back to its first certificate.
    let root = certificates.lineage(&record.serial)?.root;
    if root != record.serial {
        return Ok(format!("certificate:{root}"));
    }
    let mut first = record.serial;
    let mut renews = record.renews;
    for _ in 0..MAX_RENEWAL_CHAIN {
        let Some(serial) = renews else {
            return Ok(format!("certificate:{first}"));
        };
        match certificates.get(&serial)? {
            Some(earlier) => {
                first = earlier.serial;
                renews = earlier.renews;
            }
            // Never expected (records are kept); the chain starts where the inventory does.
            None => return Ok(format!("certificate:{first}")),
        }
    }
    Err(Error::Store(format!(
        "the renewal chain of certificate {} is longer than {MAX_RENEWAL_CHAIN}",
        record.serial
    )))
}

/// What is waiting for the agent's signature.
struct Pending {
    nonce: [u8; 32],
    csr_digest: [u8; 32],
    /// The device certificate's public key (uncompressed P-256 point).
    public_key: Vec<u8>,
    id: String,
    attested_with: AttestedWith,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("x509pop::Pending")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NodeAttestor for X509PopAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn begin(&self, evidence: &Evidence) -> Result<Step, Refusal> {
        let Some(evidence::Method::X509pop(pop)) = &evidence.method else {
            return Err(Refusal::new("wrong_method", "the evidence is not x509pop"));
        };
        let Some(leaf) = pop.chain.first() else {
            return Err(Refusal::new(
                "no_certificate",
                "x509pop evidence holds no certificate",
            ));
        };
        if leaf.len() > MAX_CERTIFICATE_BYTES {
            return Err(Refusal::new(
                "bad_certificate",
                "the certificate is too large",
            ));
        }
        let certificate = x509_cert::Certificate::from_der(leaf).map_err(|e| {
            Refusal::new(
                "bad_certificate",
                format!("the certificate does not parse: {e}"),
            )
        })?;
        let foreign = || {
            Refusal::new(
                "certificate_unknown",
                "this certificate was not issued by this issuer; x509pop takes the device \
                 certificate the device enrolled here over EST",
            )
        };
        let serial = Serial::from_bytes(certificate.tbs_certificate.serial_number.as_bytes())
            .ok_or_else(foreign)?;
        let record = self
            .certificates
            .get(&serial)
            .map_err(inventory_unreadable)?
            .ok_or_else(foreign)?;
        if record.der != *leaf {
            return Err(foreign());
        }
        if [crate::profile::SVID, crate::profile::NODE_SVID].contains(&record.label.as_str()) {
            return Err(Refusal::new(
                "certificate_profile",
                "an SVID is not a device certificate; x509pop takes the certificate the \
                 device enrolled over EST",
            ));
        }
        if !self.labels.contains(&record.label) {
            return Err(Refusal::new(
                "certificate_profile",
                format!(
                    "certificates of label {} can't attest nodes; x509pop takes device \
                     certificates of label {} (the issuer's [agent_api] x509pop_labels)",
                    record.label,
                    self.labels.join(", ")
                ),
            ));
        }
        match record.status_at(self.clock.now().unix_timestamp()) {
            Status::Valid => {}
            Status::Revoked => {
                return Err(Refusal::new(
                    "certificate_revoked",
                    format!("certificate {} is revoked", record.serial),
                ))
            }
            Status::Expired => {
                return Err(Refusal::new(
                    "certificate_expired",
                    format!(
                        "certificate {} expired; enroll the device again over EST",
                        record.serial
                    ),
                ))
            }
            Status::Superseded => {
                return Err(Refusal::new(
                    "certificate_superseded",
                    format!(
                        "certificate {} was renewed; attest with the newer certificate",
                        record.serial
                    ),
                ))
            }
        }
        // Revoking any certificate of a lineage ends it: none of its members attests again.
        let ended = self
            .certificates
            .lineage(&serial)
            .map_err(inventory_unreadable)?
            .ended;
        if let Some(end) = ended {
            return Err(Refusal::new(
                "certificate_revoked",
                format!(
                    "certificate {} belongs to a lineage that ended when certificate {} was \
                     revoked; enroll the device again with a new token",
                    record.serial, end.revoked
                ),
            ));
        }
        let public_key = p256_point(&certificate)?;
        let id = node_id(&certificate)?;
        let lineage =
            certificate_lineage(&*self.certificates, &record).map_err(inventory_unreadable)?;
        let spki = der::Encode::to_der(&certificate.tbs_certificate.subject_public_key_info)
            .map_err(|e| {
                Refusal::new(
                    "bad_certificate",
                    format!("the certificate's public key does not encode: {e}"),
                )
            })?;
        let attested_with = AttestedWith {
            lineage,
            certificate_serial: Some(record.serial.to_string()),
            key_sha256: Some(hex::encode(sha2::Sha256::digest(&spki))),
        };
        let nonce: [u8; 32] = rand::random();
        Ok(Step::Challenge {
            challenge: Challenge {
                method: Some(challenge::Method::X509pop(X509PopChallenge {
                    nonce: nonce.to_vec(),
                })),
            },
            pending: Box::new(Pending {
                nonce,
                csr_digest: sha2::Sha256::digest(&evidence.csr).into(),
                public_key,
                id,
                attested_with,
            }),
        })
    }
}

impl PendingAttestation for Pending {
    fn verify(self: Box<Self>, response: &ChallengeResponse) -> Result<AttestedNode, Refusal> {
        let Some(challenge_response::Method::X509pop(answer)) = &response.method else {
            return Err(Refusal::new(
                "wrong_answer",
                "the challenge was x509pop; the answer is not",
            ));
        };
        let mut message = Vec::with_capacity(64);
        message.extend_from_slice(&self.nonce);
        message.extend_from_slice(&self.csr_digest);
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &self.public_key,
        )
        .verify(&message, &answer.signature)
        .map_err(|_| {
            Refusal::new(
                "wrong_answer",
                "the signature over nonce || SHA-256(csr) does not verify with the \
                 certificate's key (ECDSA P-256 with SHA-256, DER)",
            )
        })?;
        Ok(AttestedNode {
            method: METHOD,
            id: self.id,
            can_reattest: true,
            attested_with: self.attested_with,
        })
    }
}

/// The certificate's P-256 public key point; other key types are refused.
/// The refusal for an inventory that can't be read (logged here; the agent retries).
fn inventory_unreadable(error: Error) -> Refusal {
    tracing::error!(%error, "inventory lookup failed");
    Refusal::new(
        "store",
        "the issuer could not read its inventory; try again",
    )
}

fn p256_point(certificate: &x509_cert::Certificate) -> Result<Vec<u8>, Refusal> {
    let spki = &certificate.tbs_certificate.subject_public_key_info;
    let p256 = spki.algorithm.oid == const_oid::db::rfc5912::ID_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
            == Some(const_oid::db::rfc5912::SECP_256_R_1);
    match spki.subject_public_key.as_bytes() {
        Some(point) if p256 => Ok(point.to_vec()),
        _ => Err(Refusal::new(
            "key_type",
            "x509pop supports ECDSA P-256 device keys",
        )),
    }
}

/// The subject commonName as a SPIFFE path segment: characters outside `[A-Za-z0-9._-]`
/// become `_`.
fn node_id(certificate: &x509_cert::Certificate) -> Result<String, Refusal> {
    let common_name = certificate
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == const_oid::db::rfc4519::CN)
        .and_then(|atv| match der::Tagged::tag(&atv.value) {
            der::Tag::Utf8String | der::Tag::PrintableString | der::Tag::Ia5String => {
                std::str::from_utf8(atv.value.value())
                    .ok()
                    .map(str::to_owned)
            }
            _ => None,
        })
        .ok_or_else(|| {
            Refusal::new(
                "no_common_name",
                "the certificate has no subject commonName to name the node by",
            )
        })?;
    let id: String = common_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        return Err(Refusal::new(
            "no_common_name",
            format!("the commonName {common_name:?} can't name a node"),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CertificateRecord, Store};
    use proto::agent::{X509PopChallengeResponse, X509PopEvidence};

    #[derive(Debug)]
    struct FixedClock(i64);
    impl Clock for FixedClock {
        fn now(&self) -> time::OffsetDateTime {
            time::OffsetDateTime::from_unix_timestamp(self.0).expect("time")
        }
    }

    struct Device {
        key: rcgen::KeyPair,
        der: Vec<u8>,
        serial: Serial,
    }

    fn device(common_name: &str) -> Device {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let serial = Serial::random();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.serial_number = Some(serial.0.to_vec().into());
        let der = params.self_signed(&key).expect("sign").der().to_vec();
        Device { key, der, serial }
    }

    fn record(store: &Store, device: &Device, label: &str, status: Status) {
        store
            .certificates
            .record_new(
                &device.serial,
                &CertificateRecord {
                    serial: device.serial,
                    subject: "plc".into(),
                    sans: vec![],
                    label: label.into(),
                    owner: "test".into(),
                    issued_at: 0,
                    not_after: 1_000,
                    status,
                    renews: None,
                    der: device.der.clone(),
                },
            )
            .expect("record");
    }

    fn evidence(device: &Device) -> Evidence {
        Evidence {
            csr: b"the node SVID CSR".to_vec(),
            method: Some(evidence::Method::X509pop(X509PopEvidence {
                chain: vec![device.der.clone()],
            })),
        }
    }

    fn answer(key: &rcgen::KeyPair, challenge: &Challenge, csr: &[u8]) -> ChallengeResponse {
        let Some(challenge::Method::X509pop(c)) = &challenge.method else {
            panic!("not x509pop");
        };
        let mut message = c.nonce.clone();
        message.extend_from_slice(&sha2::Sha256::digest(csr));
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
        )
        .expect("key");
        let signature = pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), &message)
            .expect("sign");
        ChallengeResponse {
            method: Some(challenge_response::Method::X509pop(
                X509PopChallengeResponse {
                    signature: signature.as_ref().to_vec(),
                },
            )),
        }
    }

    fn setup() -> (tempfile::TempDir, Store, X509PopAttestor) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let attestor = X509PopAttestor::new(
            store.certificates.clone(),
            Arc::new(FixedClock(10)),
            vec!["device".into()],
        );
        (dir, store, attestor)
    }

    fn challenge(
        attestor: &X509PopAttestor,
        evidence: &Evidence,
    ) -> (Challenge, Box<dyn PendingAttestation>) {
        match attestor.begin(evidence).expect("begin") {
            Step::Challenge { challenge, pending } => (challenge, pending),
            Step::Attested(_) => panic!("x509pop always challenges"),
        }
    }

    #[tokio::test]
    async fn a_device_certificate_from_the_inventory_attests_with_its_key() {
        let (_dir, store, attestor) = setup();
        let device = device("plc 7/cell#2");
        record(&store, &device, "device", Status::Valid);
        let evidence = evidence(&device);
        let (challenge, pending) = challenge(&attestor, &evidence);
        let node = pending
            .verify(&answer(&device.key, &challenge, &evidence.csr))
            .expect("verified");
        assert_eq!(node.id, "plc_7_cell_2");
        assert_eq!(node.method, "x509pop");
        assert!(node.can_reattest);
    }

    #[tokio::test]
    async fn a_renewal_keeps_the_lineage_of_the_first_certificate_and_it_binds_the_node() {
        let (_dir, store, attestor) = setup();
        let first = device("gw");
        record(&store, &first, "device", Status::Superseded);
        let renewed = device("gw");
        let mut renewal = store
            .certificates
            .get(&first.serial)
            .expect("get")
            .expect("known");
        renewal.serial = renewed.serial;
        renewal.renews = Some(first.serial);
        renewal.status = Status::Valid;
        renewal.der = renewed.der.clone();
        store
            .certificates
            .record_new(&renewed.serial, &renewal)
            .expect("record");
        let lineage = certificate_lineage(&*store.certificates, &renewal).expect("lineage");
        assert_eq!(lineage, format!("certificate:{}", first.serial));

        let evidence = evidence(&renewed);
        let (challenge, pending) = challenge(&attestor, &evidence);
        let node = pending
            .verify(&answer(&renewed.key, &challenge, &evidence.csr))
            .expect("verified");
        assert_eq!(node.attested_with.lineage, lineage);
        assert_eq!(
            node.attested_with.certificate_serial,
            Some(renewed.serial.to_string())
        );
        // Another enrollment with the same commonName is another lineage.
        let stranger = device("gw");
        record(&store, &stranger, "device", Status::Valid);
        let evidence = self::evidence(&stranger);
        let (challenge, pending) = self::challenge(&attestor, &evidence);
        let other = pending
            .verify(&answer(&stranger.key, &challenge, &evidence.csr))
            .expect("verified");
        assert_eq!(other.id, node.id);
        assert_ne!(other.attested_with.lineage, node.attested_with.lineage);
        assert_ne!(
            other.attested_with.key_sha256,
            node.attested_with.key_sha256
        );
    }

    #[tokio::test]
    async fn revoked_superseded_expired_and_svid_certificates_are_refused() {
        let (_dir, store, attestor) = setup();
        for (status, label, not_after_past, reason) in [
            (Status::Revoked, "device", false, "certificate_revoked"),
            (
                Status::Superseded,
                "device",
                false,
                "certificate_superseded",
            ),
            (Status::Valid, "device", true, "certificate_expired"),
            (Status::Valid, "svid", false, "certificate_profile"),
            (Status::Valid, "operator", false, "certificate_profile"),
        ] {
            let device = device("gw");
            record(&store, &device, label, status);
            let refused = if not_after_past {
                let late = X509PopAttestor::new(
                    store.certificates.clone(),
                    Arc::new(FixedClock(5_000)),
                    vec!["device".into()],
                );
                late.begin(&evidence(&device))
            } else {
                attestor.begin(&evidence(&device))
            };
            assert_eq!(refused.expect_err(reason).reason, reason);
        }
    }

    #[tokio::test]
    async fn a_foreign_certificate_is_refused_even_under_a_known_serial() {
        let (_dir, store, attestor) = setup();
        let ours = device("gw");
        record(&store, &ours, "device", Status::Valid);
        let stranger = device("gw");
        let refused = attestor.begin(&evidence(&stranger)).expect_err("unknown");
        assert_eq!(refused.reason, "certificate_unknown");
        // Same serial, other bytes (another CA reusing our serial).
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.serial_number = Some(ours.serial.0.to_vec().into());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let forged = Device {
            der: params.self_signed(&key).expect("sign").der().to_vec(),
            key,
            serial: ours.serial,
        };
        let refused = attestor.begin(&evidence(&forged)).expect_err("forged");
        assert_eq!(refused.reason, "certificate_unknown");
    }

    #[tokio::test]
    async fn a_wrong_key_a_wrong_csr_or_a_replayed_answer_is_refused() {
        let (_dir, store, attestor) = setup();
        let device = device("gw");
        record(&store, &device, "device", Status::Valid);
        let evidence = evidence(&device);

        let (challenge_1, pending) = challenge(&attestor, &evidence);
        let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("k");
        let refused = pending
            .verify(&answer(&other_key, &challenge_1, &evidence.csr))
            .expect_err("wrong key");
        assert_eq!(refused.reason, "wrong_answer");

        // Signed over another CSR: the answer can't carry a different node SVID key.
        let (challenge_2, pending) = challenge(&attestor, &evidence);
        let refused = pending
            .verify(&answer(&device.key, &challenge_2, b"another CSR"))
            .expect_err("wrong csr");
        assert_eq!(refused.reason, "wrong_answer");

        // A correct answer to one challenge does not answer the next: each nonce is new, and
        // a pending attestation is consumed by its one verification.
        let (challenge_3, pending) = challenge(&attestor, &evidence);
        let good = answer(&device.key, &challenge_3, &evidence.csr);
        pending.verify(&good).expect("verified once");
        let (challenge_4, pending) = challenge(&attestor, &evidence);
        assert_ne!(challenge_3, challenge_4);
        let refused = pending.verify(&good).expect_err("replayed");
        assert_eq!(refused.reason, "wrong_answer");
    }
}
