//! `tpm`: node attestation by TPM 2.0 credential activation (DESIGN §5 "Node identity";
//! TPM 2.0 Part 1 §24; TCG EK Credential Profile).
//!
//! 1. The agent sends its TPM's EK certificate (RSA 2048 or ECC P-256), the EK's public area
//!    and the public area of an attestation key (AK) it created under the EK.
//! 2. `TpmAttestor::begin` checks that the EK certificate is valid now and chains to a
//!    configured manufacturer CA (`ek_expired`, `ek_untrusted`), that the EK public area carries the certificate's key
//!    (`ek_mismatch`), and that the AK is a restricted signing key that cannot leave its
//!    TPM: restricted, fixedTPM, fixedParent, sensitiveDataOrigin, sign, not decrypt
//!    (`ak_attributes`). Then it makes a credential in software for the EK and the AK's
//!    name around a fresh random 32-byte secret, the single-use nonce.
//! 3. Only that TPM, with that AK loaded, recovers the secret (TPM2_ActivateCredential).
//!    [`PendingAttestation::verify`] compares the answer in constant time, once
//!    (`wrong_answer`); the agent API forgets it after [`super::CHALLENGE_LIFETIME`].
//!
//! The node's id is the hex SHA-256 of the EK certificate's SubjectPublicKeyInfo (DER):
//! the same for as long as the TPM's endorsement seed lives, whatever AK it presents, and
//! computable by operators with `openssl x509 -pubkey -noout | openssl pkey -pubin -outform
//! der | sha256sum`. Anything undecodable is refused as `malformed`, never a panic; an EK
//! other than the TCG low-range RSA 2048 and ECC P-256 ones (AES-128-CFB, nameAlg SHA-256)
//! as `ek_unsupported`.

mod credential;
mod endorsement;
mod public_area;

use aws_lc_rs::digest;
use proto::agent::{
    challenge, challenge_response, evidence, Challenge, ChallengeResponse, Evidence, TpmChallenge,
};
use subtle::ConstantTimeEq;
use tss_esapi::structures::SymmetricDefinitionObject;
use zeroize::Zeroizing;

use self::endorsement::{EndorsementCertificate, EndorsementKey, ManufacturerCa, Manufacturers};
use self::public_area::PublicArea;
use super::{AttestedNode, NodeAttestor, PendingAttestation, Refusal, Step};
use crate::config::{Config, TpmAttestationConfig};
use crate::Error;

/// The method name, in node SPIFFE IDs `spiffe://<td>/agent/tpm/<id>` and in the config.
const METHOD: &str = "tpm";

/// The issuer's side of TPM credential activation.
#[derive(Debug)]
pub struct TpmAttestor {
    manufacturers: Manufacturers,
    renew_by_attesting: bool,
}

