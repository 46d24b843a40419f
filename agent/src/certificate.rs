//! What the agent needs to know about a certificate: who it names, its serial and expiry for
//! the engineer's summary, whether it holds the key we think it does, and how CA
//! certificates line up into a chain.

use der::{Decode, Encode};
use x509_cert::Certificate;

use crate::Error;

/// A parsed certificate with the facts the commissioning summary shows.
#[derive(Clone)]
pub struct CertificateFacts {
    der: Vec<u8>,
    parsed: Certificate,
}

impl CertificateFacts {
    /// Parses `der`; `what` names the certificate in errors ("issued certificate", a path).
    pub fn from_der(what: &str, der: &[u8]) -> Result<Self, Error> {
        let parsed = Certificate::from_der(der).map_err(|e| Error::certificate(what, e))?;
        Ok(Self {
            der: der.to_vec(),
            parsed,
        })
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The parsed structure.
    pub fn parsed(&self) -> &Certificate {
        &self.parsed
    }

    /// The Subject in RFC 4514 form, e.g. `CN=plc-7`.
    pub fn subject(&self) -> String {
        self.parsed.tbs_certificate.subject.to_string()
    }

    /// The serial number in lower-case hex, as `openssl x509 -serial` and the issuer's
    /// inventory show it (leading zero bytes of the DER INTEGER dropped).
    pub fn serial_hex(&self) -> String {
        let bytes = self.parsed.tbs_certificate.serial_number.as_bytes();
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        hex::encode(&bytes[start..])
    }

    /// notAfter as `YYYY-MM-DDTHH:MM:SSZ`.
    pub fn not_after(&self) -> String {
        self.parsed
            .tbs_certificate
            .validity
            .not_after
            .to_date_time()
            .to_string()
    }

    /// The DER SubjectPublicKeyInfo, to compare with the key the agent holds.
    pub fn spki_der(&self) -> Result<Vec<u8>, Error> {
        self.parsed
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| Error::certificate("certificate public key", e))
    }

    /// Fails unless this certificate certifies `public_key`: a CA answering with someone
    /// else's certificate, or a certificate file that does not go with the key file, would
    /// otherwise only show up later as a failing TLS handshake on the plant floor.
    pub fn ensure_key(&self, what: &str, public_key: &hsm::PublicKey) -> Result<(), Error> {
        if self.spki_der()? == public_key.spki_der() {
            Ok(())
        } else {
            Err(Error::certificate(
                what,
                "certifies a different public key than the private key in use",
            ))
        }
    }
}

impl std::fmt::Debug for CertificateFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateFacts")
            .field("subject", &self.subject())
            .field("serial", &self.serial_hex())
            .finish_non_exhaustive()
    }
}

/// The CA certificates a leaf needs to be verified up to (but without) the trust anchors,
/// nearest issuer first, as TLS and PKCS#12 want them. `ca_certs` is what `cacerts` answered:
/// its order is not specified by RFC 7030, so the chain is rebuilt by matching issuer to
/// subject names. CA certificates that are not on the leaf's path (e.g. the previous
/// short-lived signing CA during a rotation overlap) follow, so a verifier can still use them.
pub fn issuing_chain(
    leaf: &CertificateFacts,
    ca_certs: &[Vec<u8>],
    anchors: &[Vec<u8>],
) -> Result<Vec<Vec<u8>>, Error> {
    let mut rest: Vec<CertificateFacts> = ca_certs
        .iter()
        .filter(|der| !anchors.contains(der))
        .map(|der| CertificateFacts::from_der("CA certificate from cacerts", der))
        .collect::<Result<_, _>>()?;
    let mut chain = Vec::with_capacity(rest.len());
    let mut child = leaf.parsed.clone();
    // Short-lived signing keys share the issuing CA's name (self-issued certificates), so
    // a name alone does not pick the issuer: the key identifiers do.
    while let Some(i) = rest.iter().position(|c| issued_by(&child, &c.parsed)) {
        let next = rest.remove(i);
        let self_signed = issued_by(&next.parsed, &next.parsed);
        child = next.parsed.clone();
        chain.push(next.der);
        if self_signed {
            break;
        }
    }
    chain.extend(rest.into_iter().map(|c| c.der));
    Ok(chain)
}

