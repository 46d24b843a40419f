//! The agent API client (`plant.agent.v1.Agent`): gRPC over rustls to the issuer.
//!
//! The issuer's certificate is verified against the configured trust bundle, and must carry
//! the issuer's SPIFFE ID (`est::tls::issuer_verifier`): a device certificate with the
//! issuer's name is not the issuer. Attestation runs
//! over plain server-authenticated TLS; every other call presents the node SVID as the TLS
//! client certificate (mTLS), with its key held in memory.
//!
//! TLS is done here, in the connector, rather than by tonic's TLS features: the channel is
//! given an `http://` URI so tonic never tries to add TLS of its own, whatever features
//! another crate in the build turns on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proto::agent::agent_client::AgentClient;
use proto::agent::{
    attest_request, attest_response, AttestRequest, MintJwtSvidRequest, MintJwtSvidResponse,
    MintX509SvidsRequest, NodeSvid, ProxyEvent, RenewNodeSvidRequest, ReportProxyEventsRequest,
    SyncEntriesRequest, SyncEntriesResponse, X509Svid, X509SvidRequest,
};
use proto::SpiffeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::daemon::metrics::METRICS;
use crate::daemon::node::NodeAttestation;
use crate::daemon::svid::{certificate_validity, KeyPair, NodeKey};
use crate::Error;

/// How long a connection attempt to the issuer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take (a TPM challenge answer included).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's own identity: its node SVID and the key it certifies.
pub struct NodeIdentity {
    /// `spiffe://<td>/agent/<method>/<id>`.
    pub spiffe_id: SpiffeId,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The trust bundle the issuer sent with it (DER roots).
    pub bundle: Vec<Vec<u8>>,
    /// The node SVID's key.
    pub key: NodeKey,
    /// The leaf's validity.
    pub not_before: SystemTime,
    /// The leaf's validity.
    pub not_after: SystemTime,
    /// When the agent got it from the issuer (its notBefore when loaded from disk).
    pub received_at: SystemTime,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// The identity from the issuer's `NodeSvid` and the key its CSR was made with.
    pub fn from_node_svid(svid: NodeSvid, key: impl Into<NodeKey>) -> Result<Self, Error> {
        let key = key.into();
        let spiffe_id = SpiffeId::new(&svid.spiffe_id)
            .map_err(|e| Error::certificate("node SVID from the issuer", e))?;
        let leaf = svid
            .chain
            .first()
            .ok_or_else(|| Error::certificate("node SVID from the issuer", "empty chain"))?;
        let (not_before, not_after) = certificate_validity("node SVID", leaf)?;
        crate::daemon::svid::ensure_certifies_spki("node SVID", leaf, &key.spki_der())?;
        Ok(Self {
            spiffe_id,
            chain: svid.chain,
            bundle: svid.bundle,
            key,
            not_before,
            not_after,
            received_at: SystemTime::now(),
        })
    }
}

/// Where the issuer is and how to check it's the real one.
#[derive(Clone)]
pub struct IssuerEndpoint {
    /// `http://host:port`: TLS is added by the connector.
    uri: http::Uri,
    host_port: String,
    server_name: ServerName<'static>,
    roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for IssuerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerEndpoint")
            .field("server", &self.host_port)
            .finish_non_exhaustive()
    }
}

