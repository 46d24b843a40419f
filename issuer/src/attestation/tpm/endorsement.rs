//! EK certificates (TCG EK Credential Profile §3) and the manufacturer CAs that sign them.
//!
//! EK certificates are not web PKI leaves: a critical subjectAltName that is a directoryName
//! of TPM manufacturer attributes, the EK EKU 2.23.133.8.1, subjectDirectoryAttributes, an
//! empty subject. A general path validator refuses some of that, and none of it matters to
//! the one question asked here: did a configured manufacturer CA sign this certificate? So
//! the check is exactly that: decode with x509-cert, find a configured CA with the issuer's
//! name, verify the signature over the TBSCertificate with aws-lc-rs.
//!
//! Each `ek_ca` certificate is trusted on its own (a trust anchor). A TPM's NV holds its EK
//! certificate alone and real EK certificates name their issuer only by an AIA URL an
//! air-gapped plant can't follow, so the intermediates between an EK certificate and a
//! manufacturer root are configured too (`intermediates`, files or folders as vendors publish
//! them): an intermediate counts only when its signature chains to an anchor. When no chain
//! can be built, the refusal names the certificate that is missing.
//!
//! The EK certificate's validity is checked; its notAfter may be 99991231235959Z, RFC 5280
//! §4.1.2.5's "no well-defined expiration", which manufacturers use. The CAs' validity is
//! not: a TPM's identity does not lapse when an intermediate's certificate does.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use const_oid::db::rfc5912;
use const_oid::ObjectIdentifier;
use der::asn1::UintRef;
use der::{Decode, Encode, Sequence};
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::Certificate;

use crate::attestation::Refusal;

/// A manufacturer CA certificate from the configuration.
#[derive(Debug, Clone)]
pub(super) struct ManufacturerCa {
    certificate: Certificate,
    /// Its subject, DER: compared with an EK certificate's issuer.
    subject: Vec<u8>,
}

impl ManufacturerCa {
    /// Decodes a configured CA certificate (DER), refusing one that is not a CA.
    pub(super) fn new(der: &[u8]) -> Result<Self, String> {
        let certificate =
            Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let is_ca = certificate
            .tbs_certificate
            .get::<BasicConstraints>()
            .ok()
            .flatten()
            .is_some_and(|(_, constraints)| constraints.ca);
        let subject = certificate
            .tbs_certificate
            .subject
            .to_der()
            .map_err(|e| format!("its subject does not encode: {e}"))?;
        if !is_ca {
            return Err(format!(
                "{} is not a CA certificate (basicConstraints cA is not true)",
                certificate.tbs_certificate.subject
            ));
        }
        Ok(Self {
            certificate,
            subject,
        })
    }

    /// The CA's subject, for messages.
    pub(super) fn subject(&self) -> String {
        self.certificate.tbs_certificate.subject.to_string()
    }

    /// Whether this CA's key signed `certificate`.
    fn signed(&self, certificate: &Certificate) -> bool {
        let Ok(tbs) = certificate.tbs_certificate.to_der() else {
            return false;
        };
        let Some(signature) = certificate.signature.as_bytes() else {
            return false;
        };
        let spki = &self.certificate.tbs_certificate.subject_public_key_info;
        let Some(key) = spki.subject_public_key.as_bytes() else {
            return false;
        };
        let curve = named_curve(spki);
        let Some(algorithm) = verification_algorithm(&certificate.signature_algorithm.oid, curve)
        else {
            return false;
        };
        UnparsedPublicKey::new(algorithm, key)
            .verify(&tbs, signature)
            .is_ok()
    }
}

/// Chains longer than this (EK certificate, intermediates, anchor) are not followed.
const MAX_INTERMEDIATES: usize = 4;

/// The configured manufacturer roots and the intermediates below them.
#[derive(Debug, Clone)]
pub(super) struct Manufacturers {
    /// `ek_ca`: trusted on their own.
    pub(super) anchors: Vec<ManufacturerCa>,
    /// `intermediates`: trusted when they chain to an anchor.
    pub(super) intermediates: Vec<ManufacturerCa>,
}

impl Manufacturers {
    /// The first configured certificate named `issuer` whose key signed `certificate`.
    fn signer<'a>(
        list: &'a [ManufacturerCa],
        certificate: &Certificate,
    ) -> Option<&'a ManufacturerCa> {
        let issuer = certificate
            .tbs_certificate
            .issuer
            .to_der()
            .unwrap_or_default();
        list.iter()
            .find(|ca| ca.subject == issuer && ca.signed(certificate))
    }
}