/// Whether `issuer` is the certificate that issued `child`: names match, and the child's
/// authorityKeyIdentifier, when both have key identifiers, is the issuer's subjectKeyIdentifier.
fn issued_by(child: &Certificate, issuer: &Certificate) -> bool {
    if child.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return false;
    }
    match (authority_key_id(child), subject_key_id(issuer)) {
        (Some(aki), Some(ski)) => aki == ski,
        _ => true,
    }
}

fn extension<'a>(
    certificate: &'a Certificate,
    oid: &der::asn1::ObjectIdentifier,
) -> Option<&'a [u8]> {
    certificate
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| &e.extn_id == oid)
        .map(|e| e.extn_value.as_bytes())
}

fn authority_key_id(certificate: &Certificate) -> Option<Vec<u8>> {
    use x509_cert::ext::pkix::AuthorityKeyIdentifier;
    let bytes = extension(
        certificate,
        &const_oid::db::rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
    )?;
    AuthorityKeyIdentifier::from_der(bytes)
        .ok()?
        .key_identifier
        .map(|k| k.as_bytes().to_vec())
}

fn subject_key_id(certificate: &Certificate) -> Option<Vec<u8>> {
    use x509_cert::ext::pkix::SubjectKeyIdentifier;
    let bytes = extension(
        certificate,
        &const_oid::db::rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
    )?;
    Some(
        SubjectKeyIdentifier::from_der(bytes)
            .ok()?
            .0
            .as_bytes()
            .to_vec(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    /// A root, an issuing CA under it, and a leaf under that (DER each).
    pub(crate) fn three_level_chain() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        };
        let root_key = KeyPair::generate().expect("key");
        let root_params = ca_params("Plant Root");
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = rcgen::Issuer::new(root_params, &root_key);
        let ca_key = KeyPair::generate().expect("key");
        let ca_params = ca_params("Plant Issuing CA");
        let ca = ca_params.signed_by(&ca_key, &root_issuer).expect("ca");
        let ca_issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf_params = CertificateParams::new(vec!["plc-7.plant".into()]).expect("params");
        leaf_params.distinguished_name = rcgen::DistinguishedName::new();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "plc-7");
        let leaf = leaf_params.signed_by(&leaf_key, &ca_issuer).expect("leaf");
        (root.der().to_vec(), ca.der().to_vec(), leaf.der().to_vec())
    }

    #[test]
    fn chain_puts_the_leafs_issuer_first_and_leaves_out_the_root() {
        let (root, ca, leaf) = three_level_chain();
        let other = rcgen::generate_simple_self_signed(vec!["x".into()])
            .expect("other")
            .cert
            .der()
            .to_vec();
        let leaf = CertificateFacts::from_der("leaf", &leaf).expect("leaf");
        let chain = issuing_chain(
            &leaf,
            &[root.clone(), other.clone(), ca.clone()],
            std::slice::from_ref(&root),
        )
        .expect("chain");
        assert_eq!(chain, vec![ca, other]);
    }

    #[test]
    fn short_lived_signing_keys_with_the_issuing_name_are_told_apart_by_key_id() {
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Plant Issuing CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let ca_key = KeyPair::generate().expect("key");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let ca_issuer = rcgen::Issuer::new(ca_params.clone(), &ca_key);
        // Two self-issued signing certificates (current and next), same name as the CA.
        let signing = |_: u8| {
            let key = KeyPair::generate().expect("key");
            let mut params = ca_params.clone();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &ca_issuer).expect("signing");
            (cert.der().to_vec(), rcgen::Issuer::new(params, key))
        };
        let (current, current_issuer) = signing(1);
        let (next, _) = signing(2);
        let mut leaf_params = CertificateParams::default();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "plc-7");
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = leaf_params
            .signed_by(&leaf_key, &current_issuer)
            .expect("leaf");
        let leaf = CertificateFacts::from_der("leaf", leaf.der()).expect("leaf");
        let ca = ca.der().to_vec();
        let chain = issuing_chain(
            &leaf,
            &[next.clone(), current.clone(), ca.clone()],
            std::slice::from_ref(&ca),
        )
        .expect("chain");
        assert_eq!(chain, vec![current, next]);
    }

    #[test]
    fn summary_facts_read_from_the_certificate() {
        let (_, _, leaf) = three_level_chain();
        let leaf = CertificateFacts::from_der("leaf", &leaf).expect("leaf");
        assert_eq!(leaf.subject(), "CN=plc-7");
        assert!(!leaf.serial_hex().is_empty());
        assert!(leaf.not_after().ends_with('Z'));
    }
}
