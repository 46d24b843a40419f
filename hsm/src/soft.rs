//! Software keys: PKCS#8 PEM files with owner-only permissions.
//!
//! p256 generates and encodes the key (key handling); aws-lc-rs signs, because it signs
//! about five times faster and the issuer's leaf signing is on the hot path (DESIGN §8).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use zeroize::Zeroizing;

use crate::{Error, PublicKey, Signer};

/// A P-256 key held in process memory, loaded from (or saved to) a PKCS#8 file.
pub struct SoftKey {
    pair: EcdsaKeyPair,
    public: PublicKey,
    path: Option<PathBuf>,
    rng: SystemRandom,
}

impl SoftKey {
    /// A fresh key that lives only in memory (agents' short-lived keys, tests).
    pub fn generate() -> Result<Self, Error> {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| Error::Sign(format!("encoding a new key: {e}")))?;
        Self::from_pkcs8_der(der.as_bytes(), None)
    }

    /// Creates a key file at `path` (mode 0600, never overwriting) and returns the key.
    pub fn create(path: &Path) -> Result<Self, Error> {
        let key = Self::generate()?;
        key.save(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            ..key
        })
    }

    /// Writes the key as PKCS#8 PEM to a new file with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let pem = self.to_pkcs8_pem()?;
        let mut file = crate::key_file::create(path)?;
        file.write_all(pem.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Opens an existing key file; refuses one that group or others can read.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::InsecurePermissions(path.to_owned()));
        }
        let pem = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        let secret = p256::SecretKey::from_pkcs8_pem(&pem).map_err(|e| Error::BadKey {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let der = secret.to_pkcs8_der().map_err(|e| Error::BadKey {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_pkcs8_der(der.as_bytes(), Some(path.to_owned()))
    }

    /// From PKCS#8 DER bytes (e.g. a key received from EST serverkeygen).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, Error> {
        // Normalise through p256 so keys with or without the optional public key field load.
        let secret = p256::SecretKey::from_pkcs8_der(der).map_err(|e| Error::BadKey {
            path: PathBuf::from("<memory>"),
            reason: e.to_string(),
        })?;
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| Error::Sign(e.to_string()))?;
        Self::from_pkcs8_der(der.as_bytes(), None)
    }

    fn from_pkcs8_der(der: &[u8], path: Option<PathBuf>) -> Result<Self, Error> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der).map_err(|e| {
            Error::BadKey {
                path: path.clone().unwrap_or_else(|| PathBuf::from("<memory>")),
                reason: e.to_string(),
            }
        })?;
        let public =
            PublicKey::from_uncompressed_point(pair.public_key().as_ref()).ok_or_else(|| {
                Error::BadKey {
                    path: path.clone().unwrap_or_else(|| PathBuf::from("<memory>")),
                    reason: "public key is not an uncompressed P-256 point".into(),
                }
            })?;
        Ok(Self {
            pair,
            public,
            path,
            rng: SystemRandom::new(),
        })
    }

    /// The key as PKCS#8 DER. Only software keys can do this; it exists for serverkeygen and
    /// PKCS#12 export, where handing the key over is the point.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, Error> {
        let secret = self.secret()?;
        let doc = secret
            .to_pkcs8_der()
            .map_err(|e| Error::Sign(e.to_string()))?;
        Ok(Zeroizing::new(doc.as_bytes().to_vec()))
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, Error> {
        let secret = self.secret()?;
        secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| Error::Sign(e.to_string()))
    }

    fn secret(&self) -> Result<p256::SecretKey, Error> {
        // aws-lc-rs can serialise its key pair as PKCS#8 v1; p256 re-reads it.
        let doc = self
            .pair
            .to_pkcs8v1()
            .map_err(|e| Error::Sign(e.to_string()))?;
        p256::SecretKey::from_pkcs8_der(doc.as_ref()).map_err(|e| Error::Sign(e.to_string()))
    }
}

impl Signer for SoftKey {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        self.pair
            .sign(&self.rng, message)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|e| Error::Sign(e.to_string()))
    }

    fn location(&self) -> String {
        match &self.path {
            Some(path) => format!("software key file {}", path.display()),
            None => "software key in memory".into(),
        }
    }

    fn in_memory(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for SoftKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftKey")
            .field("public", &self.public)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

    #[test]
    fn created_key_file_is_owner_only_and_reopens_to_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.key");
        let key = SoftKey::create(&path).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = SoftKey::open(&path).expect("open");
        assert_eq!(key.public_key(), again.public_key());
    }

    #[test]
    fn create_never_overwrites_an_existing_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.key");
        SoftKey::create(&path).expect("create");
        assert!(matches!(SoftKey::create(&path), Err(Error::KeyExists(_))));
    }

    #[test]
    fn world_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.key");
        SoftKey::create(&path).expect("create");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            SoftKey::open(&path),
            Err(Error::InsecurePermissions(_))
        ));
    }

    #[test]
    fn signatures_verify_with_an_independent_verifier() {
        let key = SoftKey::generate().expect("key");
        let sig = key.sign(b"plant").expect("sign");
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().point())
            .verify(b"plant", &sig)
            .expect("verifies");
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let key = SoftKey::generate().expect("key");
        let pem = key.to_pkcs8_pem().expect("pem");
        let debug = format!("{key:?}");
        let body: String = pem
            .lines()
            .nth(1)
            .unwrap_or_default()
            .chars()
            .take(20)
            .collect();
        assert!(!debug.contains(&body));
    }
}