impl Manufacturers {
    /// Whether `intermediate` chains, through other intermediates, to an anchor.
    pub(super) fn chains_to_anchor(&self, intermediate: &ManufacturerCa) -> bool {
        let mut current = &intermediate.certificate;
        for _ in 0..=MAX_INTERMEDIATES {
            if Self::signer(&self.anchors, current).is_some() {
                return true;
            }
            match Self::signer(&self.intermediates, current) {
                // A self-signed intermediate is a loop, not a chain.
                Some(next) if !std::ptr::eq(&next.certificate, current) => {
                    current = &next.certificate;
                }
                _ => return false,
            }
        }
        false
    }
}

/// The authority key identifier of `certificate`, hex, for naming a missing CA.
fn authority_key_id(certificate: &Certificate) -> Option<String> {
    use x509_cert::ext::pkix::AuthorityKeyIdentifier;
    let (_, aki) = certificate
        .tbs_certificate
        .get::<AuthorityKeyIdentifier>()
        .ok()
        .flatten()?;
    aki.key_identifier.map(|id| hex::encode(id.as_bytes()))
}

/// RFC 5280 §4.1.2.5: notAfter 99991231235959Z means "no well-defined expiration".
fn never_expires(not_after: &x509_cert::time::Time) -> bool {
    not_after.to_unix_duration().as_secs() == 253_402_300_799
}

/// A decoded EK certificate; [`EndorsementCertificate::verify`] says who signed it.
#[derive(Debug)]
pub(super) struct EndorsementCertificate {
    certificate: Certificate,
    /// Its SubjectPublicKeyInfo, DER: the EK public key.
    pub(super) spki: Vec<u8>,
    /// The key in it.
    pub(super) key: EndorsementKey,
}

/// The EK public key an EK certificate carries: the TCG low-range RSA 2048 or ECC P-256 EK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum EndorsementKey {
    /// RSA: the modulus without leading zeros, and the public exponent.
    Rsa { modulus: Vec<u8>, exponent: u32 },
    /// NIST P-256: the uncompressed point, `04 || x || y`.
    EccP256 { point: Vec<u8> },
}

/// RSAPublicKey (RFC 8017 §A.1.1).
///
/// ```text
/// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
/// ```
#[derive(Sequence)]
struct RsaPublicKey<'a> {
    modulus: UintRef<'a>,
    public_exponent: UintRef<'a>,
}

