//! An EST client for commissioning laptops and agents.
//!
//! Trust starts with RFC 7030 §4.1.1: [`EstClient::bootstrap`] may only fetch `cacerts`
//! without verifying the server; [`pin_root`] then checks the CA fingerprint the engineer got
//! out of band, and every further request goes through [`EstClient::new`], which verifies
//! the server against that root.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::csr_attrs::AttrOrOid;
use crate::multipart::ServerKeygenParts;
use crate::server::Secret;
use crate::tls::HandshakeSignatures;
use crate::{body, certs_only, csr_attrs, media, multipart, Error, Label};

/// How a request authenticates besides a TLS client certificate.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No Authorization header.
    None,
    /// HTTP Basic: a user (token id or device name) and the one-time token.
    Basic {
        /// User name.
        user: String,
        /// The token.
        password: Secret,
    },
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
}

/// A TLS client identity: certificate chain (leaf first) and its PKCS#8 key.
#[derive(Clone)]
pub struct ClientIdentity {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// An EST client bound to one server (and optionally one label).
#[derive(Debug, Clone)]
pub struct EstClient {
    base: String,
    label: Option<Label>,
    http: reqwest::Client,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn transport(e: impl std::fmt::Display) -> Error {
    Error::Transport(e.to_string())
}

/// A request to `server` that got no answer, as the engineer can act on it. The causes seen
/// at a commissioning laptop are a wrong port (plain HTTP or another service, where rustls
/// reports `InvalidContentType`), nothing listening, and a server that closes the connection
/// (hyper reports "operation was canceled"); anything else keeps its whole cause chain,
/// which reqwest's Display hides (e.g. the TLS alert).
pub fn request_error(server: &str, error: &reqwest::Error) -> Error {
    let unreachable = |reason: &str| Error::Unreachable {
        server: server.to_owned(),
        reason: reason.to_owned(),
    };
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_canceled() || e.is_incomplete_message())
        {
            return unreachable(CLOSED);
        }
        // io::Error's `source` skips the error it wraps, and the connector's io::Error wraps
        // tokio-rustls's, which wraps rustls's: look inside each layer.
        let mut layer = Some(cause);
        while let Some(error) = layer {
            match error.downcast_ref::<rustls::Error>() {
                Some(rustls::Error::InvalidMessage(_)) => {
                    return Error::NotTls {
                        server: server.to_owned(),
                    }
                }
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)))
                    if other.0.downcast_ref::<crate::tls::NotTheIssuer>().is_some() =>
                {
                    return Error::NotTheIssuer {
                        server: server.to_owned(),
                        reason: crate::tls::NOT_THE_ISSUER.to_owned(),
                    }
                }
                _ => {}
            }
            let Some(io) = error.downcast_ref::<std::io::Error>() else {
                break;
            };
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return unreachable("connection refused (nothing listens there: check the host and port of --server, and that the issuer runs)")
                }
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted => return unreachable(CLOSED),
                _ => {}
            }
            layer = io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
        source = cause.source();
    }
    Error::Transport(chain)
}

/// A connection the server closed without answering.
const CLOSED: &str = "the server closed the connection without answering (is it the issuer's EST port? the issuer prints its EST URL at start)";