impl IssuerEndpoint {
    /// The issuer at `server` (`https://host:port`), trusted through `anchors` (DER).
    pub fn new(server: &str, anchors: &[Vec<u8>]) -> Result<Self, Error> {
        let bad = |reason: String| Error::Usage(format!("server {server:?}: {reason}"));
        let rest = server
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://".into()))?;
        let host_port = rest.trim_end_matches('/').to_owned();
        let parsed: http::Uri = format!("http://{host_port}")
            .parse()
            .map_err(|e| bad(format!("{e}")))?;
        let host = parsed
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if parsed.port_u16().is_none() {
            return Err(bad("give the port, e.g. https://issuer:8444".into()));
        }
        let server_name =
            ServerName::try_from(host).map_err(|e| bad(format!("not a host name: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for der in anchors {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| Error::certificate("trust bundle", e))?;
        }
        if roots.is_empty() {
            return Err(Error::Usage(
                "the trust bundle holds no CA certificate".into(),
            ));
        }
        Ok(Self {
            uri: parsed,
            host_port,
            server_name,
            roots: Arc::new(roots),
        })
    }

    /// A client over TLS, presenting `identity` when given. The connection is made on first
    /// use and remade after failures, so a channel outlives an issuer restart.
    pub fn client(&self, identity: Option<&NodeIdentity>) -> Result<IssuerClient, Error> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::certificate("TLS setup", e))?
        .dangerous()
        .with_custom_certificate_verifier(
            est::tls::issuer_verifier(Arc::clone(&self.roots))
                .map_err(|e| Error::certificate("trust bundle", e))?,
        );
        let mut tls = match identity.map(|i| (i, &i.key)) {
            Some((identity, NodeKey::Software(key))) => builder
                .with_client_auth_cert(
                    identity
                        .chain
                        .iter()
                        .cloned()
                        .map(CertificateDer::from)
                        .collect(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec())),
                )
                .map_err(|e| Error::certificate("node SVID", e))?,
            Some((identity, NodeKey::Held { signer, .. })) => {
                builder.with_client_cert_resolver(Arc::new(crate::device_key::Presented::new(
                    crate::device_key::certified(&identity.chain, Arc::clone(signer)),
                )))
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let server_name = self.server_name.clone();
        let host_port = self.host_port.clone();
        let connect = tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let host_port = host_port.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&host_port).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = Endpoint::from(self.uri.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(connect);
        Ok(IssuerClient {
            inner: AgentClient::new(channel),
        })
    }
}

/// The agent API, over one channel.
#[derive(Debug, Clone)]
pub struct IssuerClient {
    inner: AgentClient<Channel>,
}

impl IssuerClient {
    /// Node attestation: sends the evidence for a new node key, answers challenges, and
    /// returns the node identity.
    pub async fn attest(
        &self,
        attestation: &Arc<Mutex<Box<dyn NodeAttestation>>>,
    ) -> Result<NodeIdentity, Error> {
        let step = "attesting the node with the issuer";
        // A method may hold the key in hardware (a TPM node): made on a blocking thread.
        let key = blocking(attestation, |a| a.node_key()).await?;
        let csr = Arc::new(key.csr()?);
        let evidence = blocking(attestation, {
            let csr = Arc::clone(&csr);
            move |a| a.evidence(&csr)
        })
        .await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let request = AttestRequest {
            step: Some(attest_request::Step::Evidence(evidence)),
        };
        sender
            .send(request)
            .await
            .map_err(|_| Error::Attestation("the attestation stream closed".into()))?;
        let mut client = self.inner.clone();
        let mut responses = client
            .attest(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(counted(Error::issuer(step)))?
            .into_inner();
        loop {
            let response = responses
                .next()
                .await
                .ok_or_else(|| Error::Issuer {
                    step: step.into(),
                    code: tonic::Code::Unavailable,
                    message: "the issuer ended attestation without an answer".into(),
                })?
                .map_err(counted(Error::issuer(step)))?;
            match response.step {
                Some(attest_response::Step::NodeSvid(svid)) => {
                    return NodeIdentity::from_node_svid(svid, key);
                }
                Some(attest_response::Step::Challenge(challenge)) => {
                    let csr = Arc::clone(&csr);
                    let answer = blocking(attestation, move |a| a.answer(&challenge, &csr)).await?;
                    sender
                        .send(AttestRequest {
                            step: Some(attest_request::Step::ChallengeResponse(answer)),
                        })
                        .await
                        .map_err(|_| Error::Issuer {
                            step: step.into(),
                            code: tonic::Code::Unavailable,
                            message: "the issuer closed the attestation stream".into(),
                        })?;
                }
                None => {
                    return Err(Error::Attestation(
                        "the issuer sent an empty attestation step".into(),
                    ))
                }
            }
        }
    }

    /// A new node SVID for a new key (mTLS with the current one).
    pub async fn renew(&self) -> Result<NodeIdentity, Error> {
        let key = KeyPair::generate()?;
        let csr = key.csr(None)?;
        let svid = self
            .inner
            .clone()
            .renew_node_svid(RenewNodeSvidRequest { csr })
            .await
            .map_err(counted(Error::issuer("renewing the node SVID")))?
            .into_inner();
        NodeIdentity::from_node_svid(svid, key)
    }

    /// The node's entries and the trust domain's bundles.
    pub async fn sync(&self) -> Result<SyncEntriesResponse, Error> {
        Ok(self
            .inner
            .clone()
            .sync_entries(SyncEntriesRequest {})
            .await
            .map_err(counted(Error::issuer("syncing registration entries")))?
            .into_inner())
    }

    /// X509-SVIDs for `(entry id, CSR)` pairs.
    pub async fn mint_x509(
        &self,
        requests: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<X509Svid>, Error> {
        let requests = requests
            .into_iter()
            .map(|(entry_id, csr)| X509SvidRequest { entry_id, csr })
            .collect();
        Ok(self
            .inner
            .clone()
            .mint_x509_svids(MintX509SvidsRequest { requests })
            .await
            .map_err(counted(Error::issuer("minting X509-SVIDs")))?
            .into_inner()
            .svids)
    }

    /// A JWT-SVID for `entry_id` and `audience`.
    pub async fn mint_jwt(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<MintJwtSvidResponse, tonic::Status> {
        Ok(self
            .inner
            .clone()
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: entry_id.to_owned(),
                audience: audience.to_vec(),
            })
            .await
            .inspect_err(|_| METRICS.issuer_error())?
            .into_inner())
    }

    /// Hands refused-request events of the node's PLC proxy to the issuer's audit log;
    /// `Ok` once they are on its disk.
    pub async fn report_proxy_events(&self, events: Vec<ProxyEvent>) -> Result<(), Error> {
        self.inner
            .clone()
            .report_proxy_events(ReportProxyEventsRequest { events })
            .await
            .map_err(counted(Error::issuer("reporting proxy audit events")))?;
        Ok(())
    }
}

/// Counts a failed issuer call, then maps its status.
fn counted(map: impl FnOnce(tonic::Status) -> Error) -> impl FnOnce(tonic::Status) -> Error {
    move |status| {
        METRICS.issuer_error();
        map(status)
    }
}

/// Runs an attestation step on a blocking thread (a TPM command can take tens of ms).
async fn blocking<T: Send + 'static>(
    attestation: &Arc<Mutex<Box<dyn NodeAttestation>>>,
    step: impl FnOnce(&mut dyn NodeAttestation) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let attestation = Arc::clone(attestation);
    tokio::task::spawn_blocking(move || {
        let mut guard = attestation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        step(guard.as_mut())
    })
    .await
    .map_err(|e| Error::Attestation(format!("the attestation task failed: {e}")))?
}
