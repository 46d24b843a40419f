//! The plant's CA hierarchy: a root and an issuing CA. The issuing key is reached only
//! through `hsm::Signer`, so a TPM or PKCS#11 key signs exactly like a software one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use der::{Decode, Encode};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose,
    PublicKeyData, SignatureAlgorithm,
};
use time::OffsetDateTime;

use serde::{Deserialize, Serialize};

use crate::ca_key::key_fault;
pub use crate::ca_key::HsmKey;
use crate::serial::Serial;
use crate::signing_key::{ShortLivedKey, SigningKeyConfig, SigningKeys};
use crate::Error;

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

/// The loaded CA: certificates, the issuing key and, when configured, the short-lived
/// signing keys it certifies.
pub struct CertificateAuthority {
    issuer: Arc<Issuer<'static, HsmKey>>,
    signer: Arc<dyn hsm::Signer>,
    root_der: Vec<u8>,
    issuing_der: Vec<u8>,
    issuing_name: DistinguishedName,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    subject_key_id: Vec<u8>,
    signing_keys: Option<SigningKeys>,
}

/// Which key signs a certificate (`sign_with` in a profile).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignWith {
    /// The short-lived in-memory key the issuing key certified (when `[ca.signing_key]` is
    /// set; otherwise the issuing key).
    #[default]
    SigningKey,
    /// The issuing key itself: one hardware signature per certificate, so issuance is held to
    /// the device's rate and a full queue answers 503.
    IssuingKey,
}

/// The key chosen for one certificate.
pub enum LeafSigner {
    /// The issuing key, and its certificate's notAfter.
    Issuing(Arc<Issuer<'static, HsmKey>>, OffsetDateTime),
    /// A short-lived signing key.
    ShortLived(Arc<ShortLivedKey>),
}

impl std::fmt::Debug for LeafSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Issuing(_, _) => f.write_str("LeafSigner::Issuing"),
            Self::ShortLived(key) => f.debug_tuple("LeafSigner::ShortLived").field(key).finish(),
        }
    }
}

impl LeafSigner {
    /// No certificate signed by this key may outlive this.
    pub fn not_after(&self) -> OffsetDateTime {
        match self {
            Self::Issuing(_, not_after) => *not_after,
            Self::ShortLived(key) => key.not_after(),
        }
    }

    /// Signs `params` for `subject_key`. The issuing key may be a TPM that takes 70 ms a
    /// signature behind a queue, so a device key signs on a blocking thread: the async
    /// workers go on serving everything else (short-lived-key issuance, cacerts) meanwhile.
    /// A key in memory signs in microseconds, less than the hand-off would cost.
    pub async fn sign(
        &self,
        params: &CertificateParams,
        subject_key: &SubjectKey,
    ) -> Result<Vec<u8>, Error> {
        match self {
            Self::Issuing(issuer, _) if issuer.key().0.in_memory() => params
                .signed_by(subject_key, issuer)
                .map(|c| c.der().to_vec())
                .map_err(|e| key_fault(e, issuer.key())),
            Self::Issuing(issuer, _) => {
                let (issuer, params, subject_key) =
                    (issuer.clone(), params.clone(), subject_key.clone());
                tokio::task::spawn_blocking(move || {
                    params
                        .signed_by(&subject_key, &issuer)
                        .map(|c| c.der().to_vec())
                        .map_err(|e| key_fault(e, issuer.key()))
                })
                .await
                .map_err(|e| Error::Certificate(format!("signing task failed: {e}")))?
            }
            Self::ShortLived(key) => {
                Ok(params.signed_by(subject_key, key.issuer())?.der().to_vec())
            }
        }
    }
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
    /// Loads the root and issuing certificates and opens the issuing key. With
    /// `signing_keys` (config and the longest leaf lifetime they sign), leaves are signed by
    /// short-lived keys once [`CertificateAuthority::certify_due`] has made the first.
    pub fn load(
        root_pem: &Path,
        issuing_pem: &Path,
        key: &hsm::KeyRef,
        key_options: hsm::TpmOptions,
        signing_keys: Option<(SigningKeyConfig, Duration)>,
    ) -> Result<Self, Error> {
        let root_der = read_pem_certificate(root_pem)?;
        let issuing_der = read_pem_certificate(issuing_pem)?;
        let signer = hsm::open_with(key, key_options)?;
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
        let validity = &issuing.tbs_certificate.validity;
        let not_before = to_offset(validity.not_before.to_unix_duration())?;
        let not_after = to_offset(validity.not_after.to_unix_duration())?;
        let subject_key_id = extension::<x509_cert::ext::pkix::SubjectKeyIdentifier>(
            &issuing,
            const_oid::db::rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
        )
        .map(|ski| ski.0.as_bytes().to_vec())
        .ok_or_else(|| {
            Error::Certificate(format!(
                "{} has no subjectKeyIdentifier",
                issuing_pem.display()
            ))
        })?;
        let path_len = extension::<x509_cert::ext::pkix::BasicConstraints>(
            &issuing,
            const_oid::db::rfc5280::ID_CE_BASIC_CONSTRAINTS,
        )
        .and_then(|bc| bc.path_len_constraint);
        if signing_keys.is_some() && path_len == Some(0) {
            return Err(Error::Config(format!(
                "{} has pathLenConstraint 0, so certificates signed by short-lived signing keys \
                 would fail verifiers that count every CA (rustls among them); remove \
                 [ca.signing_key] from the configuration, or create the hierarchy again with \
                 `issuer init`",
                issuing_pem.display()
            )));
        }
        let issuing_name = rcgen_name(&issuing.tbs_certificate.subject)
            .map_err(|e| Error::Certificate(format!("{}: {e}", issuing_pem.display())))?;
        let issuer = Arc::new(Issuer::from_ca_cert_der(
            &issuing_der.clone().into(),
            HsmKey(signer.clone()),
        )?);
        Ok(Self {
            issuer,
            signer,
            root_der,
            issuing_der,
            issuing_name,
            not_before,
            not_after,
            subject_key_id,
            signing_keys: signing_keys.map(|(config, longest)| SigningKeys::new(config, longest)),
        })
    }

