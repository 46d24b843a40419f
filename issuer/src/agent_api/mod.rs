//! The agent API (`plant.agent.v1`, gRPC over TLS; DESIGN §5): agents attest here, then sync
//! their entries and mint SVIDs with their node SVID as TLS client certificate.
//!
//! A listener of its own, with the EST server certificate. Client certificates are optional
//! at the handshake (an agent attests before it has one) but, when sent, must chain to the
//! plant root; who the caller is, and whether its node SVID is still the current one, is
//! decided per call against the node table and the inventory ([`peer`]).

mod inbound;
mod jwt;
mod peer;
mod proxy_events;
mod service;

pub use jwt::JwtKey;
pub use service::{AgentService, MAX_BATCH};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::attestation::NodeAttestor;
use crate::authority::Authority;
use crate::config::Config;
use crate::connections::{Connections, Phase, Slot};
use crate::Error;

/// How often an established connection is pinged, and how long the answer may take: an
/// agent that vanished without closing its connection frees its slot.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header list (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE); gRPC metadata is small.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// RPCs one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS). An
/// agent multiplexes a handful (sync, minting, proxy events); without a cap one connection
/// opens hundreds of half-sent streams, each holding a message buffer.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Flow-control windows: what a client may send before the issuer has read it, per stream
/// and per connection, so a handler that is not reading does not make the issuer buffer.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;
/// Largest `Attest` message, and the largest message of any RPC on a connection whose
/// client is not authenticated (those RPCs are refused anyway). The largest real evidence:
/// a CSR (at most 16 KiB accepted, a P-256 one is ~0.3 KiB), a TPM EK certificate (1–2 KiB
/// for RSA-2048 and ECC EKs, under 8 KiB with long manufacturer extensions) with the EK and
/// AK TPM2B_PUBLICs (under 1 KiB each), or an x509pop chain (a few certificates of 1–2
/// KiB). 64 KiB leaves ample room; tonic refuses a larger length prefix before it buffers
/// a byte of the message.
pub const MAX_ATTEST_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest message of the other RPCs for an authenticated node: a MintX509Svids batch of
/// 1000 CSRs is about 0.5 MiB (tonic's default, stated).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The attestors this issuer runs, from its configuration.
pub fn attestors(
    config: &Config,
    authority: &Authority,
) -> Result<Vec<Box<dyn NodeAttestor>>, Error> {
    let clock = authority.clock.clone();
    let mut attestors: Vec<Box<dyn NodeAttestor>> = vec![
        Box::new(crate::attestation::join_token::JoinTokenAttestor::new(
            authority.store.tokens.clone(),
            clock.clone(),
        )),
        Box::new(crate::attestation::x509pop::X509PopAttestor::new(
            authority.store.certificates.clone(),
            clock,
            config.x509pop_labels(),
        )),
    ];
    if let Some(tpm) = &config.attestation.tpm {
        attestors.push(tpm_attestor(tpm, config)?);
    }
    Ok(attestors)
}

/// The attestor for `[attestation.tpm]`.
#[cfg(feature = "tpm")]
fn tpm_attestor(
    tpm: &crate::config::TpmAttestationConfig,
    config: &Config,
) -> Result<Box<dyn NodeAttestor>, Error> {
    Ok(Box::new(crate::attestation::tpm::TpmAttestor::from_config(
        tpm, config,
    )?))
}

/// Checking TPM evidence parses TPM structures with tss-esapi: a build without it refuses
/// `[attestation.tpm]` at start-up rather than quietly leaving the method off.
#[cfg(not(feature = "tpm"))]
fn tpm_attestor(
    _: &crate::config::TpmAttestationConfig,
    _: &Config,
) -> Result<Box<dyn NodeAttestor>, Error> {
    Err(Error::Config(format!(
        "[attestation.tpm]: {}",
        hsm::Error::NO_TPM
    )))
}

/// The peer's certificate chain (leaf first), as the TLS handshake saw it; empty without a
/// client certificate.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Arc<Vec<CertificateDer<'static>>>);

/// Who is at the other end of a connection, as the transport saw it; in every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TLS client certificate chain.
    pub certificates: PeerCertificates,
    /// The TCP peer address.
    pub address: SocketAddr,
    /// The connection's slot of the connection limit, to mark requests in progress.
    slot: Arc<Slot>,
}

impl Peer {
    /// Whether the client presented a certificate this CA issued (its node SVID): only
    /// then are RPCs other than `Attest` decoded with the large limit, and its RPCs never
    /// shed while in progress.
    fn authenticated(&self) -> bool {
        self.slot.is_authenticated()
    }
}