impl EstClient {
    /// A client that does not verify the server: for fetching `cacerts` before trust exists.
    pub fn bootstrap(server: &str) -> Result<Self, Error> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(transport)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(BootstrapVerifier(HandshakeSignatures::of(
                &provider(),
            ))))
            .with_no_client_auth();
        Self::from_config(server, config)
    }

    /// A client that verifies the server against `trust_anchors` (DER), and that it is the
    /// issuer itself ([`crate::tls::issuer_verifier`]), optionally presenting a client certificate.
    pub fn new(
        server: &str,
        trust_anchors: &[Vec<u8>],
        identity: Option<&ClientIdentity>,
    ) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for der in trust_anchors {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| transport(format!("trust anchor not usable: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(transport)?
            .dangerous()
            .with_custom_certificate_verifier(
                crate::tls::issuer_verifier(Arc::new(roots))
                    .map_err(|e| transport(format!("trust anchors not usable: {e}")))?,
            );
        let config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    id.chain
                        .iter()
                        .map(|c| CertificateDer::from(c.clone()))
                        .collect(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.pkcs8_der.clone())),
                )
                .map_err(|e| transport(format!("client certificate not usable: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        Self::from_config(server, config)
    }

    fn from_config(server: &str, config: rustls::ClientConfig) -> Result<Self, Error> {
        if !server.starts_with("https://") {
            return Err(Error::Transport(format!(
                "server URL {server:?} must start with https://"
            )));
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(transport)?;
        Ok(Self {
            base: server.trim_end_matches('/').to_owned(),
            label: None,
            http,
        })
    }

    /// Sends requests under `label` (`/.well-known/est/<label>/…`).
    pub fn with_label(mut self, label: Option<Label>) -> Self {
        self.label = label;
        self
    }

    fn url(&self, operation: &str) -> String {
        match &self.label {
            Some(label) => format!("{}/.well-known/est/{label}/{operation}", self.base),
            None => format!("{}/.well-known/est/{operation}", self.base),
        }
    }

    /// `GET cacerts`: the CA certificates, DER.
    pub async fn cacerts(&self) -> Result<Vec<Vec<u8>>, Error> {
        let response = self.send(self.http.get(self.url("cacerts"))).await?;
        let bytes = response.bytes().await.map_err(transport)?;
        certs_only::decode(&body::decode(&bytes)?)
    }

    /// `GET csrattrs`: what the CA wants in a CSR (empty on 204).
    pub async fn csrattrs(&self) -> Result<Vec<AttrOrOid>, Error> {
        let response = self.send(self.http.get(self.url("csrattrs"))).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        let bytes = response.bytes().await.map_err(transport)?;
        csr_attrs::decode(&body::decode(&bytes)?)
    }

    /// `POST simpleenroll`: returns the issued certificate, DER.
    pub async fn simple_enroll(&self, csr_der: &[u8], auth: &Auth) -> Result<Vec<u8>, Error> {
        self.enroll("simpleenroll", csr_der, auth).await
    }

    /// `POST simplereenroll`, authenticated by this client's TLS certificate.
    pub async fn simple_reenroll(&self, csr_der: &[u8]) -> Result<Vec<u8>, Error> {
        self.enroll("simplereenroll", csr_der, &Auth::None).await
    }

    /// `POST serverkeygen`: the CA generates the key.
    pub async fn server_keygen(
        &self,
        csr_der: &[u8],
        auth: &Auth,
    ) -> Result<(ServerKeygenParts, Vec<u8>), Error> {
        let response = self.send(self.post("serverkeygen", csr_der, auth)).await?;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = response.bytes().await.map_err(transport)?;
        let parts = multipart::decode(&content_type, &bytes)?;
        let cert = single_certificate(&parts.certs_only_der)?;
        Ok((parts, cert))
    }

    async fn enroll(&self, operation: &str, csr_der: &[u8], auth: &Auth) -> Result<Vec<u8>, Error> {
        let response = self.send(self.post(operation, csr_der, auth)).await?;
        let bytes = response.bytes().await.map_err(transport)?;
        single_certificate(&body::decode(&bytes)?)
    }

    fn post(&self, operation: &str, csr_der: &[u8], auth: &Auth) -> reqwest::RequestBuilder {
        let request = self
            .http
            .post(self.url(operation))
            .header(reqwest::header::CONTENT_TYPE, media::PKCS10)
            .header("Content-Transfer-Encoding", "base64")
            .body(body::encode(csr_der));
        match auth {
            Auth::None => request,
            Auth::Basic { user, password } => request.basic_auth(user, Some(&password.0)),
            Auth::Bearer(token) => request.bearer_auth(&token.0),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
        let response = request
            .send()
            .await
            .map_err(|e| request_error(&self.base, &e))?;
        let status = response.status();
        if status.is_success() && status != reqwest::StatusCode::ACCEPTED {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let message = response.text().await.unwrap_or_default().trim().to_owned();
        Err(Error::Server {
            status: status.as_u16(),
            message,
            retry_after,
        })
    }
}

fn single_certificate(certs_only_der: &[u8]) -> Result<Vec<u8>, Error> {
    let mut certs = certs_only::decode(certs_only_der)?;
    if certs.len() != 1 {
        return Err(Error::CertsOnly(format!(
            "expected exactly one issued certificate, got {}",
            certs.len()
        )));
    }
    Ok(certs.remove(0))
}

/// Finds the certificate among `ca_certs` whose SHA-256 fingerprint is `expected` (hex, any
/// case, colons allowed): the root to trust from now on.
pub fn pin_root(server: &str, ca_certs: &[Vec<u8>], expected: &str) -> Result<Vec<u8>, Error> {
    let want = crate::normalize_fingerprint(expected);
    ca_certs
        .iter()
        .find(|der| crate::fingerprint(der) == want)
        .cloned()
        .ok_or_else(|| Error::Fingerprint {
            server: server.to_owned(),
            expected: want,
            found: ca_certs
                .iter()
                .map(|der| crate::fingerprint(der))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Accepts any server certificate but still checks the handshake signatures: only used to
/// fetch `cacerts`, whose content is then pinned by fingerprint.
#[derive(Debug)]
struct BootstrapVerifier(HandshakeSignatures);

impl ServerCertVerifier for BootstrapVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    crate::delegate_handshake_signatures!(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that answers each connection with `answer` and closes it.
    fn listener(answer: &'static [u8]) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                use std::io::{Read, Write};
                let mut hello = [0u8; 512];
                let _ = stream.read(&mut hello);
                let _ = stream.write_all(answer);
            }
        });
        format!("https://127.0.0.1:{port}")
    }

    async fn cacerts_error(server: &str) -> String {
        let client = EstClient::bootstrap(server).expect("client");
        client.cacerts().await.expect_err("no CA there").to_string()
    }

    #[tokio::test]
    async fn a_port_that_is_not_tls_closes_or_is_closed_is_named_as_such() {
        let plain = listener(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            cacerts_error(&plain).await,
            format!("{plain} did not answer TLS (is it the issuer's EST port? the issuer prints its EST URL at start)")
        );
        let closing = listener(b"");
        let message = cacerts_error(&closing).await;
        assert_eq!(message, format!("cannot connect to {closing}: {CLOSED}"));
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            format!(
                "https://127.0.0.1:{}",
                listener.local_addr().expect("addr").port()
            )
        };
        let message = cacerts_error(&closed).await;
        assert!(
            message.starts_with(&format!("cannot connect to {closed}: connection refused")),
            "{message}"
        );
    }
}
