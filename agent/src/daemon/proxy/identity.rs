//! The TLS side of a proxy: which certificate it presents (the legacy device's SVID from the
//! cache), which peers it accepts (the trust bundle, the allow list, the CRL), rebuilt on
//! every change of the cache and published as a `watch` of `Arc` configs so a rotation
//! reaches new handshakes at once and never touches sessions already open.

use std::collections::HashSet;
use std::sync::Arc;

use der::{Decode, Encode};
use est::tls::HandshakeSignatures;
use proto::{Selector, SpiffeId};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DistinguishedName, RootCertStore};
use x509_cert::crl::CertificateList;
use x509_cert::Certificate;

use super::config::AllowList;
use crate::daemon::cache::Snapshot;
use crate::daemon::svid::{spiffe_id_of, X509Svid};

/// Revoked certificates, by issuer and serial, from the CRLs the issuer hands out with the
/// entries.
///
/// The CRLs come over the agent API's mTLS channel from the issuer that signed them, which
/// is what makes them authentic here; their signatures are not checked again. rustls-webpki's
/// own CRL support is not used: it insists on a CRL whose scope and signer match each chain
/// exactly, which the issuer's CRL across key rollovers does not satisfy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked(HashSet<(Vec<u8>, Vec<u8>)>);

impl Revoked {
    /// The serials on `crls` (DER). A CRL that does not parse is skipped with a warning: the
    /// others still count.
    pub fn from_crls(crls: &[Vec<u8>]) -> Self {
        let mut revoked = HashSet::new();
        for der in crls {
            let crl = match CertificateList::from_der(der) {
                Ok(crl) => crl,
                Err(e) => {
                    tracing::warn!(error = %e, "a CRL from the issuer does not parse; ignoring it");
                    continue;
                }
            };
            let Ok(issuer) = crl.tbs_cert_list.issuer.to_der() else {
                continue;
            };
            for entry in crl.tbs_cert_list.revoked_certificates.iter().flatten() {
                revoked.insert((issuer.clone(), entry.serial_number.as_bytes().to_vec()));
            }
        }
        Self(revoked)
    }

    /// Whether the DER certificate is on a CRL. A certificate that does not parse counts as
    /// revoked: nothing that cannot be read is let in.
    pub fn contains(&self, certificate: &[u8]) -> bool {
        match issuer_and_serial(certificate) {
            Some(key) => self.0.contains(&key),
            None => true,
        }
    }

    /// How many serials.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn issuer_and_serial(certificate: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let certificate = Certificate::from_der(certificate).ok()?;
    let issuer = certificate.tbs_certificate.issuer.to_der().ok()?;
    Some((
        issuer,
        certificate
            .tbs_certificate
            .serial_number
            .as_bytes()
            .to_vec(),
    ))
}

/// The SVID the cache holds for legacy device `device`, if its entry exists, names
/// `spiffe_id` and has a valid SVID. `Err` says what the operator must fix.
pub fn device_svid(
    snapshot: &Snapshot,
    device: &str,
    spiffe_id: &SpiffeId,
) -> Result<Arc<X509Svid>, String> {
    let selector = Selector::legacy_device(device);
    let entry = snapshot
        .entries
        .iter()
        .find(|e| e.selectors.contains(&selector))
        .ok_or_else(|| {
            format!(
                "no registration entry for device {device}: create one with `issuer entry create --spiffe-id {spiffe_id} --parent <this node's SPIFFE ID> --selector {selector}`"
            )
        })?;
    if &entry.spiffe_id != spiffe_id {
        return Err(format!(
            "entry {} for device {device} gives {}, but agent.toml says {spiffe_id}; one of them is wrong",
            entry.id, entry.spiffe_id
        ));
    }
    snapshot
        .svids
        .get(&entry.id)
        .cloned()
        .ok_or_else(|| format!("no valid SVID for device {device} yet (entry {})", entry.id))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(bundle: &[Vec<u8>]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for der in bundle {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the trust bundle is empty".into());
    }
    Ok(Arc::new(roots))
}

fn chain_and_key(svid: &X509Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        svid.chain
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.to_vec())),
    )
}

/// The inbound proxy's TLS: present `svid`, require a client certificate chaining to
/// `bundle`, whose SPIFFE ID is on `allow` and whose serial is not on `revoked`.
pub fn server_config(
    svid: &X509Svid,
    bundle: &[Vec<u8>],
    allow: AllowList,
    revoked: Arc<Revoked>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(bundle)?, Arc::clone(&provider))
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let verifier = PeerVerifier {
        inner,
        allow,
        revoked,
    };
    let (chain, key) = chain_and_key(svid);
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(|e| format!("the device's SVID: {e}"))?;
    Ok(Arc::new(config))
}

/// The outbound proxy's TLS: present `svid`, require the gateway to present `server` chaining
/// to `bundle` and not revoked. Host names play no part: SVIDs name workloads by URI.
pub fn client_config(
    svid: &X509Svid,
    bundle: &[Vec<u8>],
    server: SpiffeId,
    revoked: Arc<Revoked>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let verifier = GatewayVerifier {
        roots: roots(bundle)?,
        signatures: HandshakeSignatures::of(&provider),
        server,
        revoked,
    };
    let (chain, key) = chain_and_key(svid);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the device's SVID: {e}"))?;
    Ok(Arc::new(config))
}

/// webpki's chain check, then the SPIFFE ID against the allow list, then the CRL: all at the
/// handshake, so a refused peer never gets a byte to the PLC.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: AllowList,
    revoked: Arc<Revoked>,
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        est::tls::check_chain_length(intermediates)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = spiffe_id_of("peer certificate", end_entity)
            .map_err(|e| est::tls::refusal(format!("not an SVID: {e}")))?;
        if self.allow.access(&peer).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
            .inspect_err(|_| tracing::debug!(%peer, "peer not on the allow list"));
        }
        if self.revoked.contains(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    est::delegate_handshake_signatures!(inner);
}

/// The chain to the trust bundle, then exactly the expected SPIFFE ID, then the CRL.
#[derive(Debug)]
struct GatewayVerifier {
    roots: Arc<RootCertStore>,
    signatures: HandshakeSignatures,
    server: SpiffeId,
    revoked: Arc<Revoked>,
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        est::tls::check_chain_length(intermediates)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.signatures.algorithms().all,
        )?;
        let id = spiffe_id_of("gateway certificate", end_entity)
            .map_err(|e| est::tls::refusal(format!("not an SVID: {e}")))?;
        if id != self.server {
            return Err(est::tls::refusal(format!(
                "the gateway presented {id}, not {}",
                self.server
            )));
        }
        if self.revoked.contains(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ServerCertVerified::assertion())
    }

    est::delegate_handshake_signatures!(signatures);
}
