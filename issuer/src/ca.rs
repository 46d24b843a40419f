//! The plant's CA hierarchy: a root and an issuing CA. The issuing key is reached only
//! through `hsm::Signer`, so a TPM or PKCS#11 key signs exactly like a software one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use der::{Decode, Encode};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose,
    PublicKeyData, SignatureAlgorithm, SigningKey,
};
use time::OffsetDateTime;

use crate::serial::Serial;
use crate::Error;

/// An `hsm::Signer` seen through rcgen's `SigningKey` trait.
#[derive(Debug, Clone)]
pub struct HsmKey(pub Arc<dyn hsm::Signer>);

impl PublicKeyData for HsmKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key().point()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for HsmKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|e| {
            tracing::error!(error = %e, "CA key failed to sign");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A subject's public key (uncompressed P-256 point) as rcgen wants it.
#[derive(Debug, Clone)]
pub struct SubjectKey(pub Vec<u8>);

impl PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The loaded CA: certificates and the issuing key.
pub struct CertificateAuthority {
    issuer: Issuer<'static, HsmKey>,
    signer: Arc<dyn hsm::Signer>,
    root_der: Vec<u8>,
    issuing_der: Vec<u8>,
    not_after: OffsetDateTime,
    subject_key_id: Vec<u8>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &self.signer.location())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the root and issuing certificates and opens the issuing key.
    pub fn load(root_pem: &Path, issuing_pem: &Path, key: &hsm::KeyRef) -> Result<Self, Error> {
        let root_der = read_pem_certificate(root_pem)?;
        let issuing_der = read_pem_certificate(issuing_pem)?;
        let signer = hsm::open(key)?;
        let issuing = x509_cert::Certificate::from_der(&issuing_der)
            .map_err(|e| Error::Certificate(format!("{}: {e}", issuing_pem.display())))?;
        let spki = issuing
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        if spki != signer.public_key().spki_der() {
            return Err(Error::Config(format!(
                "the issuing key {} does not belong to the certificate {}",
                signer.location(),
                issuing_pem.display()
            )));
        }
        let not_after = to_offset(
            issuing
                .tbs_certificate
                .validity
                .not_after
                .to_unix_duration(),
        )?;
        let subject_key_id = issuing
            .tbs_certificate
            .extensions
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER)
            .and_then(|e| {
                x509_cert::ext::pkix::SubjectKeyIdentifier::from_der(e.extn_value.as_bytes()).ok()
            })
            .map(|ski| ski.0.as_bytes().to_vec())
            .ok_or_else(|| {
                Error::Certificate(format!(
                    "{} has no subjectKeyIdentifier",
                    issuing_pem.display()
                ))
            })?;
        let issuer = Issuer::from_ca_cert_der(&issuing_der.clone().into(), HsmKey(signer.clone()))?;
        Ok(Self {
            issuer,
            signer,
            root_der,
            issuing_der,
            not_after,
            subject_key_id,
        })
    }

    /// Signs a CRL whose authority key identifier is the issuing CA's own.
    pub fn sign_crl(
        &self,
        mut params: rcgen::CertificateRevocationListParams,
    ) -> Result<Vec<u8>, Error> {
        params.key_identifier_method =
            rcgen::KeyIdMethod::PreSpecified(self.subject_key_id.clone());
        params
            .signed_by(&self.issuer)
            .map(|c| c.der().to_vec())
            .map_err(|e| self.key_fault(e))
    }

    /// Signs `params` for `subject_key` with the issuing key.
    pub fn sign(
        &self,
        params: &CertificateParams,
        subject_key: &SubjectKey,
    ) -> Result<Vec<u8>, Error> {
        params
            .signed_by(subject_key, &self.issuer)
            .map(|c| c.der().to_vec())
            .map_err(|e| self.key_fault(e))
    }

    /// A signing failure of the CA key (a TPM that is down, an HSM session lost) is a key
    /// fault the client may retry (503), not a malformed certificate; `HsmKey` logged why.
    fn key_fault(&self, error: rcgen::Error) -> Error {
        match error {
            rcgen::Error::RemoteKeyError => Error::Key(hsm::Error::Sign(format!(
                "the CA key ({}) did not sign",
                self.signer.location()
            ))),
            other => other.into(),
        }
    }

    /// The certificates `cacerts` returns: issuing CA, then root.
    pub fn ca_certificates(&self) -> Vec<Vec<u8>> {
        vec![self.issuing_der.clone(), self.root_der.clone()]
    }

    /// The issuing CA certificate, DER.
    pub fn issuing_der(&self) -> &[u8] {
        &self.issuing_der
    }

    /// The root CA certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// SHA-256 of the root certificate: what engineers pin with `--ca-fingerprint`.
    pub fn root_fingerprint(&self) -> String {
        est::fingerprint(&self.root_der)
    }

    /// The issuing CA's notAfter; no certificate outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Where the issuing key lives.
    pub fn key_location(&self) -> String {
        self.signer.location()
    }
}

