//! TLS peer verification that more than one crate needs: the issuer's pinned identity (the
//! issuer mints it, agents and EST clients require it: [`issuer_verifier`]), the longest
//! certificate chain a peer may present, and the handshake-signature half of a rustls
//! verifier, written once ([`delegate_handshake_signatures!`]).
//!
//! Here because `est` is the lowest crate that speaks TLS and both binaries use it: the
//! issuer's listeners, the agent's issuer client and its PLC proxies all verify peers.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
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

/// The path of the SPIFFE ID the issuer's own TLS certificate carries as a URI SAN,
/// `spiffe://<trust domain>/issuer`. No token or registration entry can grant it, so among
/// the certificates chaining to the plant root only the issuer's has it.
pub const ISSUER_ID_PATH: &str = "/issuer";

/// Whether `uri` is an issuer's SPIFFE ID (`spiffe://<trust domain>/issuer`).
pub fn is_issuer_id(uri: &str) -> bool {
    uri.strip_prefix("spiffe://")
        .and_then(|rest| rest.find('/').map(|slash| rest.split_at(slash)))
        .is_some_and(|(domain, path)| !domain.is_empty() && path == ISSUER_ID_PATH)
}

/// Whether the certificate `der` carries an issuer's SPIFFE ID as a URI SAN.
pub fn carries_issuer_id(der: &[u8]) -> bool {
    use der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let Ok(certificate) = x509_cert::Certificate::from_der(der) else {
        return false;
    };
    certificate
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)
        .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
        .flat_map(|san| san.0)
        .any(|name| {
            matches!(name, GeneralName::UniformResourceIdentifier(uri) if is_issuer_id(uri.as_str()))
        })
}

/// What a client tells its user when a plant certificate other than the issuer's answers.
pub const NOT_THE_ISSUER: &str = "it does not carry the issuer's identity \
     (URI SAN spiffe://<trust domain>/issuer), so another device or server of the plant is \
     answering at this address: check the server address. (An issuer set up before its \
     identity was pinned renews its TLS certificate with it when `issuer serve` restarts.)";

/// The verifier's refusal of a plant certificate that is not the issuer's.
pub(crate) struct NotTheIssuer;

// rustls shows a custom certificate error by its Debug form: make that the sentence.
impl std::fmt::Debug for NotTheIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server's certificate is not the issuer's: {NOT_THE_ISSUER}"
        )
    }
}

impl std::fmt::Display for NotTheIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for NotTheIssuer {}

/// The server verifier for talking to the issuer (EST and the agent API): the chain must
/// verify against `roots` for the server name, as usual, and the leaf must carry the
/// issuer's SPIFFE ID. Without the second check any certificate of the plant that has the
/// issuer's name or address (a device that was granted it) could pose as the issuer.
pub fn issuer_verifier(
    roots: Arc<rustls::RootCertStore>,
) -> Result<Arc<dyn ServerCertVerifier>, rustls::client::VerifierBuilderError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
    Ok(Arc::new(IssuerVerifier(inner)))
}

#[derive(Debug)]
struct IssuerVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for IssuerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.0.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if !carries_issuer_id(end_entity) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotTheIssuer))),
            ));
        }
        Ok(verified)
    }

    crate::delegate_handshake_signatures!(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_id_is_the_issuer_path_of_any_trust_domain() {
        assert!(is_issuer_id("spiffe://plant.example/issuer"));
        assert!(!is_issuer_id("spiffe://plant.example/issuer/x"));
        assert!(!is_issuer_id("spiffe://plant.example/agent/issuer"));
        assert!(!is_issuer_id("spiffe:///issuer"));
        assert!(!is_issuer_id("https://plant.example/issuer"));
    }

    #[test]
    fn overlong_chains_are_refused_before_path_building() {
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        let intermediates = vec![cert; MAX_CHAIN];
        assert!(check_chain_length(&intermediates[..MAX_CHAIN - 1]).is_ok());
        let refused = check_chain_length(&intermediates).expect_err("one too many");
        assert!(refused.to_string().contains("at most 8"), "{refused}");
    }
}
