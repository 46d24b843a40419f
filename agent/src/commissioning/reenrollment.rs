//! Renewal over EST `simplereenroll` (RFC 7030 §4.2.2): the current certificate is the TLS
//! client certificate, and the request repeats its Subject and SANs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use est::Label;
use hsm::KeyRef;

use crate::certificate::{issuing_chain, CertificateFacts};
use crate::commissioning::client_identity::ReenrollClient;
use crate::commissioning::csr::DeviceNames;
use crate::commissioning::enrollment::Enrollment;
use crate::commissioning::trust::CaTrust;
use crate::pem_files::{
    self, CredentialDir, Overwrite, CA_FILE, CHAIN_FILE, KEY_FILE, KEY_REF_FILE,
};
use crate::Error;

/// The key the current certificate belongs to.
#[derive(Debug, Clone)]
pub enum CurrentKey {
    /// A software key, PKCS#8 PEM (`key.pem`, mode 0600).
    Pem(PathBuf),
    /// A key named by a key reference, normally a TPM or PKCS#11 key from `key.ref`.
    Reference(KeyRef),
    /// Whichever is beside the certificate: `key.ref` if present, else `key.pem`.
    BesideCertificate,
}

impl CurrentKey {
    /// `--key-ref` takes a key reference or a file holding one (`key.ref`).
    pub fn from_argument(text: &str) -> Result<Self, Error> {
        let looks_like_reference = ["tpm:", "pkcs11:", "soft:"]
            .iter()
            .any(|scheme| text.starts_with(scheme));
        if looks_like_reference {
            return text
                .parse::<KeyRef>()
                .map(Self::Reference)
                .map_err(|e| Error::Usage(format!("--key-ref: {e}")));
        }
        let path = Path::new(text);
        if !path.exists() {
            return Err(Error::Usage(format!(
                "--key-ref {text:?} is neither a key reference (tpm:…, pkcs11:…, soft:…) nor an existing key.ref file"
            )));
        }
        Ok(Self::Reference(pem_files::read_key_ref(path)?))
    }
}

/// One `agent reenroll`.
#[derive(Debug, Clone)]
pub struct ReenrollOptions {
    /// EST server base URL.
    pub server: String,
    /// The current certificate (PEM; further certificates in the file count as its chain).
    pub cert: PathBuf,
    /// The current certificate's key.
    pub key: CurrentKey,
    /// The CA certificate(s) to verify the server with (`ca.pem` from enrollment).
    pub ca: PathBuf,
    /// The issuing chain to present with the certificate; default `chain.pem` beside `cert`.
    pub chain: Option<PathBuf>,
    /// EST label.
    pub label: Option<Label>,
    /// Where the new files go; default: the directory of `cert`.
    pub out: Option<PathBuf>,
    /// Generate a new key instead of certifying the current one again (software keys only).
    pub rekey: bool,
    /// Create a new key here (a TPM or PKCS#11 reference) and renew with it.
    pub new_key: Option<KeyRef>,
}

/// The current key, opened, and where it came from.
struct OpenedKey {
    signer: Arc<dyn hsm::Signer>,
    /// The software key itself, to copy into a fresh output directory.
    soft: Option<Arc<hsm::SoftKey>>,
    /// The (absolute) key reference, for a fresh output directory.
    reference: Option<KeyRef>,
    /// For messages.
    name: String,
}

fn open_current_key(key: &CurrentKey, cert_dir: &Path) -> Result<OpenedKey, Error> {
    let reference = match key {
        CurrentKey::Reference(reference) => reference.clone(),
        CurrentKey::BesideCertificate if cert_dir.join(KEY_REF_FILE).exists() => {
            pem_files::read_key_ref(&cert_dir.join(KEY_REF_FILE))?
        }
        CurrentKey::Pem(path) => return open_pem_key(path),
        CurrentKey::BesideCertificate => return open_pem_key(&cert_dir.join(KEY_FILE)),
    };
    let cwd = std::path::absolute(".").map_err(Error::io("."))?;
    let reference = reference.with_base_dir(&cwd);
    Ok(OpenedKey {
        signer: hsm::open(&reference)?,
        soft: None,
        name: reference.to_string(),
        reference: Some(reference),
    })
}

fn open_pem_key(path: &Path) -> Result<OpenedKey, Error> {
    let soft = Arc::new(hsm::SoftKey::open(path)?);
    Ok(OpenedKey {
        signer: Arc::clone(&soft) as Arc<dyn hsm::Signer>,
        soft: Some(soft),
        reference: None,
        name: path.display().to_string(),
    })
}