impl TpmAttestor {
    /// An attestor trusting EK certificates signed by any of `manufacturer_cas` (DER
    /// certificates, each a CA). Refuses an empty list: no TPM could ever attest.
    pub fn new(manufacturer_cas: Vec<Vec<u8>>) -> Result<Self, Error> {
        if manufacturer_cas.is_empty() {
            return Err(Error::Config(
                "[attestation.tpm] ek_ca lists no manufacturer CA certificate".into(),
            ));
        }
        let manufacturer_cas = manufacturer_cas
            .iter()
            .map(|der| {
                ManufacturerCa::new(der)
                    .map_err(|e| Error::Config(format!("[attestation.tpm] ek_ca: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            manufacturers: Manufacturers {
                anchors: manufacturer_cas,
                intermediates: Vec::new(),
            },
            renew_by_attesting: true,
        })
    }

    /// The same attestor, also building chains through `intermediates` (DER certificates,
    /// each a CA): an EK certificate one of them signed is trusted when that intermediate
    /// chains to a manufacturer CA.
    pub fn with_intermediates(mut self, intermediates: Vec<Vec<u8>>) -> Result<Self, Error> {
        for der in intermediates {
            let ca = ManufacturerCa::new(&der)
                .map_err(|e| Error::Config(format!("[attestation.tpm] intermediates: {e}")))?;
            self.manufacturers.intermediates.push(ca);
        }
        Ok(self)
    }

    /// The attestor for `[attestation.tpm]`: every certificate in each `ek_ca` and
    /// `intermediates` entry (paths relative to the config file's folder; a file of PEM
    /// certificates or one DER certificate, or a folder of such files).
    pub fn from_config(tpm: &TpmAttestationConfig, config: &Config) -> Result<Self, Error> {
        let load = |key: &str, paths: &[std::path::PathBuf]| -> Result<Vec<Vec<u8>>, Error> {
            let mut certificates = Vec::new();
            for path in paths {
                certificates.extend(certificates_at(key, &config.resolve(path))?);
            }
            Ok(certificates)
        };
        let mut attestor = Self::new(load("ek_ca", &tpm.ek_ca)?)?
            .with_intermediates(load("intermediates", &tpm.intermediates)?)?;
        attestor.renew_by_attesting = tpm.renew_by_attesting;
        for intermediate in &attestor.manufacturers.intermediates {
            if !attestor.manufacturers.chains_to_anchor(intermediate) {
                tracing::warn!(
                    intermediate = %intermediate.subject(),
                    "[attestation.tpm] intermediates: this certificate chains to no ek_ca; EK certificates it signed will be refused"
                );
            }
        }
        Ok(attestor)
    }

    /// The configured manufacturer CAs' subjects, for `issuer status` and logs.
    pub fn manufacturer_cas(&self) -> Vec<String> {
        self.manufacturers
            .anchors
            .iter()
            .map(ManufacturerCa::subject)
            .collect()
    }
}

/// The certificates (DER) at `path` for config key `key`: a file holding PEM certificates or
/// one DER certificate (`.crt`/`.cer`, as TPM vendors publish them), or a folder of such files
/// (read in name order; other files in it are skipped).
fn certificates_at(key: &str, path: &std::path::Path) -> Result<Vec<Vec<u8>>, Error> {
    let what = |message: String| {
        Error::Config(format!(
            "[attestation.tpm] {key} {}: {message}",
            path.display()
        ))
    };
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(Error::io(path))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|file| {
                file.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    ["pem", "crt", "cer", "der"].contains(&e.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        files.sort();
        let mut certificates = Vec::new();
        for file in files {
            certificates.extend(certificates_at(key, &file)?);
        }
        if certificates.is_empty() {
            return Err(what(
                "no certificate file (.pem, .crt, .cer, .der) in this folder".into(),
            ));
        }
        return Ok(certificates);
    }
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    if bytes.first() == Some(&0x30) {
        <x509_cert::Certificate as der::Decode>::from_der(&bytes)
            .map_err(|e| what(format!("not a DER certificate: {e}")))?;
        return Ok(vec![bytes]);
    }
    let certificates = x509_cert::Certificate::load_pem_chain(&bytes)
        .map_err(|e| what(format!("not PEM certificates: {e}")))?;
    if certificates.is_empty() {
        return Err(what("no certificate in it".into()));
    }
    certificates
        .iter()
        .map(|c| der::Encode::to_der(c).map_err(|e| what(e.to_string())))
        .collect()
}

impl NodeAttestor for TpmAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn renews_by_attesting(&self) -> bool {
        self.renew_by_attesting
    }

    fn begin(&self, evidence: &Evidence) -> Result<Step, Refusal> {
        let Some(evidence::Method::Tpm(tpm)) = &evidence.method else {
            return Err(Refusal::new(
                "malformed",
                "the evidence is not TPM evidence",
            ));
        };
        // Decode everything first, then judge: undecodable input is `malformed` whatever
        // else is wrong with it.
        let ek_certificate = EndorsementCertificate::decode(&tpm.ek_certificate)?;
        let ek_public = PublicArea::decode(&tpm.ek_public, "EK")?;
        let ak_public = PublicArea::decode(&tpm.ak_public, "AK")?;
        ek_certificate.verify(&self.manufacturers, std::time::SystemTime::now())?;
        check_ek(&ek_certificate, &ek_public)?;
        check_ak(&ak_public)?;

        let mut secret = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(secret.as_mut()).map_err(|_| {
            Refusal::new(
                "internal",
                "the issuer could not make a challenge; try again",
            )
        })?;
        let sealed =
            credential::make_credential(&ek_certificate, ak_public.name(), secret.as_ref())
                .map_err(|e| {
                    Refusal::new(
                        "ek_unsupported",
                        format!("no credential can be made for this EK: {}", e.0),
                    )
                })?;
        let ek_hash = hex::encode(digest::digest(&digest::SHA256, &ek_certificate.spki));
        let node = AttestedNode {
            method: METHOD,
            attested_with: crate::store::AttestedWith {
                lineage: format!("ek:{ek_hash}"),
                certificate_serial: None,
                key_sha256: None,
            },
            id: ek_hash,
            can_reattest: true,
        };
        Ok(Step::Challenge {
            challenge: Challenge {
                method: Some(challenge::Method::Tpm(TpmChallenge {
                    credential_blob: sealed.credential_blob,
                    encrypted_secret: sealed.encrypted_secret,
                })),
            },
            pending: Box::new(PendingTpm { secret, node }),
        })
    }
}

/// The EK public area must carry the certificate's key, and be a default EK's kind: an RSA
/// or P-256 restricted decryption key with AES-128-CFB (the seed's symmetric key is made for
/// that algorithm).
fn check_ek(certificate: &EndorsementCertificate, public: &PublicArea) -> Result<(), Refusal> {
    let mismatch = |what: &str| {
        Refusal::new(
            "ek_mismatch",
            format!("the EK public area {what} the EK certificate's key"),
        )
    };
    let symmetric = match &certificate.key {
        EndorsementKey::Rsa { modulus, exponent } => {
            let rsa = public.rsa().ok_or_else(|| mismatch("is not RSA, unlike"))?;
            if strip_leading_zeros(rsa.modulus) != modulus.as_slice() || rsa.exponent != *exponent {
                return Err(mismatch("does not hold"));
            }
            rsa.symmetric
        }
        EndorsementKey::EccP256 { point } => {
            let ecc = public.ecc().ok_or_else(|| mismatch("is not ECC, unlike"))?;
            // Coordinates may come without their leading zero bytes: compare as numbers.
            let same = |ours: &[u8], theirs: &[u8]| {
                strip_leading_zeros(ours) == strip_leading_zeros(theirs)
            };
            if !ecc.p256 || !same(ecc.x, &point[1..33]) || !same(ecc.y, &point[33..]) {
                return Err(mismatch("does not hold"));
            }
            ecc.symmetric
        }
    };
    let attributes = public.attributes();
    if !(attributes.restricted() && attributes.decrypt() && !attributes.sign_encrypt()) {
        return Err(Refusal::new(
            "ek_mismatch",
            "the EK public area is not a restricted decryption key, as an EK is",
        ));
    }
    if symmetric != SymmetricDefinitionObject::AES_128_CFB {
        return Err(Refusal::new(
            "ek_unsupported",
            "the EK's symmetric algorithm is not AES-128-CFB (the TCG default low-range EKs)",
        ));
    }
    Ok(())
}

/// The AK must be a restricted signing key that cannot leave its TPM: a credential for a
/// key without them would prove nothing about the TPM that answers.
fn check_ak(ak: &PublicArea) -> Result<(), Refusal> {
    let attributes = ak.attributes();
    let required = [
        ("restricted", attributes.restricted()),
        ("fixedTPM", attributes.fixed_tpm()),
        ("fixedParent", attributes.fixed_parent()),
        ("sensitiveDataOrigin", attributes.sensitive_data_origin()),
        ("sign", attributes.sign_encrypt()),
    ];
    let missing: Vec<&str> = required
        .iter()
        .filter(|(_, set)| !set)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(Refusal::new(
            "ak_attributes",
            format!(
                "the attestation key lacks {}; it must be a restricted signing key created \
                 in the TPM (restricted, fixedTPM, fixedParent, sensitiveDataOrigin, sign)",
                missing.join(", ")
            ),
        ));
    }
    if attributes.decrypt() {
        return Err(Refusal::new(
            "ak_attributes",
            "the attestation key also decrypts; it must be a signing key only",
        ));
    }
    Ok(())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// A credential sent, waiting for the secret inside it.
struct PendingTpm {
    secret: Zeroizing<[u8; 32]>,
    node: AttestedNode,
}

impl std::fmt::Debug for PendingTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTpm")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl PendingAttestation for PendingTpm {
    fn verify(self: Box<Self>, response: &ChallengeResponse) -> Result<AttestedNode, Refusal> {
        let Some(challenge_response::Method::Tpm(answer)) = &response.method else {
            return Err(Refusal::new(
                "malformed",
                "the answer is not a TPM challenge response",
            ));
        };
        // Lengths are public (always 32 here); the bytes are compared in constant time.
        let matches = answer.secret.len() == self.secret.len()
            && bool::from(answer.secret.as_slice().ct_eq(self.secret.as_ref()));
        if !matches {
            return Err(Refusal::new(
                "wrong_answer",
                "the TPM's answer does not match the credential sent; the EK and AK must \
                 be in the same TPM, and each challenge is answered once",
            ));
        }
        Ok(self.node)
    }
}

#[cfg(test)]
mod tests {
    use der::Encode;

