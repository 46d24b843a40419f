//! The CA's key as rcgen signs with it: an `hsm::Signer` behind rcgen's `SigningKey`, and
//! the signer's own error recovered from rcgen's.

use std::sync::Arc;

use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};

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
            LAST_KEY_ERROR.set(Some(e));
            rcgen::Error::RemoteKeyError
        })
    }
}

thread_local! {
    /// Why the CA key last failed on this thread. rcgen reduces a signer's error to
    /// `RemoteKeyError`; rcgen signs on the caller's thread, so the cause is taken back here
    /// right after (a full TPM queue must stay "busy, retry in a second", not "failed").
    static LAST_KEY_ERROR: std::cell::Cell<Option<hsm::Error>> = const { std::cell::Cell::new(None) };
}

/// A signing failure of the CA key (a TPM that is down, a full queue, an HSM session lost)
/// is a key fault the client may retry (503), not a malformed certificate.
pub(crate) fn key_fault(error: rcgen::Error, key: &HsmKey) -> Error {
    match error {
        rcgen::Error::RemoteKeyError => Error::Key(LAST_KEY_ERROR.take().unwrap_or_else(|| {
            hsm::Error::Sign(format!("the CA key ({}) did not sign", key.0.location()))
        })),
        other => other.into(),
    }
}
