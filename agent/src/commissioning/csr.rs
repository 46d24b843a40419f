//! PKCS#10 certificate requests (RFC 2986) for EST enrollment.
//!
//! The request is signed through [`hsm::Signer`], so a key in a TPM would sign it the same
//! way a software key does. For re-enrollment the names are read from the current
//! certificate, because the CA refuses a `simplereenroll` whose Subject or SANs differ from the
//! certificate being renewed (RFC 7030 §4.2.2).

use std::net::IpAddr;

use der::asn1::{Ia5StringRef, PrintableStringRef, TeletexStringRef, Utf8StringRef};
use der::{Tag, Tagged};
use rcgen::string::BmpString;
use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, SanType};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

use crate::certificate::CertificateFacts;
use crate::Error;

/// What a certificate request names: the Subject and the subjectAltNames.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceNames {
    subject: DistinguishedName,
    subject_alt_names: Vec<SanType>,
}

impl DeviceNames {
    /// Subject `CN=<common_name>` with DNS and IP address SANs, for a first enrollment.
    pub fn new(common_name: &str, dns_names: &[String], ips: &[IpAddr]) -> Result<Self, Error> {
        if common_name.trim().is_empty() {
            return Err(Error::Usage("the subject (common name) is empty".into()));
        }
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, common_name);
        let mut subject_alt_names = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            let ia5 = name.as_str().try_into().map_err(|_| {
                Error::Usage(format!(
                    "DNS name {name:?} is not ASCII; give internationalised names in their xn-- form"
                ))
            })?;
            subject_alt_names.push(SanType::DnsName(ia5));
        }
        subject_alt_names.extend(ips.iter().copied().map(SanType::IpAddress));
        Ok(Self {
            subject,
            subject_alt_names,
        })
    }

    /// The Subject and SANs of `certificate`, reproduced attribute by attribute with the
    /// same string types, so the CA's byte-wise comparison on re-enrollment holds.
    pub fn of_certificate(certificate: &CertificateFacts) -> Result<Self, Error> {
        let what = "current certificate";
        let tbs = &certificate.parsed().tbs_certificate;
        let mut subject = DistinguishedName::new();
        for rdn in tbs.subject.0.iter() {
            let attrs = rdn.0.as_slice();
            let [attr] = attrs else {
                return Err(Error::certificate(
                    what,
                    "its Subject has a multi-valued name component, which a renewal request can't reproduce",
                ));
            };
            let arcs: Vec<u64> = attr.oid.arcs().map(u64::from).collect();
            let ty = DnType::from_oid(&arcs);
            if subject.get(&ty).is_some() {
                return Err(Error::certificate(
                    what,
                    format!(
                        "its Subject repeats attribute {}, which a renewal request can't reproduce",
                        attr.oid
                    ),
                ));
            }
            subject.push(
                ty,
                dn_value(&attr.value).map_err(|e| Error::certificate(what, e))?,
            );
        }
        let mut subject_alt_names = Vec::new();
        let sans = tbs
            .get::<SubjectAltName>()
            .map_err(|e| Error::certificate(what, format!("subjectAltName: {e}")))?;
        if let Some((_, SubjectAltName(names))) = sans {
            for name in names {
                subject_alt_names.push(san(&name).map_err(|e| Error::certificate(what, e))?);
            }
        }
        Ok(Self {
            subject,
            subject_alt_names,
        })
    }

    /// The DER CSR for these names and the public key of `key`, signed by `key`.
    pub fn request(&self, key: &dyn hsm::Signer) -> Result<Vec<u8>, Error> {
        // Built field by field: CertificateParams::default() carries a placeholder CN.
        let mut params = CertificateParams::default();
        params.distinguished_name = self.subject.clone();
        params.subject_alt_names = self.subject_alt_names.clone();
        let csr = params
            .serialize_request(&crate::device_key::CsrSigner(key))
            .map_err(|e| Error::Csr(e.to_string()))?;
        Ok(csr.der().to_vec())
    }
}

fn dn_value(value: &der::Any) -> Result<DnValue, String> {
    let bytes = value.value();
    let bad = |e: &dyn std::fmt::Display| format!("a Subject attribute does not decode: {e}");
    Ok(match value.tag() {
        Tag::Utf8String => DnValue::Utf8String(
            Utf8StringRef::new(bytes)
                .map_err(|e| bad(&e))?
                .as_str()
                .to_owned(),
        ),
        Tag::PrintableString => DnValue::PrintableString(
            PrintableStringRef::new(bytes)
                .map_err(|e| bad(&e))?
                .as_str()
                .try_into()
                .map_err(|e| bad(&e))?,
        ),
        Tag::Ia5String => DnValue::Ia5String(
            Ia5StringRef::new(bytes)
                .map_err(|e| bad(&e))?
                .as_str()
                .try_into()
                .map_err(|e| bad(&e))?,
        ),
        Tag::TeletexString => DnValue::TeletexString(
            TeletexStringRef::new(bytes)
                .map_err(|e| bad(&e))?
                .as_str()
                .try_into()
                .map_err(|e| bad(&e))?,
        ),
        Tag::BmpString => {
            DnValue::BmpString(BmpString::from_utf16be(bytes.to_vec()).map_err(|e| bad(&e))?)
        }
        other => {
            return Err(format!(
                "a Subject attribute has type {other}, which a renewal request can't reproduce"
            ))
        }
    })
}

