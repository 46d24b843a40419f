//! `x509pop` node attestation: proof of possession of a device certificate this issuer
//! enrolled over EST. The issuer sends a nonce; the device key signs
//! `nonce || SHA-256(csr)`, which binds the answer to the node SVID request of this very
//! attestation. The key may live in a TPM or PKCS#11 token: it signs through [`hsm::Signer`].

use std::path::Path;
use std::sync::Arc;

use proto::agent::{
    challenge, challenge_response, evidence, Challenge, ChallengeResponse, Evidence,
    X509PopChallengeResponse, X509PopEvidence,
};
use sha2::{Digest, Sha256};

use super::NodeAttestation;
use crate::certificate::CertificateFacts;
use crate::pem_files::{self, CHAIN_FILE};
use crate::Error;

/// Longest nonce accepted from the issuer; a real one is 32 bytes.
const MAX_NONCE: usize = 1024;

/// Attestation with a device certificate and its key.
#[derive(Debug)]
pub struct X509PopAttestation {
    /// Leaf first, then intermediates (DER).
    chain: Vec<Vec<u8>>,
    key: Arc<dyn hsm::Signer>,
}

impl X509PopAttestation {
    /// The certificate in `certificate` (plus `chain.pem` beside it when the file holds only
    /// the leaf) with `key`. Fails if the key does not belong to the certificate.
    pub fn open(certificate: &Path, key: Arc<dyn hsm::Signer>) -> Result<Self, Error> {
        let mut chain = pem_files::read_certificates(certificate)?;
        let Some(leaf) = chain.first() else {
            return Err(Error::Usage(format!(
                "{} holds no certificate; give the cert.pem written by `agent enroll`",
                certificate.display()
            )));
        };
        CertificateFacts::from_der(&certificate.display().to_string(), leaf)?
            .ensure_key(&certificate.display().to_string(), key.public_key())?;
        if chain.len() == 1 {
            if let Some(dir) = certificate.parent() {
                let beside = dir.join(CHAIN_FILE);
                if beside.exists() {
                    chain.extend(pem_files::read_certificates(&beside)?);
                }
            }
        }
        Ok(Self { chain, key })
    }

    /// The message the device key signs: `nonce || SHA-256(csr)`.
    pub fn signed_message(nonce: &[u8], csr: &[u8]) -> Vec<u8> {
        let mut message = Vec::with_capacity(nonce.len() + 32);
        message.extend_from_slice(nonce);
        message.extend_from_slice(&Sha256::digest(csr));
        message
    }
}

impl NodeAttestation for X509PopAttestation {
    fn method(&self) -> &'static str {
        "x509pop"
    }

    fn evidence(&mut self, csr: &[u8]) -> Result<Evidence, Error> {
        Ok(Evidence {
            csr: csr.to_vec(),
            method: Some(evidence::Method::X509pop(X509PopEvidence {
                chain: self.chain.clone(),
            })),
        })
    }

    fn answer(&mut self, challenge: &Challenge, csr: &[u8]) -> Result<ChallengeResponse, Error> {
        let Some(challenge::Method::X509pop(challenge)) = &challenge.method else {
            return Err(Error::Attestation(
                "the issuer sent a challenge for another method than x509pop".into(),
            ));
        };
        if challenge.nonce.is_empty() || challenge.nonce.len() > MAX_NONCE {
            return Err(Error::Attestation(format!(
                "the issuer's x509pop nonce has {} bytes; expected 1 to {MAX_NONCE}",
                challenge.nonce.len()
            )));
        }
        // hsm::Signer hashes with SHA-256 and returns DER ECDSA-Sig-Value.
        let signature = self
            .key
            .sign(&Self::signed_message(&challenge.nonce, csr))?;
        Ok(ChallengeResponse {
            method: Some(challenge_response::Method::X509pop(
                X509PopChallengeResponse { signature },
            )),
        })
    }

    fn can_reattest(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use proto::agent::X509PopChallenge;

    fn device(dir: &Path) -> (std::path::PathBuf, Arc<hsm::SoftKey>) {
        let key = Arc::new(hsm::SoftKey::generate().expect("key"));
        let pem = key.to_pkcs8_pem().expect("pem");
        let rc_key = rcgen::KeyPair::from_pem(&pem).expect("rcgen key");
        let cert = rcgen::CertificateParams::new(vec!["plc-7".into()])
            .expect("params")
            .self_signed(&rc_key)
            .expect("cert");
        let path = dir.join("cert.pem");
        std::fs::write(&path, cert.pem()).expect("write");
        (path, key)
    }

    #[test]
    fn answer_is_the_device_keys_signature_over_nonce_and_csr_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = device(dir.path());
        let mut attestation =
            X509PopAttestation::open(&cert, Arc::clone(&key) as Arc<dyn hsm::Signer>)
                .expect("open");
        let evidence = attestation.evidence(b"the csr").expect("evidence");
        let Some(evidence::Method::X509pop(pop)) = evidence.method else {
            panic!("x509pop evidence");
        };
        assert_eq!(pop.chain.len(), 1);
        let challenge = Challenge {
            method: Some(challenge::Method::X509pop(X509PopChallenge {
                nonce: vec![7; 32],
            })),
        };
        let answer = attestation.answer(&challenge, b"the csr").expect("answer");
        let Some(challenge_response::Method::X509pop(answer)) = answer.method else {
            panic!("x509pop answer");
        };
        let public = p256::ecdsa::VerifyingKey::from_sec1_bytes(
            hsm::Signer::public_key(key.as_ref()).point(),
        )
        .expect("public key");
        let signature = p256::ecdsa::Signature::from_der(&answer.signature).expect("DER");
        let message = X509PopAttestation::signed_message(&[7; 32], b"the csr");
        public.verify(&message, &signature).expect("verifies");
        let other = X509PopAttestation::signed_message(&[7; 32], b"another csr");
        assert!(public.verify(&other, &signature).is_err());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _) = device(dir.path());
        let stranger: Arc<dyn hsm::Signer> = Arc::new(hsm::SoftKey::generate().expect("key"));
        assert!(X509PopAttestation::open(&cert, stranger).is_err());
    }

    #[test]
    fn empty_nonce_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = device(dir.path());
        let mut attestation = X509PopAttestation::open(&cert, key).expect("open");
        let challenge = Challenge {
            method: Some(challenge::Method::X509pop(X509PopChallenge {
                nonce: vec![],
            })),
        };
        assert!(attestation.answer(&challenge, b"csr").is_err());
    }
}
