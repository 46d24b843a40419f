//! EK certificates (TCG EK Credential Profile §3) and the manufacturer CAs that sign them.
//!
//! EK certificates are not web PKI leaves: a critical subjectAltName that is a directoryName
//! of TPM manufacturer attributes, the EK EKU 2.23.133.8.1, subjectDirectoryAttributes, an
//! empty subject. A general path validator refuses some of that, and none of it matters to
//! the one question asked here: did a configured manufacturer CA sign this certificate? So
//! the check is exactly that: decode with x509-cert, find a configured CA with the issuer's
//! name, verify the signature over the TBSCertificate with aws-lc-rs.
//!
//! Each configured certificate is trusted on its own (a trust anchor), intermediates
//! included: a TPM's NV holds its EK certificate alone, so the CA that signed it must be
//! configured. Validity dates are not checked: manufacturers issue EK certificates until
//! 9999-12-31 (RFC 5280 §4.1.2.5's "no well-defined expiration"), and a TPM's identity does
//! not lapse when an intermediate's certificate does.

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
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        let Some(algorithm) = verification_algorithm(&certificate.signature_algorithm.oid, curve)
        else {
            return false;
        };
        UnparsedPublicKey::new(algorithm, key)
            .verify(&tbs, signature)
            .is_ok()
    }
}

/// A decoded RSA EK certificate; [`EndorsementCertificate::verify`] says who signed it.
#[derive(Debug)]
pub(super) struct EndorsementCertificate {
    certificate: Certificate,
    /// Its SubjectPublicKeyInfo, DER: the EK public key.
    pub(super) spki: Vec<u8>,
    /// The RSA modulus, without leading zeros.
    pub(super) modulus: Vec<u8>,
    /// The RSA public exponent.
    pub(super) exponent: u32,
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
    /// Decodes an EK certificate (DER) and its RSA key, without judging who signed it:
    /// `malformed` for bytes that are no certificate, `ek_unsupported` for other key types.
    pub(super) fn decode(der: &[u8]) -> Result<Self, Refusal> {
        let certificate = Certificate::from_der(der).map_err(|e| {
            Refusal::new(
                "malformed",
                format!("the EK certificate is not an X.509 certificate: {e}"),
            )
        })?;
        let spki = &certificate.tbs_certificate.subject_public_key_info;
        if spki.algorithm.oid != rfc5912::RSA_ENCRYPTION {
            return Err(Refusal::new(
                "ek_unsupported",
                format!(
                    "the EK certificate's key is {}, not RSA; only the RSA 2048 EK \
                     (NV index 0x01c00002) is supported",
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
            modulus,
            exponent,
        })
    }

    /// Checks that a CA in `cas` signed this certificate (`ek_untrusted` names its issuer).
    pub(super) fn verify(&self, cas: &[ManufacturerCa]) -> Result<(), Refusal> {
        let tbs = &self.certificate.tbs_certificate;
        let issuer = tbs.issuer.to_der().unwrap_or_default();
        let trusted = cas
            .iter()
            .filter(|ca| ca.subject == issuer)
            .any(|ca| ca.signed(&self.certificate));
        if trusted {
            return Ok(());
        }
        Err(Refusal::new(
            "ek_untrusted",
            format!(
                "the EK certificate was issued by \"{}\", which is not a configured TPM \
                 manufacturer CA (or its signature does not verify); add that CA's \
                 certificate to [attestation.tpm] ek_ca if this manufacturer is trusted",
                tbs.issuer
            ),
        ))
    }
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
