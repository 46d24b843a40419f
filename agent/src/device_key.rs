//! A key held by a backend (TPM, PKCS#11 token, or software) as TLS and certificate requests
//! need it: the private key never leaves [`hsm::Signer`], and rustls and rcgen get adapters
//! that sign through it. Enrollment renewal (a device certificate's key) and the daemon (a
//! TPM-held node key) both present such keys.

use std::fmt;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

/// The only scheme a Plant PKI key signs with: every backend holds P-256 keys and signs
/// SHA-256 digests (RFC 8446 §4.2.3 `ecdsa_secp256r1_sha256`).
const SCHEME: SignatureScheme = SignatureScheme::ECDSA_NISTP256_SHA256;

/// A device key as rustls sees it: ECDSA P-256 signatures made by the key's own backend.
#[derive(Debug)]
pub(crate) struct DeviceSigningKey(Arc<dyn hsm::Signer>);

impl rustls::sign::SigningKey for DeviceSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered.contains(&SCHEME).then(|| {
            Box::new(DeviceSignature(Arc::clone(&self.0))) as Box<dyn rustls::sign::Signer>
        })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

/// One handshake signature. `hsm::Signer::sign` hashes with SHA-256 and returns the DER
/// `ECDSA-Sig-Value` TLS carries (RFC 8446 §4.4.3), so the message goes in unhashed.
#[derive(Debug)]
struct DeviceSignature(Arc<dyn hsm::Signer>);

impl rustls::sign::Signer for DeviceSignature {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        // Blocks this runtime thread up to the backend's deadline (a TPM signs in ~50 ms).
        self.0
            .sign(message)
            .map_err(|e| rustls::Error::General(format!("signing with {}: {e}", self.0.location())))
    }

    fn scheme(&self) -> SignatureScheme {
        SCHEME
    }
}

/// Always presents one certificate chain, its key reached through [`hsm::Signer`].
pub(crate) struct Presented(Arc<CertifiedKey>);

impl Presented {
    /// Presents `certified`.
    pub(crate) fn new(certified: CertifiedKey) -> Self {
        Self(Arc::new(certified))
    }
}

impl fmt::Debug for Presented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presented")
            .field("chain", &self.0.cert.len())
            .finish_non_exhaustive()
    }
}

impl ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        sigschemes.contains(&SCHEME).then(|| Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate chain (DER, leaf first) with its key in `key`, as rustls presents it.
pub(crate) fn certified(chain: &[Vec<u8>], key: Arc<dyn hsm::Signer>) -> CertifiedKey {
    CertifiedKey::new(
        chain.iter().cloned().map(CertificateDer::from).collect(),
        Arc::new(DeviceSigningKey(key)),
    )
}

/// Lets rcgen sign a request with any [`hsm::Signer`] (always P-256 with SHA-256).
pub(crate) struct CsrSigner<'a>(pub(crate) &'a dyn hsm::Signer);

impl rcgen::PublicKeyData for CsrSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        // rcgen wants the SPKI's BIT STRING content: the uncompressed point.
        self.0.public_key().point()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for CsrSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg).map_err(|e| {
            tracing::warn!(error = %e, "signing the certificate request failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::sign::SigningKey;

    #[test]
    fn only_ecdsa_p256_sha256_is_offered_to_the_handshake() {
        let key: Arc<dyn hsm::Signer> = Arc::new(hsm::SoftKey::generate().expect("key"));
        let signing = DeviceSigningKey(Arc::clone(&key));
        assert!(signing
            .choose_scheme(&[SignatureScheme::RSA_PSS_SHA256, SignatureScheme::ED25519])
            .is_none());
        let signer = signing
            .choose_scheme(&[SignatureScheme::ED25519, SCHEME])
            .expect("P-256 offered");
        assert_eq!(signer.scheme(), SCHEME);
        let signature = signer.sign(b"handshake transcript").expect("signature");
        // DER ECDSA-Sig-Value: a SEQUENCE of two INTEGERs.
        assert_eq!(signature[0], 0x30, "{signature:02x?}");
    }
}
