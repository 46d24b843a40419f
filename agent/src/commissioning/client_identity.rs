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
use rustls::pki_types::CertificateDer;

use crate::commissioning::trust::CaTrust;
use crate::device_key;

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
        let certified = device_key::certified(chain, key);
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(transport)?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(device_key::Presented::new(certified)));
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
