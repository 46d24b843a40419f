//! Renewal over EST `simplereenroll` (RFC 7030 §4.2.2): the current certificate is the TLS
//! client certificate, and the request repeats its Subject and SANs.

use std::path::{Path, PathBuf};

use est::client::ClientIdentity;
use est::Label;

use crate::certificate::{issuing_chain, CertificateFacts};
use crate::csr::DeviceNames;
use crate::enrollment::Enrollment;
use crate::pem_files::{self, CredentialDir, Overwrite, CA_FILE, CHAIN_FILE, KEY_FILE};
use crate::trust::CaTrust;
use crate::Error;

/// One `agent reenroll`.
#[derive(Debug, Clone)]
pub struct ReenrollOptions {
    /// EST server base URL.
    pub server: String,
    /// The current certificate (PEM; further certificates in the file count as its chain).
    pub cert: PathBuf,
    /// The current private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
    /// The CA certificate(s) to verify the server with (`ca.pem` from enrollment).
    pub ca: PathBuf,
    /// The issuing chain to present with the certificate; default `chain.pem` beside `cert`.
    pub chain: Option<PathBuf>,
    /// EST label.
    pub label: Option<Label>,
    /// Where the new files go; default: the directory of `cert`.
    pub out: Option<PathBuf>,
    /// Generate a new key instead of certifying the current one again.
    pub rekey: bool,
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

    let key = hsm::SoftKey::open(&options.key)?;
    current.ensure_key(
        &format!(
            "{} (does it belong to {}?)",
            options.cert.display(),
            options.key.display()
        ),
        hsm::Signer::public_key(&key),
    )?;
    let identity = ClientIdentity {
        chain: presented,
        pkcs8_der: key.to_pkcs8_der()?.to_vec(),
    };
    let client = trust.client(options.label.as_ref(), Some(&identity))?;

    let names = DeviceNames::of_certificate(&current)?;
    let new_key = if options.rekey {
        Some(hsm::SoftKey::generate()?)
    } else {
        None
    };
    let signer = new_key.as_ref().unwrap_or(&key);
    let csr = names.request(signer)?;
    let step = format!("renewing {}", current.subject());
    let issued = client
        .simple_reenroll(&csr)
        .await
        .map_err(Error::est(step.clone()))?;
    let leaf = CertificateFacts::from_der("renewed certificate", &issued)?;
    leaf.ensure_key("renewed certificate", hsm::Signer::public_key(signer))?;
    // The issuing CA may have rotated since the last enrollment (DESIGN §3: a short-lived
    // signing CA), so chain.pem is refreshed along with the certificate.
    let ca_certs = client
        .cacerts()
        .await
        .map_err(Error::est(format!("{step}: fetching the CA certificates")))?;
    let chain = issuing_chain(&leaf, &ca_certs, trust.anchors())?;

    let dir = CredentialDir::new(options.out.clone().unwrap_or(cert_dir));
    dir.prepare(Overwrite::Allow)?;
    let mut files = Vec::new();
    if let Some(new_key) = &new_key {
        // Re-keying replaces the key on purpose; the old one is useless with the new cert.
        files.push(dir.write_key(&new_key.to_pkcs8_pem()?, Overwrite::Allow)?);
    } else if !dir.file(KEY_FILE).exists() {
        // A fresh --out directory gets the key too, so it holds a usable identity.
        files.push(dir.write_key(&key.to_pkcs8_pem()?, Overwrite::Refuse)?);
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
            key: creds.file(KEY_FILE),
            ca: creds.file(CA_FILE),
            chain: None,
            label: None,
            out: None,
            rekey: false,
        })
        .await
        .expect_err("mismatch");
        assert!(err.to_string().contains("different public key"), "{err}");
    }
}
