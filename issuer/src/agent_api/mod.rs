//! The agent API (`plant.agent.v1`, gRPC over TLS; DESIGN §5): agents attest here, then sync
//! their entries and mint SVIDs with their node SVID as TLS client certificate.
//!
//! A listener of its own, with the EST server certificate. Client certificates are optional
//! at the handshake (an agent attests before it has one) but, when sent, must chain to the
//! plant root; who the caller is, and whether its node SVID is still the current one, is
//! decided per call against the node table and the inventory ([`peer`]).

mod jwt;
mod peer;
mod proxy_events;
mod service;

pub use jwt::JwtKey;
pub(crate) use service::to_status;
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
        attestors.push(Box::new(crate::attestation::tpm::TpmAttestor::from_config(
            tpm, config,
        )?));
    }
    Ok(attestors)
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
                if !self.peer.slot.is_busy() {
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
}

impl Listener {
    /// Binds `config.agent_api.listen` with the EST server certificate.
    pub async fn bind(config: &Config, authority: &Authority) -> Result<Self, Error> {
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
                authority.metrics.connections_shed("agent_api"),
            ),
            handshake_timeout: config.agent_api.handshake_timeout,
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
        let tcp = self.tcp;
        // At the limit the connection waiting longest (in its handshake, or with no RPC in
        // progress) is shed (see `connections`; an agent whose idle connection was shed
        // reconnects on its next call). A connection with an RPC or stream open never is.
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
                let slot = connections.admit().await;
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
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
                    slot.set_phase(Phase::Idle);
                    let chain = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                        .unwrap_or_default();
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
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .add_service(RequestTracking(
                proto::agent::agent_server::AgentServer::new(service),
            ))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| Error::Tls(format!("agent API: {e}")));
        accepting.abort();
        result
    }
}

/// Marks each RPC in progress on its connection's slot, from the request until the response
/// body (a stream, for `Attest` and sync) ends, so only connections without one are shed.
#[derive(Debug, Clone)]
struct RequestTracking<S>(S);

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
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let in_flight = request
            .extensions()
            .get::<Peer>()
            .map(|peer| peer.slot.begin_request());
        let response = self.0.call(request);
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