    use super::*;

    #[test]
    fn leading_zeros_are_stripped_for_modulus_comparison() {
        assert_eq!(strip_leading_zeros(&[0, 0, 1, 0]), &[1, 0]);
        assert_eq!(strip_leading_zeros(&[0, 0]), &[] as &[u8]);
    }

    #[test]
    fn an_empty_manufacturer_list_is_a_config_error() {
        assert!(matches!(
            TpmAttestor::new(Vec::new()),
            Err(Error::Config(_))
        ));
    }

    fn certificate(name: &str, ca: bool) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.self_signed(&key).expect("certificate").pem()
    }

    /// An `issuer init` configuration with `[attestation.tpm] ek_ca = ["ek-ca/vendor.pem"]`
    /// holding `pem`.
    fn config_with_ek_ca(dir: &std::path::Path, pem: &str) -> Config {
        let options = crate::init::InitOptions {
            dir: dir.to_owned(),
            trust_domain: "plant.example".into(),
            organization: "Plant".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            crl_listen: "127.0.0.1:0".parse().expect("addr"),
            agent_api_listen: "127.0.0.1:0".parse().expect("addr"),
            ca_key: "soft:path=ca/issuing.key".into(),
            dns: vec![],
            ips: vec![],
        };
        let mut text = crate::init::template(&options);
        text.push_str("\n[attestation.tpm]\nek_ca = [\"ek-ca/vendor.pem\"]\n");
        std::fs::create_dir_all(dir.join("ek-ca")).expect("mkdir");
        std::fs::write(dir.join("ek-ca/vendor.pem"), pem).expect("write PEM");
        let path = dir.join("issuer.toml");
        std::fs::write(&path, text).expect("write config");
        Config::load(&path).expect("config parses")
    }

