//! PKCS#10 certification requests (RFC 2986), checked once into a [`VerifiedCsr`].
//!
//! The CA takes only the public key (and, for policy checks, the subject and requested
//! names) from a CSR. Requested extensions are reported so policy can refuse them; they are
//! never copied into a certificate (DESIGN §3).

use std::net::IpAddr;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use const_oid::db::{rfc5280, rfc5912};
use const_oid::ObjectIdentifier;
use der::asn1::{Ia5StringRef, OctetStringRef, PrintableStringRef, Utf8StringRef};
use der::{Decode, Encode, Tag, Tagged};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectAltName};
use x509_cert::ext::Extension;
use x509_cert::request::CertReq;

use crate::Error;

/// pkcs-9-at-extensionRequest (RFC 2985 §5.4.2).
const EXTENSION_REQUEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
/// pkcs-9-at-challengePassword (RFC 2985 §5.4.1).
const CHALLENGE_PASSWORD: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.7");

/// A name a CSR asks to have in its subjectAltName.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestedName {
    /// dNSName.
    Dns(String),
    /// iPAddress.
    Ip(IpAddr),
    /// uniformResourceIdentifier.
    Uri(String),
    /// rfc822Name.
    Email(String),
    /// Any other GeneralName form.
    Other,
}

/// What a CSR asks for beyond its key, so policy can refuse it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requested {
    /// subjectAltName entries.
    pub names: Vec<RequestedName>,
    /// basicConstraints with cA TRUE.
    pub ca: bool,
    /// keyUsage with keyCertSign or cRLSign.
    pub cert_sign: bool,
    /// Other extension OIDs asked for.
    pub other_extensions: Vec<ObjectIdentifier>,
}

/// A PKCS#10 request whose self-signature verified, with a P-256 key.
#[derive(Clone)]
pub struct VerifiedCsr {
    subject_der: Vec<u8>,
    common_name: Option<String>,
    public_key: Vec<u8>,
    requested: Requested,
    challenge_password: Option<String>,
}

impl VerifiedCsr {
    /// Parses DER and verifies the request's signature with its own key.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let req = CertReq::from_der(der)
            .map_err(|e| Error::Csr(format!("the body is not a DER PKCS#10 request: {e}")))?;

        if req.algorithm.oid != rfc5912::ECDSA_WITH_SHA_256 {
            return Err(Error::Csr(format!(
                "CSR is signed with {}; sign it with ECDSA P-256 / SHA-256 (ecdsa-with-SHA256)",
                algorithm_name(&req.algorithm.oid)
            )));
        }
        let spki = &req.info.public_key;
        if spki.algorithm.oid != rfc5912::ID_EC_PUBLIC_KEY {
            return Err(Error::Csr(format!(
                "CSR key is {}; this CA issues to P-256 (prime256v1) EC keys only",
                algorithm_name(&spki.algorithm.oid)
            )));
        }
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        if curve != Some(rfc5912::SECP_256_R_1) {
            return Err(Error::Csr(format!(
                "CSR key is on curve {}; this CA issues to P-256 (prime256v1) keys only",
                curve.map_or_else(|| "<missing>".into(), |c| algorithm_name(&c))
            )));
        }
        let public_key = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| Error::Csr("CSR public key bit string is not byte aligned".into()))?
            .to_vec();
        if public_key.len() != 65 || public_key[0] != 0x04 {
            return Err(Error::Csr(
                "CSR public key must be an uncompressed P-256 point".into(),
            ));
        }
        let signature = req
            .signature
            .as_bytes()
            .ok_or_else(|| Error::Csr("CSR signature bit string is not byte aligned".into()))?;
        let info_der = req
            .info
            .to_der()
            .map_err(|e| Error::Csr(format!("CSR request info does not re-encode: {e}")))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &public_key)
            .verify(&info_der, signature)
            .map_err(|_| {
                Error::Csr(
                    "CSR signature does not verify with its public key; the request was altered \
                     or signed with another key"
                        .into(),
                )
            })?;

        let subject_der = req
            .info
            .subject
            .to_der()
            .map_err(|e| Error::Csr(e.to_string()))?;
        let common_name = common_name(&req.info.subject);
        let mut requested = Requested::default();
        let mut challenge_password = None;
        for attr in req.info.attributes.iter() {
            if attr.oid == EXTENSION_REQUEST {
                for value in attr.values.iter() {
                    let exts: Vec<Extension> = value.decode_as().map_err(|e| {
                        Error::Csr(format!("CSR extensionRequest does not parse: {e}"))
                    })?;
                    for ext in &exts {
                        read_extension(ext, &mut requested)?;
                    }
                }
            } else if attr.oid == CHALLENGE_PASSWORD {
                challenge_password = attr.values.iter().next().and_then(directory_string);
            }
        }
        Ok(Self {
            subject_der,
            common_name,
            public_key,
            requested,
            challenge_password,
        })
    }

    /// The subject's first commonName, if it has one as a string.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The subject Name, DER.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }

    /// The uncompressed P-256 point the certificate will certify.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// The extensions the request asks for.
    pub fn requested(&self) -> &Requested {
        &self.requested
    }

    /// The challengePassword attribute (RFC 7030 §3.5 PoP linking), if present.
    pub fn challenge_password(&self) -> Option<&str> {
        self.challenge_password.as_deref()
    }
}

