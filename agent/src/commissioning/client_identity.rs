//! Renewal's TLS client identity with the private key left where it lives.
//!
//! RFC 7030 §3.3.2 authenticates `simplereenroll` by the current certificate as the TLS
//! client certificate, so the handshake's CertificateVerify must be signed by the device key.
//! A TPM or PKCS#11 key never leaves its device, so instead of handing rustls PKCS#8 bytes
//! (all `est::client::EstClient` takes) the agent gives it a [`rustls::sign::SigningKey`]
//! that signs through [`hsm::Signer`]. A software key takes the same path, so there is one
//! renewal code path whatever holds the key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use est::{body, certs_only, media, Label};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::commissioning::trust::CaTrust;

/// The only scheme a Plant PKI key signs with: every backend holds P-256 keys and signs
/// SHA-256 digests (RFC 8446 §4.2.3 `ecdsa_secp256r1_sha256`).
const SCHEME: SignatureScheme = SignatureScheme::ECDSA_NISTP256_SHA256;

/// A device key as rustls sees it: ECDSA P-256 signatures made by the key's own backend.
#[derive(Debug)]
struct DeviceSigningKey(Arc<dyn hsm::Signer>);

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

/// Always presents the one certificate chain the agent renews with.
struct DeviceCertificate(Arc<CertifiedKey>);

impl fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("chain", &self.0.cert.len())
            .finish_non_exhaustive()
    }
}

impl ResolvesClientCert for DeviceCertificate {
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

/// An EST client for `simplereenroll` that authenticates with a certificate whose key is
/// reached through [`hsm::Signer`].
#[derive(Debug, Clone)]
pub(crate) struct ReenrollClient {
    server: String,
    url: String,
    http: reqwest::Client,
}

impl ReenrollClient {
    /// A client that verifies the server against `trust` and presents `chain` (DER, leaf
    /// first) signed for by `key`.
    pub(crate) fn new(
        trust: &CaTrust,
        label: Option<&Label>,
        chain: &[Vec<u8>],
        key: Arc<dyn hsm::Signer>,
    ) -> Result<Self, est::Error> {
        let server = trust.server();
        if !server.starts_with("https://") {
            return Err(est::Error::Transport(format!(
                "server URL {server:?} must start with https://"
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        for der in trust.anchors() {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| transport(format!("trust anchor not usable: {e}")))?;
        }
        let certified = CertifiedKey::new(
            chain.iter().cloned().map(CertificateDer::from).collect(),
            Arc::new(DeviceSigningKey(key)),
        );
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(transport)?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(DeviceCertificate(Arc::new(certified))));
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(transport)?;
        let base = server.trim_end_matches('/');
        let url = match label {
            Some(label) => format!("{base}/.well-known/est/{label}/simplereenroll"),
            None => format!("{base}/.well-known/est/simplereenroll"),
        };
        Ok(Self {
            server: server.to_owned(),
            url,
            http,
        })
    }

    /// `POST simplereenroll` (RFC 7030 §4.2.2): returns the issued certificate, DER.
    pub(crate) async fn simple_reenroll(&self, csr_der: &[u8]) -> Result<Vec<u8>, est::Error> {
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, media::PKCS10)
            .header("Content-Transfer-Encoding", "base64")
            .body(body::encode(csr_der))
            .send()
            .await
            .map_err(|e| est::client::request_error(&self.server, &e))?;
        let status = response.status();
        if !status.is_success() || status == reqwest::StatusCode::ACCEPTED {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            let message = response.text().await.unwrap_or_default().trim().to_owned();
            return Err(est::Error::Server {
                status: status.as_u16(),
                message,
                retry_after,
            });
        }
        let bytes = response.bytes().await.map_err(transport)?;
        let mut certs = certs_only::decode(&body::decode(&bytes)?)?;
        if certs.len() != 1 {
            return Err(est::Error::CertsOnly(format!(
                "expected exactly one issued certificate, got {}",
                certs.len()
            )));
        }
        Ok(certs.remove(0))
    }
}

fn transport(e: impl fmt::Display) -> est::Error {
    est::Error::Transport(e.to_string())
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
