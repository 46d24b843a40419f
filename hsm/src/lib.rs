//! Key custody for Plant PKI.
//!
//! Every private key the issuer or an agent uses is reached through one small trait,
//! [`Signer`], and addressed by a [`KeyRef`] string. The CA code never sees key bytes, so a
//! TPM 2.0 or PKCS#11 backend slots in behind the same trait without touching it
//! (DESIGN §3 "Key custody").

mod error;
mod key_ref;
mod public_key;
mod soft;

pub use error::Error;
pub use key_ref::KeyRef;
pub use public_key::PublicKey;
pub use soft::SoftKey;

use std::fmt;
use std::sync::Arc;

/// Something that holds a P-256 private key and signs with it.
///
/// Object-safe and synchronous: a software key signs in microseconds; hardware backends run
/// their own owner task and block the caller only up to their deadline.
pub trait Signer: Send + Sync + fmt::Debug {
    /// The public half, as SubjectPublicKeyInfo and as the raw EC point.
    fn public_key(&self) -> &PublicKey;

    /// ECDSA P-256 with SHA-256 over `message`; the signature is DER `ECDSA-Sig-Value`
    /// (RFC 3279 §2.2.3), as X.509 and PKCS#10 carry it.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error>;

    /// Where the key lives, for operators (`issuer status`); never key material.
    fn location(&self) -> String;
}

/// Creates a new key at `key_ref` and returns its signer. Fails if a key already exists there,
/// so `init` can never overwrite a CA key.
pub fn create(key_ref: &KeyRef) -> Result<Arc<dyn Signer>, Error> {
    match key_ref {
        KeyRef::Soft { path } => Ok(Arc::new(SoftKey::create(path)?)),
        other => Err(Error::BackendUnavailable(other.backend())),
    }
}

/// Opens the existing key at `key_ref`.
pub fn open(key_ref: &KeyRef) -> Result<Arc<dyn Signer>, Error> {
    match key_ref {
        KeyRef::Soft { path } => Ok(Arc::new(SoftKey::open(path)?)),
        other => Err(Error::BackendUnavailable(other.backend())),
    }
}