impl std::fmt::Debug for VerifiedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedCsr")
            .field("common_name", &self.common_name)
            .field("requested", &self.requested)
            .field(
                "challenge_password",
                &self.challenge_password.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn read_extension(ext: &Extension, requested: &mut Requested) -> Result<(), Error> {
    let bytes = ext.extn_value.as_bytes();
    let bad = |what: &str, e: der::Error| Error::Csr(format!("CSR {what} does not parse: {e}"));
    match ext.extn_id {
        rfc5280::ID_CE_SUBJECT_ALT_NAME => {
            let san = SubjectAltName::from_der(bytes).map_err(|e| bad("subjectAltName", e))?;
            requested.names.extend(san.0.iter().map(requested_name));
        }
        rfc5280::ID_CE_BASIC_CONSTRAINTS => {
            let bc = BasicConstraints::from_der(bytes).map_err(|e| bad("basicConstraints", e))?;
            requested.ca |= bc.ca;
        }
        rfc5280::ID_CE_KEY_USAGE => {
            let ku = KeyUsage::from_der(bytes).map_err(|e| bad("keyUsage", e))?;
            requested.cert_sign |=
                ku.0.contains(KeyUsages::KeyCertSign) || ku.0.contains(KeyUsages::CRLSign);
        }
        other => requested.other_extensions.push(other),
    }
    Ok(())
}

fn requested_name(name: &GeneralName) -> RequestedName {
    match name {
        GeneralName::DnsName(s) => RequestedName::Dns(s.as_str().to_owned()),
        GeneralName::UniformResourceIdentifier(s) => RequestedName::Uri(s.as_str().to_owned()),
        GeneralName::Rfc822Name(s) => RequestedName::Email(s.as_str().to_owned()),
        GeneralName::IpAddress(octets) => match octets.as_bytes().len() {
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(octets.as_bytes());
                RequestedName::Ip(IpAddr::from(a))
            }
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(octets.as_bytes());
                RequestedName::Ip(IpAddr::from(a))
            }
            _ => RequestedName::Other,
        },
        _ => RequestedName::Other,
    }
}

fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == const_oid::db::rfc4519::CN)
        .and_then(|atv| directory_string(&atv.value))
}

fn directory_string(value: &der::Any) -> Option<String> {
    let bytes = value.value();
    match value.tag() {
        Tag::Utf8String => Utf8StringRef::new(bytes)
            .ok()
            .map(|s| s.as_str().to_owned()),
        Tag::PrintableString => PrintableStringRef::new(bytes)
            .ok()
            .map(|s| s.as_str().to_owned()),
        Tag::Ia5String => Ia5StringRef::new(bytes).ok().map(|s| s.as_str().to_owned()),
        Tag::OctetString => OctetStringRef::new(bytes)
            .ok()
            .and_then(|s| std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned)),
        _ => None,
    }
}

fn algorithm_name(oid: &ObjectIdentifier) -> String {
    const NAMES: &[(ObjectIdentifier, &str)] = &[
        (rfc5912::RSA_ENCRYPTION, "RSA"),
        (
            rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
            "sha256WithRSAEncryption",
        ),
        (rfc5912::SHA_1_WITH_RSA_ENCRYPTION, "sha1WithRSAEncryption"),
        (rfc5912::ECDSA_WITH_SHA_384, "ecdsa-with-SHA384"),
        (rfc5912::ECDSA_WITH_SHA_512, "ecdsa-with-SHA512"),
        (rfc5912::SECP_384_R_1, "secp384r1 (P-384)"),
        (rfc5912::SECP_521_R_1, "secp521r1 (P-521)"),
        (rfc5912::SECP_224_R_1, "secp224r1 (P-224)"),
        (ObjectIdentifier::new_unwrap("1.3.132.0.10"), "secp256k1"),
        (ObjectIdentifier::new_unwrap("1.3.101.112"), "Ed25519"),
    ];
    NAMES
        .iter()
        .find(|(o, _)| o == oid)
        .map_or_else(|| format!("OID {oid}"), |(_, n)| (*n).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn csr_for(params: CertificateParams, key: &KeyPair) -> Vec<u8> {
        params.serialize_request(key).expect("csr").der().to_vec()
    }

    fn params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::new(vec![]).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    }

    #[test]
    fn accepts_a_p256_csr_and_reads_its_subject() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = VerifiedCsr::from_der(&csr_for(params("plc-7"), &key)).expect("valid");
        assert_eq!(csr.common_name(), Some("plc-7"));
        assert_eq!(csr.public_key(), key.public_key_raw());
        assert_eq!(csr.requested(), &Requested::default());
    }

    #[test]
    fn broken_signature_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut der = csr_for(params("plc-7"), &key);
        let n = der.len();
        der[n - 3] ^= 0x55;
        let err = VerifiedCsr::from_der(&der).expect_err("altered");
        assert!(err.to_string().contains("does not verify") || err.to_string().contains("DER"));
    }

    #[test]
    fn other_curves_are_refused_by_name() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let err = VerifiedCsr::from_der(&csr_for(params("x"), &key)).expect_err("p384");
        assert!(err.to_string().contains("P-256"), "{err}");
    }

    #[test]
    fn requested_ca_and_names_are_reported() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = params("plc-7");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.subject_alt_names = vec![rcgen::SanType::DnsName(
            "evil.example".try_into().expect("dns"),
        )];
        let csr = VerifiedCsr::from_der(&csr_for(p, &key)).expect("valid");
        assert!(csr.requested().ca);
        assert!(csr.requested().cert_sign);
        assert_eq!(
            csr.requested().names,
            vec![RequestedName::Dns("evil.example".into())]
        );
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert!(VerifiedCsr::from_der(&bytes).is_err());
        }
    }
}
