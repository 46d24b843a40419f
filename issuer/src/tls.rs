//! The EST listener's TLS configuration (rustls, aws-lc-rs), and the listener's own
//! certificate: it carries the issuer's SPIFFE ID (`spiffe://<trust domain>/issuer`), which
//! agents and EST clients require of the issuer (`est::tls::issuer_verifier`) and which
//! no token or entry can grant; its DNS names and addresses are refused to tokens and
//! entries too, for clients that only check names.
//!
//! Client certificates are requested but not judged at the handshake: an expired, revoked or
//! foreign certificate must get a clear 403 from `simplereenroll`, not a bare handshake
//! failure, and enrollment with a token needs no certificate at all. The handshake still
//! proves possession of the certificate's key (CertificateVerify is checked); whether the
//! certificate is ours is decided against the inventory, byte for byte.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::DistinguishedName;

use est::tls::HandshakeSignatures;

use crate::authority::Authority;
use crate::grant::Grant;
use crate::grant::ListenerNames;
use crate::serial::Serial;
use crate::Error;

/// Who owns the listener's certificate in the inventory.
const LISTENER_OWNER: &str = "issuer:est-listener";

/// Issues the listener's certificate for `public_key` (an uncompressed P-256 point) with
/// `names` and the issuer's SPIFFE ID, signed by the issuing key itself (no short-lived key
/// exists before `serve`, and the listener's chain must not depend on one).
pub async fn issue_listener_certificate(
    authority: &Authority,
    public_key: &[u8],
    names: &ListenerNames,
    renews: Option<Serial>,
) -> Result<Vec<u8>, Error> {
    let spiffe_id = authority
        .trust_domain_id()?
        .id(est::tls::ISSUER_ID_PATH)
        .map_err(|e| Error::Config(format!("the issuer's SPIFFE ID: {e}")))?;
    let grant = Grant {
        label: crate::profile::ISSUER_SERVER.into(),
        common_name: names
            .dns
            .first()
            .cloned()
            .unwrap_or_else(|| "issuer".into()),
        dns: names.dns.clone(),
        ips: names.ips.clone(),
        spiffe_id: Some(spiffe_id),
        lifetime: None,
        owner: LISTENER_OWNER.into(),
        renews,
        token: None,
    };
    authority
        .issue_signed_by(&grant, public_key, Some(crate::ca::SignWith::IssuingKey))
        .await
}

/// Renews the listener's certificate (same key, same names) when it lacks the issuer's
/// SPIFFE ID (made before clients pinned it) or has less than a third of its lifetime
/// left; the chain file is replaced atomically. A failure is logged, not fatal: the issuer
/// still serves with the certificate it has.
pub async fn renew_listener_certificate_if_due(
    authority: &Authority,
    chain_pem: &Path,
    key_path: &Path,
) {
    if let Err(e) = renew_listener_certificate(authority, chain_pem, key_path).await {
        tracing::error!(error = %e, certificate = %chain_pem.display(), "could not renew the issuer's TLS certificate");
    }
}

async fn renew_listener_certificate(
    authority: &Authority,
    chain_pem: &Path,
    key_path: &Path,
) -> Result<(), Error> {
    use der::Decode;
    let chain = crate::ca::read_pem_chain(chain_pem)?;
    let Some(leaf) = chain.first() else {
        return Ok(());
    };
    let certificate = x509_cert::Certificate::from_der(leaf)
        .map_err(|e| Error::Certificate(format!("{}: {e}", chain_pem.display())))?;
    let not_after = certificate
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs() as i64;
    let left = not_after - authority.now().unix_timestamp();
    let pinned = est::tls::carries_issuer_id(leaf);
    let third = (crate::profile::ISSUER_SERVER_LIFETIME.as_secs() / 3) as i64;
    if pinned && left > third {
        return Ok(());
    }
    let key = hsm::SoftKey::open(key_path)?;
    let renews =
        Serial::from_bytes(certificate.tbs_certificate.serial_number.as_bytes()).filter(|serial| {
            authority
                .store
                .certificates
                .get(serial)
                .ok()
                .flatten()
                .is_some()
        });
    let der = issue_listener_certificate(
        authority,
        hsm::Signer::public_key(&key).point(),
        &ListenerNames::of_certificate(leaf),
        renews,
    )
    .await?;
    let mut text = String::new();
    for der in std::iter::once(&der).chain(&chain[1..]) {
        text.push_str(
            &der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der)
                .map_err(|e| Error::Certificate(format!("encoding the certificate: {e}")))?,
        );
    }
    let staged = chain_pem.with_extension("crt.new");
    std::fs::write(&staged, text).map_err(Error::io(&staged))?;
    std::fs::rename(&staged, chain_pem).map_err(Error::io(chain_pem))?;
    tracing::info!(
        certificate = %chain_pem.display(),
        reason = if pinned { "due for renewal" } else { "it lacked the issuer's SPIFFE ID" },
        "renewed the issuer's TLS certificate"
    );
    Ok(())
}

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
            InventoryJudgedClientCert(HandshakeSignatures::of(&provider)),
        ))))
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("{}: {e}", chain_pem.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Refuses chains longer than [`est::tls::MAX_CHAIN`], then asks `V`.
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
        est::tls::check_chain_length(intermediates)?;
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    est::delegate_handshake_signatures!(0);
}

#[derive(Debug)]
struct InventoryJudgedClientCert(HandshakeSignatures);

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

    est::delegate_handshake_signatures!(0);
}