    #[test]
    fn from_config_trusts_every_certificate_in_each_ek_ca_file_relative_to_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = certificate("Vendor Root", true) + &certificate("Vendor EK CA", true);
        let config = config_with_ek_ca(dir.path(), &pem);
        let tpm = config.attestation.tpm.as_ref().expect("[attestation.tpm]");
        let attestor = TpmAttestor::from_config(tpm, &config).expect("attestor");
        assert_eq!(
            attestor.manufacturer_cas(),
            vec!["CN=Vendor Root".to_owned(), "CN=Vendor EK CA".to_owned()]
        );
    }

    #[test]
    fn intermediates_come_from_a_folder_of_der_and_pem_files_as_vendors_publish_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_with_ek_ca(dir.path(), &certificate("Vendor Root", true));
        let folder = dir.path().join("ek-ca/intermediates");
        std::fs::create_dir_all(&folder).expect("mkdir");
        let der = |pem: String| {
            x509_cert::Certificate::load_pem_chain(pem.as_bytes()).expect("pem")[0]
                .to_der()
                .expect("der")
        };
        std::fs::write(
            folder.join("a-ek-ca-1.crt"),
            der(certificate("EK CA 1", true)),
        )
        .expect("write");
        std::fs::write(folder.join("b-ek-ca-2.pem"), certificate("EK CA 2", true)).expect("write");
        std::fs::write(folder.join("README.txt"), "vendor notes").expect("write");
        let mut tpm = config.attestation.tpm.clone().expect("[attestation.tpm]");
        tpm.intermediates = vec!["ek-ca/intermediates".into()];
        let attestor = TpmAttestor::from_config(&tpm, &config).expect("attestor");
        let names: Vec<String> = attestor
            .manufacturers
            .intermediates
            .iter()
            .map(ManufacturerCa::subject)
            .collect();
        assert_eq!(names, ["CN=EK CA 1", "CN=EK CA 2"]);

        // A folder with no certificate in it is a mistake worth stopping for.
        std::fs::create_dir_all(dir.path().join("empty")).expect("mkdir");
        tpm.intermediates = vec!["empty".into()];
        let error = TpmAttestor::from_config(&tpm, &config).expect_err("refused");
        assert!(
            matches!(&error, Error::Config(m) if m.contains("intermediates") && m.contains("no certificate file")),
            "{error}"
        );
    }

    #[test]
    fn a_configured_ek_ca_that_is_not_a_ca_is_a_config_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config_with_ek_ca(dir.path(), &certificate("Some Leaf", false));
        let tpm = config.attestation.tpm.as_ref().expect("[attestation.tpm]");
        let error = TpmAttestor::from_config(tpm, &config).expect_err("refused");
        assert!(
            matches!(&error, Error::Config(m) if m.contains("Some Leaf") && m.contains("not a CA")),
            "{error}"
        );
    }

    #[test]
    fn garbage_ca_certificates_are_config_errors() {
        assert!(matches!(
            TpmAttestor::new(vec![vec![0x30, 0x03, 1, 2, 3]]),
            Err(Error::Config(_))
        ));
    }
}