fn san(name: &GeneralName) -> Result<SanType, String> {
    let ia5 = |s: &der::asn1::Ia5String| {
        s.as_str()
            .try_into()
            .map_err(|e: rcgen::Error| format!("a subjectAltName does not decode: {e}"))
    };
    Ok(match name {
        GeneralName::DnsName(s) => SanType::DnsName(ia5(s)?),
        GeneralName::Rfc822Name(s) => SanType::Rfc822Name(ia5(s)?),
        GeneralName::UniformResourceIdentifier(s) => SanType::URI(ia5(s)?),
        GeneralName::IpAddress(octets) => {
            let octets = octets.as_bytes();
            if let Ok(v4) = <[u8; 4]>::try_from(octets) {
                SanType::IpAddress(IpAddr::from(v4))
            } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
                SanType::IpAddress(IpAddr::from(v6))
            } else {
                return Err(format!(
                    "an IP address subjectAltName has {} bytes",
                    octets.len()
                ));
            }
        }
        _ => {
            return Err(
                "it has an otherName, directoryName, ediPartyName or registeredID subjectAltName, which a renewal request can't reproduce"
                    .into(),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode;
    use hsm::Signer;
    use x509_cert::request::{CertReq, ExtensionReq};

    fn csr_names(csr_der: &[u8]) -> (x509_cert::name::Name, Vec<GeneralName>) {
        let csr = CertReq::from_der(csr_der).expect("CSR parses");
        let mut sans = Vec::new();
        for attr in csr.info.attributes.iter() {
            if attr.oid == const_oid_extension_request() {
                for value in attr.values.iter() {
                    let req: ExtensionReq = value.decode_as().expect("extensionRequest");
                    for ext in req.0 {
                        if ext.extn_id == const_oid_san() {
                            let san =
                                SubjectAltName::from_der(ext.extn_value.as_bytes()).expect("san");
                            sans.extend(san.0);
                        }
                    }
                }
            }
        }
        (csr.info.subject, sans)
    }

    fn const_oid_extension_request() -> der::asn1::ObjectIdentifier {
        der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14")
    }

    fn const_oid_san() -> der::asn1::ObjectIdentifier {
        der::asn1::ObjectIdentifier::new_unwrap("2.5.29.17")
    }

    /// A certificate with an O and a PrintableString CN plus DNS, IP and URI SANs.
    fn current_certificate() -> CertificateFacts {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Plant North");
        params.distinguished_name.push(
            DnType::CommonName,
            DnValue::PrintableString("hmi-3".try_into().expect("printable")),
        );
        params.subject_alt_names = vec![
            SanType::DnsName("hmi-3.cell2.plant".try_into().expect("dns")),
            SanType::IpAddress("10.2.0.13".parse().expect("ip")),
            SanType::IpAddress("fd00::13".parse().expect("ip")),
            SanType::URI("spiffe://plant/hmi/3".try_into().expect("uri")),
        ];
        let cert = params.self_signed(&key).expect("cert");
        CertificateFacts::from_der("current", cert.der()).expect("parse")
    }

    #[test]
    fn renewal_request_carries_the_same_subject_and_sans_as_the_certificate() {
        let current = current_certificate();
        let names = DeviceNames::of_certificate(&current).expect("names");
        let key = hsm::SoftKey::generate().expect("key");
        let csr = names.request(&key).expect("csr");
        let (subject, sans) = csr_names(&csr);
        let tbs = &current.parsed().tbs_certificate;
        assert_eq!(
            der::Encode::to_der(&subject).expect("der"),
            der::Encode::to_der(&tbs.subject).expect("der"),
            "Subject must be byte-identical"
        );
        let (_, SubjectAltName(cert_sans)) =
            tbs.get::<SubjectAltName>().expect("ext").expect("has SAN");
        assert_eq!(sans, cert_sans);
    }

    #[test]
    fn request_is_signed_by_the_given_key_and_verifies() {
        let key = hsm::SoftKey::generate().expect("key");
        let names = DeviceNames::new(
            "plc-7",
            &["plc-7.plant".into()],
            &["10.0.0.7".parse().expect("ip")],
        )
        .expect("names");
        let csr = names.request(&key).expect("csr");
        // est's own decoder checks the self-signature and hands back the public key.
        let verified = est::csr::VerifiedCsr::from_der(&csr).expect("CSR verifies");
        assert_eq!(verified.public_key(), key.public_key().point());
        let (subject, sans) = csr_names(&csr);
        assert_eq!(subject.to_string(), "CN=plc-7");
        assert_eq!(sans.len(), 2);
    }

    #[test]
    fn non_ascii_dns_name_is_refused_with_advice() {
        let err = DeviceNames::new("plc", &["stör.plant".into()], &[]).expect_err("refused");
        assert!(err.to_string().contains("xn--"), "{err}");
    }
}
