//! The inbound proxy: peers connect with mTLS, the agent answers with the PLC's SVID, lets in
//! only allowed and unrevoked SPIFFE IDs, and forwards to the PLC on the cell network.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::SpiffeId;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::config::{Inbound, Protocol};
use super::identity::Revoked;
use super::listener::{self, Admission, NotAdmitted, HANDSHAKE_TIMEOUT};
use super::metrics::ProxyMetrics;
use super::modbus::Frame;
use super::relay::{self, End, Refusal, Traffic};
use super::session::{self, Session};
use super::upstream::Upstream;
use crate::daemon::proxy_audit::{ProxyAudit, RefusedRequest};
use crate::daemon::svid::spiffe_id_of;

/// What the inbound proxy presents and checks, as of the last cache change.
#[derive(Debug, Clone)]
pub struct InboundTls {
    /// The acceptor's configuration: the PLC's SVID, the bundle, the verifier.
    pub config: Arc<rustls::ServerConfig>,
    /// The CRL's serials, also checked against open sessions.
    pub revoked: Arc<Revoked>,
}

/// `Err` says why the proxy cannot accept yet (no entry, no SVID).
pub type Identity = Result<InboundTls, String>;

/// Accepts until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Inbound>,
    identity: watch::Receiver<Identity>,
    audit: ProxyAudit,
    metrics: Arc<ProxyMetrics>,
) {
    let upstream = Arc::new(Upstream::new(proxy.upstream.clone(), proxy.connect_timeout));
    let watched = identity.clone();
    listener::accept(
        listener,
        &proxy.device,
        proxy.limits,
        identity,
        &metrics,
        |stream, from, tls, admission| {
            let context = Context {
                proxy: Arc::clone(&proxy),
                upstream: Arc::clone(&upstream),
                identity: watched.clone(),
                audit: audit.clone(),
                metrics: Arc::clone(&metrics),
            };
            context.session(stream, from, tls, admission)
        },
    )
    .await;
}

struct Context {
    proxy: Arc<Inbound>,
    upstream: Arc<Upstream>,
    identity: watch::Receiver<Identity>,
    audit: ProxyAudit,
    metrics: Arc<ProxyMetrics>,
}

impl Context {
    async fn session(
        self,
        stream: TcpStream,
        from: SocketAddr,
        tls: InboundTls,
        admission: Admission,
    ) {
        let device = &self.proxy.device;
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
        let stream = match admission.handshake(acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let reason = session::handshake_refusal(&e);
                self.metrics.session_refused(reason);
                tracing::warn!(device, %from, reason, "peer refused at the TLS handshake: {e}");
                return;
            }
            Err(NotAdmitted::Timeout) => {
                self.metrics.session_refused("handshake_timeout");
                tracing::warn!(device, %from, "peer refused: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
            Err(NotAdmitted::Shed) => {
                // At debug: a flood of silent connections would otherwise flood the log.
                self.metrics.session_refused("handshake_shed");
                tracing::debug!(device, %from, "connection shed: pending handshakes full and this one the oldest");
                return;
            }
        };
        let Some(peer_certificate) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
        else {
            return;
        };
        // The verifier has checked both already; this cannot fail for a peer it let in.
        let Ok(peer) = spiffe_id_of("peer certificate", &peer_certificate) else {
            return;
        };
        let Some(access) = self.proxy.allow.access(&peer) else {
            return;
        };
        // Only now, with the peer authenticated and allowed, does it take a session slot.
        let _slot = match admission.session_slot() {
            Ok(slot) => slot,
            Err(max_sessions) => {
                self.metrics.session_refused("max_sessions");
                tracing::warn!(device, %from, %peer, max_sessions, "connection closed: the device has its maximum of open sessions");
                return;
            }
        };
        let mut session =
            Session::start(device, "inbound", &peer, Some(access), from, &self.metrics);
        let plc = match self.upstream.connect().await {
            Ok(plc) => plc,
            Err(e) => {
                self.metrics.upstream_failure();
                session.end(
                    &format!("PLC {} unreachable: {e}", self.upstream.address()),
                    &Traffic::default(),
                );
                // Closed at once: the peer learns the PLC is not there instead of waiting
                // for answers that never come.
                let mut stream = stream;
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.shutdown()).await;
                return;
            }
        };
        let traffic = Traffic::default();
        let on_refused = |frame: &Frame, why: Refusal<'_>| self.refused(&peer, frame, why);
        let relayed = async {
            match self.proxy.protocol {
                Protocol::Tcp => relay::bytes(stream, plc, &traffic).await,
                Protocol::Modbus => relay::modbus(stream, plc, access, &traffic, &on_refused).await,
            }
        };
        let end = tokio::select! {
            end = relayed => {
                if matches!(end, End::Malformed { .. }) {
                    self.metrics.malformed();
                }
                end.to_string()
            }
            () = revoked(self.identity.clone(), &peer_certificate) => {
                "the peer's certificate was revoked".to_owned()
            }
            () = relay::idle(&traffic, self.proxy.idle_timeout) => {
                format!("idle: nothing sent either way for {:?} (idle_timeout)", self.proxy.idle_timeout)
            }
        };
        session.end(&end, &traffic);
    }

    fn refused(&self, peer: &SpiffeId, frame: &Frame, why: Refusal<'_>) {
        match why {
            Refusal::Function => {
                self.metrics.modbus_refused();
                tracing::warn!(
                    device = self.proxy.device,
                    %peer,
                    function_code = frame.function,
                    transaction_id = frame.transaction_id,
                    unit_id = frame.unit_id,
                    "Modbus request refused: function code {} is not allowed for this peer; answered with exception 01 (illegal function)",
                    frame.function
                );
            }
            Refusal::Malformed(error) => tracing::warn!(
                device = self.proxy.device,
                %peer,
                function_code = frame.function,
                transaction_id = frame.transaction_id,
                unit_id = frame.unit_id,
                "Modbus request refused and the session closed, nothing of it forwarded: {error}"
            ),
        }
        // Audited as a refused request either way: the issuer's log knows that kind, and
        // the function code and transaction say which request it was.
        self.audit.refused(RefusedRequest {
            device: self.proxy.device.clone(),
            peer: peer.clone(),
            function_code: frame.function,
            transaction_id: frame.transaction_id,
            unit_id: frame.unit_id,
        });
    }
}

/// Resolves once `certificate` is on the CRL of the current identity.
async fn revoked(mut identity: watch::Receiver<Identity>, certificate: &[u8]) {
    loop {
        if let Ok(tls) = &*identity.borrow_and_update() {
            if tls.revoked.contains(certificate) {
                return;
            }
        }
        if identity.changed().await.is_err() {
            // The proxy is shutting down; its task ends the session.
            std::future::pending::<()>().await;
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.proxy.device)
            .finish_non_exhaustive()
    }
}