impl EndorsementCertificate {
    /// Decodes an EK certificate (DER) and its key, without judging who signed it:
    /// `malformed` for bytes that are no certificate, `ek_unsupported` for key types other
    /// than RSA and ECC P-256.
    pub(super) fn decode(der: &[u8]) -> Result<Self, Refusal> {
        let certificate = Certificate::from_der(der).map_err(|e| {
            Refusal::new(
                "malformed",
                format!("the EK certificate is not an X.509 certificate: {e}"),
            )
        })?;
        let spki = &certificate.tbs_certificate.subject_public_key_info;
        if spki.algorithm.oid == rfc5912::ID_EC_PUBLIC_KEY {
            if named_curve(spki) != Some(rfc5912::SECP_256_R_1) {
                return Err(Refusal::new(
                    "ek_unsupported",
                    "the EK certificate's ECC key is not on NIST P-256; the RSA 2048 EK \
                     (0x01c00002) and the ECC P-256 EK (0x01c0000a) are supported",
                ));
            }
            let point = spki
                .subject_public_key
                .as_bytes()
                .filter(|p| p.len() == 65 && p[0] == 0x04)
                .ok_or_else(|| {
                    Refusal::new(
                        "malformed",
                        "the EK certificate's P-256 key is not an uncompressed point",
                    )
                })?
                .to_vec();
            let spki = spki.to_der().map_err(|_| {
                Refusal::new(
                    "malformed",
                    "the EK certificate's key does not encode again",
                )
            })?;
            return Ok(Self {
                certificate,
                spki,
                key: EndorsementKey::EccP256 { point },
            });
        }
        if spki.algorithm.oid != rfc5912::RSA_ENCRYPTION {
            return Err(Refusal::new(
                "ek_unsupported",
                format!(
                    "the EK certificate's key is {}, neither RSA nor ECC; the RSA 2048 EK \
                     (NV index 0x01c00002) and the ECC P-256 EK (0x01c0000a) are supported",
                    spki.algorithm.oid
                ),
            ));
        }
        let malformed =
            |what: &str| Refusal::new("malformed", format!("the EK certificate's RSA key {what}"));
        let key_bytes = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| malformed("is not whole bytes"))?;
        let key = RsaPublicKey::from_der(key_bytes).map_err(|_| malformed("does not decode"))?;
        let exponent = key.public_exponent.as_bytes();
        if exponent.len() > 4 {
            return Err(malformed("has an exponent over 32 bits"));
        }
        let exponent = exponent
            .iter()
            .fold(0u32, |acc, byte| (acc << 8) | u32::from(*byte));
        let modulus = key.modulus.as_bytes().to_vec();
        let spki = spki
            .to_der()
            .map_err(|_| malformed("does not encode again"))?;
        Ok(Self {
            certificate,
            spki,
            key: EndorsementKey::Rsa { modulus, exponent },
        })
    }

    /// Checks that this certificate is valid at `now` (`ek_expired`, `ek_not_yet_valid`)
    /// and chains, through configured intermediates, to a configured manufacturer CA
    /// (`ek_untrusted`, naming the certificate missing from the chain).
    pub(super) fn verify(
        &self,
        manufacturers: &Manufacturers,
        now: std::time::SystemTime,
    ) -> Result<(), Refusal> {
        let tbs = &self.certificate.tbs_certificate;
        let validity = &tbs.validity;
        if now < validity.not_before.to_system_time() {
            return Err(Refusal::new(
                "ek_not_yet_valid",
                format!(
                    "the EK certificate is valid only from {}; is the issuer's clock right?",
                    validity.not_before
                ),
            ));
        }
        if !never_expires(&validity.not_after) && now > validity.not_after.to_system_time() {
            return Err(Refusal::new(
                "ek_expired",
                format!(
                    "the EK certificate expired at {} (a manufacturer's 99991231235959Z \
                     \"no expiration\" would be accepted)",
                    validity.not_after
                ),
            ));
        }
        let mut current = &self.certificate;
        let mut through: Vec<String> = Vec::new();
        for _ in 0..=MAX_INTERMEDIATES {
            if Manufacturers::signer(&manufacturers.anchors, current).is_some() {
                return Ok(());
            }
            match Manufacturers::signer(&manufacturers.intermediates, current) {
                Some(intermediate) if !through.contains(&intermediate.subject()) => {
                    through.push(intermediate.subject());
                    current = &intermediate.certificate;
                }
                _ => break,
            }
        }
        let missing = &current.tbs_certificate.issuer;
        let key_id = authority_key_id(current)
            .map(|id| format!(" (authority key id {id})"))
            .unwrap_or_default();
        let message = if through.is_empty() {
            format!(
                "the EK certificate was issued by \"{missing}\"{key_id}, which is neither a \
                 configured TPM manufacturer CA nor a configured intermediate (or its signature \
                 does not verify): if it is the manufacturer's intermediate CA, add its \
                 certificate to [attestation.tpm] intermediates (and its root to ek_ca); if \
                 it is a CA this plant trusts on its own, to [attestation.tpm] ek_ca"
            )
        } else {
            format!(
                "the EK certificate chains through the intermediate(s) {} to \"{missing}\"{key_id}, \
                 which is not a configured TPM manufacturer CA (or its signature does not \
                 verify): add that certificate to [attestation.tpm] ek_ca if this \
                 manufacturer is trusted, or to intermediates if it is another intermediate",
                through
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Err(Refusal::new("ek_untrusted", message))
    }
}

/// The named curve of an EC SubjectPublicKeyInfo (its algorithm parameters), if any.
fn named_curve(spki: &x509_cert::spki::SubjectPublicKeyInfoOwned) -> Option<ObjectIdentifier> {
    spki.algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
}

/// The aws-lc-rs verifier for a certificate signature algorithm, with the signer's curve
/// for ECDSA. RSA-PSS and SHA-1 are not accepted.
fn verification_algorithm(
    oid: &ObjectIdentifier,
    curve: Option<ObjectIdentifier>,
) -> Option<&'static dyn VerificationAlgorithm> {
    let p256 = curve == Some(rfc5912::SECP_256_R_1);
    let p384 = curve == Some(rfc5912::SECP_384_R_1);
    Some(match *oid {
        rfc5912::SHA_256_WITH_RSA_ENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA256,
        rfc5912::SHA_384_WITH_RSA_ENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA384,
        rfc5912::SHA_512_WITH_RSA_ENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA512,
        rfc5912::ECDSA_WITH_SHA_256 if p256 => &signature::ECDSA_P256_SHA256_ASN1,
        rfc5912::ECDSA_WITH_SHA_256 if p384 => &signature::ECDSA_P384_SHA256_ASN1,
        rfc5912::ECDSA_WITH_SHA_384 if p256 => &signature::ECDSA_P256_SHA384_ASN1,
        rfc5912::ECDSA_WITH_SHA_384 if p384 => &signature::ECDSA_P384_SHA384_ASN1,
        _ => return None,
    })
}
