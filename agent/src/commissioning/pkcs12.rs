//! PKCS#12 bundles (RFC 7292) for devices that import a key and certificate as one file,
//! typically PLCs that get a server-generated key (EST serverkeygen, RFC 7030 §4.4).
//!
//! Encryption is PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC, and the MAC is HMAC-SHA256:
//! OpenSSL 3 reads that without `-legacy`, and nothing in the file depends on RC2 or 3DES.

use std::path::Path;

use p12_keystore::{
    Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKey,
    PrivateKeyChain,
};
use sha2::Digest;

use crate::commissioning::credentials::Pkcs12Password;
use crate::pem_files::{self, Overwrite};
use crate::Error;

/// PBKDF2 and MAC iterations. OpenSSL 3 writes 2048; more costs a PLC's import only a
/// moment but multiplies the work of guessing the password from a copied file.
const ITERATIONS: u32 = 10_000;

/// A private key with its certificate chain, to be sealed into a PKCS#12 file.
pub struct Pkcs12Bundle<'a> {
    /// The name import tools show for the key (the device's subject).
    pub friendly_name: &'a str,
    /// The private key, PKCS#8 DER.
    pub pkcs8_der: &'a [u8],
    /// The device's certificate, DER.
    pub leaf: &'a [u8],
    /// The CA certificates, nearest issuer first, root last.
    pub chain: &'a [Vec<u8>],
}

impl std::fmt::Debug for Pkcs12Bundle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs12Bundle")
            .field("friendly_name", &self.friendly_name)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Pkcs12Bundle<'_> {
    /// The DER PFX, encrypted and MAC'd under `password`.
    pub fn encode(&self, password: &Pkcs12Password) -> Result<Vec<u8>, Error> {
        let p12 = |e: p12_keystore::error::Error| Error::Pkcs12(e.to_string());
        let key = PrivateKey::from_der(self.pkcs8_der).map_err(p12)?;
        let certs = std::iter::once(self.leaf)
            .chain(self.chain.iter().map(Vec::as_slice))
            .map(Certificate::from_der)
            .collect::<Result<Vec<_>, _>>()
            .map_err(p12)?;
        // localKeyId pairs the key bag with the leaf's certificate bag; any stable bytes do,
        // and a hash of the certificate is what OpenSSL uses too.
        let local_key_id = sha2::Sha256::digest(self.leaf)[..20].to_vec();
        let mut store = KeyStore::new();
        store.add_entry(
            self.friendly_name,
            KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id, key, certs)),
        );
        store
            .writer(password.as_str())
            .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
            .encryption_iterations(ITERATIONS)
            .mac_algorithm(MacAlgorithm::HmacSha256)
            .mac_iterations(ITERATIONS)
            .write()
            .map_err(p12)
    }

    /// Encodes and writes the bundle to `path` with mode 0600.
    pub fn write(
        &self,
        path: &Path,
        password: &Pkcs12Password,
        overwrite: Overwrite,
    ) -> Result<(), Error> {
        let der = zeroize::Zeroizing::new(self.encode(password)?);
        pem_files::write_atomically(path, &der, 0o600, overwrite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use hsm::Signer;
    use p12_keystore::Pkcs12ImportPolicy;

    /// A fresh P-256 key and a self-signed certificate for it.
    fn key_and_certificate() -> (zeroize::Zeroizing<Vec<u8>>, Vec<u8>) {
        let key = hsm::SoftKey::generate().expect("key");
        let pkcs8 = key.to_pkcs8_der().expect("pkcs8");
        let pair = rcgen::KeyPair::try_from(pkcs8.as_slice()).expect("rcgen key");
        let mut params = rcgen::CertificateParams::new(vec!["plc-9.plant".into()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "plc-9");
        let cert = params.self_signed(&pair).expect("cert");
        assert_eq!(pair.public_key_raw(), key.public_key().point());
        (pkcs8, cert.der().to_vec())
    }

    #[test]
    fn bundle_reads_back_with_p12_keystore_and_openssl() {
        let (pkcs8, leaf) = key_and_certificate();
        let (root, ca, _) = crate::certificate::tests::three_level_chain();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("plc-9.p12");
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, "correct horse\n").expect("pw");
        let password = Pkcs12Password::from_file(&password_file).expect("password");
        let chain = vec![ca.clone(), root.clone()];
        let bundle = Pkcs12Bundle {
            friendly_name: "plc-9",
            pkcs8_der: &pkcs8,
            leaf: &leaf,
            chain: &chain,
        };
        bundle
            .write(&path, &password, Overwrite::Refuse)
            .expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let bytes = std::fs::read(&path).expect("read");
        let store = KeyStore::from_pkcs12(&bytes, "correct horse", Pkcs12ImportPolicy::Relaxed)
            .expect("p12-keystore reads it");
        let (alias, keychain) = store.private_key_chain().expect("key entry");
        assert_eq!(alias, "plc-9");
        assert_eq!(keychain.key().as_der(), pkcs8.as_slice());
        let certs: Vec<&[u8]> = keychain.certs().iter().map(|c| c.as_der()).collect();
        assert_eq!(certs.first().copied(), Some(leaf.as_slice()));
        assert!(KeyStore::from_pkcs12(&bytes, "wrong", Pkcs12ImportPolicy::Relaxed).is_err());

        // OpenSSL 3, without -legacy: proves the encryption and MAC are the modern ones.
        let out = Command::new("openssl")
            .arg("pkcs12")
            .arg("-in")
            .arg(&path)
            .arg("-passin")
            .arg(format!("file:{}", password_file.display()))
            .arg("-nokeys")
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl pkcs12 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = String::from_utf8_lossy(&out.stdout);
        let leaf_pem = crate::pem_files::encode_certificates([leaf.as_slice()]).expect("pem");
        let leaf_body: String = leaf_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let printed_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(printed_body.contains(&leaf_body), "leaf missing in:\n{pem}");
        assert!(pem.contains("subject=CN = plc-9"), "{pem}");
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 3, "{pem}");

        // The key decrypts too (PBES2/AES-256-CBC).
        let out = Command::new("openssl")
            .args(["pkcs12", "-nocerts", "-nodes", "-in"])
            .arg(&path)
            .arg("-passin")
            .arg(format!("file:{}", password_file.display()))
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("BEGIN PRIVATE KEY"));

        // And the algorithms are the modern ones, for the certificates, the key and the MAC.
        let out = Command::new("openssl")
            .args(["pkcs12", "-info", "-noout", "-in"])
            .arg(&path)
            .arg("-passin")
            .arg(format!("file:{}", password_file.display()))
            .output()
            .expect("openssl runs");
        let info = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(info.contains("MAC: sha256"), "{info}");
        assert_eq!(
            info.matches("PBES2, PBKDF2, AES-256-CBC").count(),
            2,
            "{info}"
        );
    }

    #[test]
    fn bundle_debug_output_holds_no_key() {
        let (pkcs8, leaf) = key_and_certificate();
        let bundle = Pkcs12Bundle {
            friendly_name: "plc-9",
            pkcs8_der: &pkcs8,
            leaf: &leaf,
            chain: &[],
        };
        let debug = format!("{bundle:?}");
        assert!(!debug.contains(&format!("{:?}", &pkcs8[..8])), "{debug}");
        assert!(!debug.contains(&hex::encode(&pkcs8[..])), "{debug}");
    }
}
