//! The EST listener's TLS configuration (rustls, aws-lc-rs).
//!
//! Client certificates are requested but not judged at the handshake: an expired, revoked or
//! foreign certificate must get a clear 403 from `simplereenroll`, not a bare handshake
//! failure, and enrollment with a token needs no certificate at all. The handshake still
//! proves possession of the certificate's key (CertificateVerify is checked); whether the
//! certificate is ours is decided against the inventory, byte for byte.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use est::client::HandshakeSignatures;

use crate::Error;

type ServerIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn server_identity(chain_pem: &Path, key_path: &Path) -> Result<ServerIdentity, Error> {
    let chain: Vec<CertificateDer<'static>> = crate::ca::read_pem_chain(chain_pem)?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    // Opening through hsm checks the key file's permissions and format.
    let key = hsm::SoftKey::open(key_path)?;
    let pkcs8 = key.to_pkcs8_der()?;
    Ok((
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec())),
    ))
}

/// The agent API's TLS configuration: the EST server certificate, HTTP/2 only, and client
/// certificates optional but, when sent, verified against the plant root (`root_der`) —
/// whether one is a current node SVID is judged per call against the inventory.
pub fn agent_api_config(
    chain_pem: &Path,
    key_path: &Path,
    root_der: &[u8],
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let (chain, key) = server_identity(chain_pem, key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(root_der.to_vec()))
        .map_err(|e| Error::Tls(format!("the root certificate: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| Error::Tls(e.to_string()))?;
    let verifier = Arc::new(ChainLengthLimit(verifier));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("{}: {e}", chain_pem.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Builds the server configuration from a PEM chain (leaf first) and a PKCS#8 key file.
pub fn server_config(
    chain_pem: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let (chain, key) = server_identity(chain_pem, key_path)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(ChainLengthLimit(Arc::new(
            InventoryJudgedClientCert(provider),
        ))))
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("{}: {e}", chain_pem.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Most certificates a client may present (leaf included). Ours are the leaf, maybe a
/// short-lived signing key's certificate, and the issuing CA; webpki follows at most six
/// intermediates anyway. A longer chain (a hundred certificates, or a cycle of CAs signing
/// each other) is refused before any parsing or path building, with a log line naming it.
const MAX_CLIENT_CHAIN: usize = 8;

/// Refuses overlong client chains, then asks `V`.
#[derive(Debug)]
struct ChainLengthLimit<V>(V);

impl<V: ClientCertVerifier + ?Sized> ClientCertVerifier for ChainLengthLimit<Arc<V>>
where
    Arc<V>: std::fmt::Debug + Send + Sync,
{
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = intermediates.len() + 1;
        if presented > MAX_CLIENT_CHAIN {
            tracing::warn!(
                presented,
                most = MAX_CLIENT_CHAIN,
                "refused a TLS client presenting an overlong certificate chain"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct InventoryJudgedClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for InventoryJudgedClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        HandshakeSignatures(&self.0).tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        HandshakeSignatures(&self.0).tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        HandshakeSignatures(&self.0).schemes()
    }
}