    /// The key that signs a certificate of a profile set to `sign_with`, at `now`.
    pub fn leaf_signer(
        &self,
        sign_with: SignWith,
        now: OffsetDateTime,
    ) -> Result<LeafSigner, Error> {
        match (&self.signing_keys, sign_with) {
            (Some(keys), SignWith::SigningKey) => Ok(LeafSigner::ShortLived(keys.current(now)?)),
            _ => Ok(LeafSigner::Issuing(self.issuer.clone(), self.not_after)),
        }
    }

    /// The short-lived signing keys, when configured.
    pub fn signing_keys(&self) -> Option<&SigningKeys> {
        self.signing_keys.as_ref()
    }

    /// Certifies the next short-lived signing key if one is due (a hardware signature: run
    /// it off the async threads). Publish it with [`SigningKeys::publish`] once recorded.
    pub fn certify_due(&self, now: OffsetDateTime) -> Result<Option<ShortLivedKey>, Error> {
        match &self.signing_keys {
            Some(keys) => keys.certify_due(now, &self.issuer, &self.issuing_name, self.not_after),
            None => Ok(None),
        }
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
            .map_err(|e| key_fault(e, self.issuer.key()))
    }

    /// The certificates `cacerts` returns at `now`: the published short-lived signing keys
    /// (newest first), the issuing CA, then the root.
    pub fn ca_certificates(&self, now: OffsetDateTime) -> Vec<Vec<u8>> {
        let mut certs = self
            .signing_keys
            .as_ref()
            .map(|keys| keys.published(now))
            .unwrap_or_default();
        certs.push(self.issuing_der.clone());
        certs.push(self.root_der.clone());
        certs
    }

    /// The CA certificates above `leaf` up to, not including, the root, nearest first:
    /// followed by authority key identifier, so of several published short-lived signing
    /// keys only the one that signed `leaf` is included. What an SVID's `chain` carries.
    pub fn chain_above(&self, leaf: &[u8], now: OffsetDateTime) -> Vec<Vec<u8>> {
        use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
        let parse = |der: &[u8]| x509_cert::Certificate::from_der(der).ok();
        let mut candidates: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .ca_certificates(now)
            .into_iter()
            .filter(|der| *der != self.root_der)
            .map(|der| {
                let ski = parse(&der)
                    .and_then(|c| {
                        extension::<SubjectKeyIdentifier>(
                            &c,
                            const_oid::db::rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
                        )
                    })
                    .map(|k| k.0.as_bytes().to_vec());
                (der, ski)
            })
            .collect();
        let mut chain = Vec::new();
        let mut current = leaf.to_vec();
        loop {
            let aki = parse(&current)
                .and_then(|c| {
                    extension::<AuthorityKeyIdentifier>(
                        &c,
                        const_oid::db::rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
                    )
                })
                .and_then(|k| k.key_identifier.map(|id| id.as_bytes().to_vec()));
            let Some(position) = candidates
                .iter()
                .position(|(_, ski)| aki.is_some() && *ski == aki)
            else {
                return chain;
            };
            let (der, _) = candidates.swap_remove(position);
            chain.push(der.clone());
            current = der;
        }
    }