/// Renews the certificate and writes `cert.pem`, `chain.pem` (and `key.pem` when re-keyed).
pub async fn reenroll(options: ReenrollOptions) -> Result<Enrollment, Error> {
    let trust = CaTrust::from_file(&options.server, &options.ca)?;
    let cert_dir = directory_of(&options.cert);
    let mut presented = pem_files::read_certificates(&options.cert)?;
    if presented.is_empty() {
        return Err(Error::Usage(format!(
            "{} holds no certificate; pass the cert.pem to renew with --cert",
            options.cert.display()
        )));
    }
    let current = CertificateFacts::from_der(&options.cert.display().to_string(), &presented[0])?;
    let chain_file = options
        .chain
        .clone()
        .unwrap_or_else(|| cert_dir.join(CHAIN_FILE));
    if options.chain.is_some() || chain_file.exists() {
        presented.extend(pem_files::read_certificates(&chain_file)?);
    }

    let key = open_current_key(&options.key, &cert_dir)?;
    if options.rekey && key.soft.is_none() {
        return Err(Error::Usage(format!(
            "--rekey makes a new software key, but the current key is {}; a TPM or PKCS#11 key is renewed as it is, or replaced by a new one in the device with --new-key tpm:… or pkcs11:…",
            key.name
        )));
    }
    current.ensure_key(
        &format!(
            "{} (does it belong to {}?)",
            options.cert.display(),
            key.name
        ),
        key.signer.public_key(),
    )?;
    let client = ReenrollClient::new(
        &trust,
        options.label.as_ref(),
        &presented,
        Arc::clone(&key.signer),
    )
    .map_err(Error::est_reenroll("setting up TLS to the EST server"))?;

    let names = DeviceNames::of_certificate(&current)?;
    let new_key = if options.rekey {
        Some(hsm::SoftKey::generate()?)
    } else {
        None
    };
    // A new key in the TPM or token: created before the renewal, named in key.ref after it.
    // A relative blob path is relative to the credential folder, as at enrollment. If the
    // renewal fails the new key stays unused where it was made; creation never overwrites,
    // so a retry names another blob or label.
    let device_key = match &options.new_key {
        Some(reference) => {
            let folder = options.out.clone().unwrap_or_else(|| cert_dir.clone());
            let folder = std::path::absolute(&folder).map_err(Error::io(&folder))?;
            let reference = reference.clone().with_base_dir(&folder);
            Some((hsm::create(&reference)?, reference))
        }
        None => None,
    };
    let signer: &dyn hsm::Signer = match (&new_key, &device_key) {
        (Some(new_key), _) => new_key,
        (None, Some((device_key, _))) => device_key.as_ref(),
        (None, None) => key.signer.as_ref(),
    };
    let csr = names.request(signer)?;
    let step = format!("renewing {}", current.subject());
    let issued = client
        .simple_reenroll(&csr)
        .await
        .map_err(Error::est_reenroll(step.clone()))?;
    let leaf = CertificateFacts::from_der("renewed certificate", &issued)?;
    leaf.ensure_key("renewed certificate", signer.public_key())?;
    // The issuing CA may have rotated since the last enrollment (DESIGN §3: a short-lived
    // signing CA), so chain.pem is refreshed along with the certificate.
    let ca_certs = trust
        .client(options.label.as_ref(), None)?
        .cacerts()
        .await
        .map_err(Error::est_reenroll(format!(
            "{step}: fetching the CA certificates"
        )))?;
    let chain = issuing_chain(&leaf, &ca_certs, trust.anchors())?;

    let dir = CredentialDir::new(options.out.clone().unwrap_or(cert_dir));
    dir.prepare(Overwrite::Allow)?;
    let mut files = Vec::new();
    let has_key = dir.file(KEY_FILE).exists() || dir.file(KEY_REF_FILE).exists();
    if let Some(new_key) = &new_key {
        // Re-keying replaces the key on purpose; the old one is useless with the new cert.
        files.push(dir.write_key(&new_key.to_pkcs8_pem()?, Overwrite::Allow)?);
    } else if let Some((_, reference)) = &device_key {
        files.push(dir.write_key_ref(reference, Overwrite::Allow)?);
        // A key.pem left beside key.ref would be the old, now useless, key.
        let stale = dir.file(KEY_FILE);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(Error::io(&stale))?;
        }
    } else if !has_key {
        // A fresh --out directory gets the key (or where it is) too, so it holds a usable
        // identity.
        match (&key.soft, &key.reference) {
            (Some(soft), _) => files.push(dir.write_key(&soft.to_pkcs8_pem()?, Overwrite::Refuse)?),
            (None, Some(reference)) => files.push(dir.write_key_ref(reference, Overwrite::Refuse)?),
            (None, None) => {}
        }
    }
    let root = (!dir.file(CA_FILE).exists()).then(|| trust.root());
    files.extend(dir.write_certificates(leaf.der(), &chain, root)?);
    tracing::info!(subject = %leaf.subject(), serial = %leaf.serial_hex(), rekey = options.rekey, "renewed");
    Ok(Enrollment::new(&leaf, files))
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_is_the_certificates_directory() {
        assert_eq!(
            directory_of(Path::new("/etc/plant/cert.pem")),
            PathBuf::from("/etc/plant")
        );
        assert_eq!(directory_of(Path::new("cert.pem")), PathBuf::from("."));
    }

    #[tokio::test]
    async fn key_that_does_not_match_the_certificate_is_refused_before_connecting() {
        let (root, _, leaf) = crate::certificate::tests::three_level_chain();
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = CredentialDir::new(dir.path());
        creds
            .write_certificates(&leaf, &[], Some(&root))
            .expect("certs");
        let other = hsm::SoftKey::generate().expect("key");
        creds
            .write_key(&other.to_pkcs8_pem().expect("pem"), Overwrite::Refuse)
            .expect("key");
        let err = reenroll(ReenrollOptions {
            server: "https://127.0.0.1:9".into(),
            cert: creds.file(pem_files::CERT_FILE),
            key: CurrentKey::Pem(creds.file(KEY_FILE)),
            ca: creds.file(CA_FILE),
            chain: None,
            label: None,
            out: None,
            rekey: false,
            new_key: None,
        })
        .await
        .expect_err("mismatch");
        assert!(err.to_string().contains("different public key"), "{err}");
    }
}
