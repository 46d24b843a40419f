//! The pieces of TLS peer verification every verifier in the workspace shares: the longest
//! certificate chain a peer may present, and the handshake-signature half of a rustls
//! verifier, written once ([`delegate_handshake_signatures!`]).
//!
//! Here because `est` is the lowest crate that speaks TLS and both binaries use it: the
//! issuer's listeners, the agent's issuer client and its PLC proxies all verify peers.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Most certificates a peer may present (leaf included). Ours are the leaf, maybe a
/// short-lived signing key's certificate, and the issuing CA; webpki follows at most six
/// intermediates anyway. A longer chain (a hundred certificates, or a cycle of CAs signing
/// each other) is refused before any parsing or path building.
pub const MAX_CHAIN: usize = 8;

/// Refuses a chain longer than [`MAX_CHAIN`], with a log line naming it.
pub fn check_chain_length(intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
    let presented = intermediates.len() + 1;
    if presented > MAX_CHAIN {
        tracing::warn!(
            presented,
            most = MAX_CHAIN,
            "refused a TLS peer presenting an overlong certificate chain"
        );
        return Err(refusal(format!(
            "the peer presented {presented} certificates; at most {MAX_CHAIN} are accepted"
        )));
    }
    Ok(())
}

/// A certificate refused for `reason`, as the log and the TLS alert say it.
pub fn refusal(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        Refusal(reason),
    ))))
}

#[derive(Debug)]
struct Refusal(String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// The half of a custom rustls verifier that must never be skipped: checking that the peer
/// signed the handshake with the certificate's key. Verifiers that judge the certificate
/// itself (bootstrap, the issuer's inventory, a SPIFFE ID) delegate this part here.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeSignatures(WebPkiSupportedAlgorithms);

impl HandshakeSignatures {
    /// The algorithms `provider` verifies.
    pub fn of(provider: &CryptoProvider) -> Self {
        Self(provider.signature_verification_algorithms)
    }

    /// The algorithms themselves, for webpki's chain checks.
    pub fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.0
    }

    /// TLS 1.2 CertificateVerify / ServerKeyExchange signature.
    pub fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    /// TLS 1.3 CertificateVerify signature.
    pub fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    /// The signature schemes verified.
    pub fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Inside an `impl ServerCertVerifier` or `impl ClientCertVerifier`: the three
/// handshake-signature methods, delegated to `self.<field>` (a [`HandshakeSignatures`] or an
/// inner rustls verifier). The using crate needs `rustls` as a dependency.
#[macro_export]
macro_rules! delegate_handshake_signatures {
    ($field:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.$field.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.$field.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$field.supported_verify_schemes()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_chains_are_refused_before_path_building() {
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        let intermediates = vec![cert; MAX_CHAIN];
        assert!(check_chain_length(&intermediates[..MAX_CHAIN - 1]).is_ok());
        let refused = check_chain_length(&intermediates).expect_err("one too many");
        assert!(refused.to_string().contains("at most 8"), "{refused}");
    }
}