/// One accepted TLS connection, holding its slot of the connection limit. When a newer
/// connection sheds it while no request is in progress, reading fails and the HTTP/2
/// connection ends.
struct Connection {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
    shed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Connection {
    fn new(tls: tokio_rustls::server::TlsStream<TcpStream>, peer: Peer) -> Self {
        let slot = peer.slot.clone();
        Self {
            tls,
            peer,
            shed: Some(Box::pin(async move { slot.shed().await })),
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(shed) = self.shed.as_mut() {
            if shed.as_mut().poll(cx).is_ready() {
                self.shed = None;
                // An unauthenticated client's RPCs (an `Attest` stream that sends nothing,
                // say) do not keep the connection.
                if !self.peer.slot.is_busy() || !self.peer.authenticated() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "shed at the connection limit",
                    )));
                }
            }
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// A bound agent API listener, ready to serve.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    connections: Connections,
    handshake_timeout: Duration,
    authority: Arc<Authority>,
}

impl Listener {
    /// Binds `config.agent_api.listen` with the EST server certificate.
    pub async fn bind(config: &Config, authority: &Arc<Authority>) -> Result<Self, Error> {
        let tls = crate::tls::agent_api_config(
            &config.resolve(&config.est.tls_certificate),
            &config.resolve(&config.est.tls_key),
            authority.ca.root_der(),
        )?;
        let listen = config.agent_api.listen;
        let tcp = TcpListener::bind(listen).await.map_err(|e| {
            Error::Config(format!("cannot listen on {listen} for the agent API: {e}"))
        })?;
        Ok(Self {
            tcp,
            tls,
            connections: Connections::new(
                "agent_api",
                config.agent_api.max_connections,
                config.agent_api.max_connections_per_source,
                authority.metrics.connections_shed("agent_api"),
            ),
            handshake_timeout: config.agent_api.handshake_timeout,
            authority: authority.clone(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.tcp
            .local_addr()
            .map_err(Error::io("agent API listener"))
    }

    /// Serves `service` until `shutdown` completes.
    pub async fn serve(
        self,
        service: AgentService,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let (sender, receiver) = mpsc::channel::<Result<Connection, std::io::Error>>(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls);
        let (connections, handshake_timeout) = (self.connections, self.handshake_timeout);
        let (tcp, authority) = (self.tcp, self.authority);
        // At the limit the connection waiting longest (in its handshake, or with no RPC in
        // progress) is shed (see `connections`; an agent whose idle connection was shed
        // reconnects on its next call). A connection with an RPC or stream open is only if
        // its client is not authenticated by a certificate this CA issued.
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, address) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "agent API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = connections.admit(address.ip()).await else {
                    // The source holds its maximum, all serving authenticated RPCs.
                    continue;
                };
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                let authority = authority.clone();
                // Handshakes run apart from the accept loop so a slow client holds only its
                // own slot, for at most the handshake timeout or until it is shed.
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    let tls = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %address, error = %e, "agent API TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(peer = %address, "agent API TLS handshake timed out");
                                return;
                            }
                        },
                        () = slot.shed() => {
                            tracing::debug!(peer = %address, "agent API TLS handshake shed at the connection limit");
                            return;
                        }
                    };
                    let chain: Vec<CertificateDer<'static>> = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                        .unwrap_or_default();
                    if chain
                        .first()
                        .is_some_and(|leaf| authority.issued_here(leaf))
                    {
                        slot.set_authenticated();
                    }
                    slot.set_phase(Phase::Idle);
                    let peer = Peer {
                        certificates: PeerCertificates(Arc::new(chain)),
                        address,
                        slot: Arc::new(slot),
                    };
                    let _ = sender.send(Ok(Connection::new(tls, peer))).await;
                });
            }
        });
        let incoming = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let agent = |limit| {
            proto::agent::agent_server::AgentServer::new(service.clone())
                .max_decoding_message_size(limit)
        };
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_adaptive_window(Some(false))
            .add_service(RequestTracking {
                small: agent(MAX_ATTEST_MESSAGE_BYTES),
                large: agent(MAX_MESSAGE_BYTES),
            })
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| Error::Tls(format!("agent API: {e}")));
        accepting.abort();
        result
    }
}

/// Marks each RPC in progress on its connection's slot, from the request until the response
/// body (a stream, for `Attest` and sync) ends, so only connections without one (or whose
/// client is unauthenticated) are shed; and picks the decode limit: `small` for `Attest`
/// and for every RPC of an unauthenticated client, `large` for a node's other RPCs.
#[derive(Debug, Clone)]
struct RequestTracking<S> {
    small: S,
    large: S,
}

/// The path of the `Attest` RPC.
const ATTEST_PATH: &str = "/plant.agent.v1.Agent/Attest";

impl<S: tonic::server::NamedService> tonic::server::NamedService for RequestTracking<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for RequestTracking<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<axum::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        std::task::ready!(self.small.poll_ready(cx))?;
        self.large.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let peer = request.extensions().get::<Peer>();
        let in_flight = peer.map(|peer| peer.slot.begin_request(Phase::Busy));
        let authenticated = peer.is_some_and(Peer::authenticated);
        let response = if authenticated && request.uri().path() != ATTEST_PATH {
            self.large.call(request)
        } else {
            self.small.call(request)
        };
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                use http_body_util::BodyExt;
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _held_until_the_body_ends = &in_flight;
                    frame
                }))
            }))
        })
    }
}