    /// The issuing key's queue, when its device queues (a TPM).
    pub fn key_queue(&self) -> Option<hsm::Queue> {
        self.signer.queue()
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

    /// The issuing CA's notBefore; a clock before it is wrong, not early.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
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

/// `name` as rcgen builds names, with the same string types, so a self-issued certificate
/// names its subject byte for byte as the issuing CA does (name matching in path building
/// and CRL checks stays exact).
fn rcgen_name(name: &x509_cert::name::Name) -> Result<DistinguishedName, String> {
    use der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use der::Tag;
    let mut dn = DistinguishedName::new();
    for rdn in name.0.iter() {
        let [attribute] = rdn.0.as_slice() else {
            return Err("multi-valued name components are not supported".into());
        };
        let arcs: Vec<u64> = attribute.oid.arcs().map(u64::from).collect();
        let text = |e: der::Error| format!("name component {}: {e}", attribute.oid);
        let value = match der::Tagged::tag(&attribute.value) {
            Tag::Utf8String => rcgen::DnValue::Utf8String(
                Utf8StringRef::try_from(&attribute.value)
                    .map_err(text)?
                    .as_str()
                    .to_owned(),
            ),
            Tag::PrintableString => rcgen::DnValue::PrintableString(
                PrintableStringRef::try_from(&attribute.value)
                    .map_err(text)?
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Tag::Ia5String => rcgen::DnValue::Ia5String(
                Ia5StringRef::try_from(&attribute.value)
                    .map_err(text)?
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            other => {
                return Err(format!(
                    "name component {} is a {other}, which is not supported",
                    attribute.oid
                ))
            }
        };
        dn.push(DnType::from_oid(&arcs), value);
    }
    Ok(dn)
}

/// The extension `oid` of `certificate`, decoded as `T`; `None` if absent or undecodable.
fn extension<T: for<'a> Decode<'a>>(
    certificate: &x509_cert::Certificate,
    oid: const_oid::ObjectIdentifier,
) -> Option<T> {
    certificate
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.extn_id == oid)
        .and_then(|e| T::from_der(e.extn_value.as_bytes()).ok())
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
        // 1, not 0: short-lived signing keys are CA certificates under it. RFC 5280 exempts
        // self-issued ones from the count, but rustls-webpki counts them.
        Some(1),
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
    // An hour back: the CA may be made on one machine and serve from another whose clock
    // lags by minutes; leaves are back-dated too, and never before their CA.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + lifetime;
    params.serial_number = Some(Serial::random().0.to_vec().into());
    params.use_authority_key_identifier_extension = path_len.is_some();
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root and an issuing CA with pathLenConstraint `path_len` in `dir`; returns the
    /// root and issuing PEM paths and the issuing key reference.
    fn hierarchy(
        dir: &Path,
        path_len: u8,
    ) -> (std::path::PathBuf, std::path::PathBuf, hsm::KeyRef) {
        let now = OffsetDateTime::now_utc();
        let root_key = HsmKey(Arc::new(hsm::SoftKey::generate().expect("key")));
        let root = ca_params(
            "Root",
            "Plant",
            "plant.example",
            now,
            Duration::from_secs(86_400),
            None,
        );
        let root_cert = root.self_signed(&root_key).expect("root");
        let key_ref = hsm::KeyRef::soft(dir.join("issuing.key"));
        let issuing_key = HsmKey(hsm::create(&key_ref).expect("issuing key"));
        let issuing = ca_params(
            "Issuing",
            "Plant",
            "plant.example",
            now,
            Duration::from_secs(3600),
            Some(path_len),
        );
        let issuing_cert = issuing
            .signed_by(&issuing_key, &Issuer::new(root, root_key))
            .expect("issuing");
        let (root_pem, issuing_pem) = (dir.join("root.crt"), dir.join("issuing.crt"));
        std::fs::write(&root_pem, root_cert.pem()).expect("write");
        std::fs::write(&issuing_pem, issuing_cert.pem()).expect("write");
        (root_pem, issuing_pem, key_ref)
    }

    #[test]
    fn short_lived_keys_under_a_path_length_zero_issuing_ca_are_refused_with_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, issuing, key) = hierarchy(dir.path(), 0);
        let signing = Some((SigningKeyConfig::default(), Duration::from_secs(3600)));
        let refused =
            CertificateAuthority::load(&root, &issuing, &key, hsm::TpmOptions::default(), signing)
                .expect_err("pathLen 0 with short-lived keys");
        assert!(
            refused.to_string().contains("pathLenConstraint 0"),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("[ca.signing_key]"),
            "{refused}"
        );
        // Without short-lived keys the same hierarchy serves; with pathLen 1 both do.
        CertificateAuthority::load(&root, &issuing, &key, hsm::TpmOptions::default(), None)
            .expect("direct signing");
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, issuing, key) = hierarchy(dir.path(), 1);
        CertificateAuthority::load(&root, &issuing, &key, hsm::TpmOptions::default(), signing)
            .expect("pathLen 1");
    }
}