/// Reads the first certificate of a PEM file as DER.
pub fn read_pem_certificate(path: &Path) -> Result<Vec<u8>, Error> {
    read_pem_chain(path)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Certificate(format!("{} holds no certificate", path.display())))
}

/// Reads every certificate of a PEM file as DER, in file order.
pub fn read_pem_chain(path: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let pem = std::fs::read(path).map_err(Error::io(path))?;
    x509_cert::Certificate::load_pem_chain(&pem)
        .map_err(|e| Error::Certificate(format!("{}: {e}", path.display())))?
        .iter()
        .map(|c| c.to_der().map_err(|e| Error::Certificate(e.to_string())))
        .collect()
}

fn to_offset(since_epoch: Duration) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(since_epoch.as_secs() as i64)
        .map_err(|e| Error::Certificate(e.to_string()))
}

/// What `issuer init` creates: a root and an issuing CA, both P-256.
#[derive(Debug, Clone)]
pub struct NewHierarchy {
    /// Root certificate PEM.
    pub root_pem: String,
    /// Issuing certificate PEM.
    pub issuing_pem: String,
}

/// Creates a self-signed root (20 years) and an issuing CA under it (10 years), with keys at
/// the given references. The root key is only used here and for future issuing CAs.
pub fn create_hierarchy(
    organization: &str,
    trust_domain: &str,
    root_key: &hsm::KeyRef,
    issuing_key: &hsm::KeyRef,
) -> Result<NewHierarchy, Error> {
    let now = OffsetDateTime::now_utc();
    let root_signer = HsmKey(hsm::create(root_key)?);
    let mut root = ca_params(
        &format!("{organization} Root CA"),
        organization,
        trust_domain,
        now,
        Duration::from_secs(20 * 365 * 86_400),
        None,
    );
    root.key_usages.push(KeyUsagePurpose::DigitalSignature);
    let root_cert = root.self_signed(&root_signer)?;
    let root_issuer = Issuer::new(root, root_signer);

    let issuing_signer = HsmKey(hsm::create(issuing_key)?);
    let issuing = ca_params(
        &format!("{organization} Issuing CA 1"),
        organization,
        trust_domain,
        now,
        Duration::from_secs(10 * 365 * 86_400),
        Some(0),
    );
    let issuing_cert = issuing.signed_by(&issuing_signer, &root_issuer)?;
    Ok(NewHierarchy {
        root_pem: root_cert.pem(),
        issuing_pem: issuing_cert.pem(),
    })
}

fn ca_params(
    common_name: &str,
    organization: &str,
    trust_domain: &str,
    now: OffsetDateTime,
    lifetime: Duration,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::OrganizationalUnitName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - time::Duration::seconds(60);
    params.not_after = now + lifetime;
    params.serial_number = Some(Serial::random().0.to_vec().into());
    params.use_authority_key_identifier_extension = path_len.is_some();
    params
}
