//! The outbound proxy: a legacy client connects in plain TCP on a local port; the agent
//! connects to the remote gateway with mTLS, presenting the client's SVID and accepting only
//! the expected SPIFFE ID, and relays bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::config::Outbound;
use super::listener::{self, Admission, NotAdmitted, HANDSHAKE_TIMEOUT};
use super::metrics::ProxyMetrics;
use super::relay::{self, Traffic};
use super::session::{self, Session};
use super::upstream::Upstream;

/// The client configuration, or why there is none yet.
pub type Identity = Result<Arc<rustls::ClientConfig>, String>;

/// Accepts until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Outbound>,
    identity: watch::Receiver<Identity>,
    metrics: Arc<ProxyMetrics>,
) {
    let gateway = Arc::new(Upstream::new(proxy.gateway.clone(), proxy.connect_timeout));
    let host = proxy
        .gateway
        .rsplit_once(':')
        .map_or(proxy.gateway.as_str(), |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    // Only for SNI: the gateway is verified by its SPIFFE ID, not a host name.
    let server_name = ServerName::try_from(host)
        .unwrap_or_else(|_| ServerName::try_from("gateway.invalid").expect("a valid DNS name"));
    listener::accept(
        listener,
        &proxy.device,
        proxy.limits,
        identity,
        &metrics,
        |stream, from, config, admission| {
            let proxy = Arc::clone(&proxy);
            let gateway = Arc::clone(&gateway);
            let metrics = Arc::clone(&metrics);
            let server_name = server_name.clone();
            async move {
                session(
                    (stream, from),
                    &proxy,
                    &gateway,
                    config,
                    server_name,
                    &metrics,
                    admission,
                )
                .await;
            }
        },
    )
    .await;
}

/// One legacy client's session; `client` is its connection and address.
async fn session(
    (client, from): (TcpStream, SocketAddr),
    proxy: &Outbound,
    gateway: &Upstream,
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    metrics: &Arc<ProxyMetrics>,
    admission: Admission,
) {
    let device = &proxy.device;
    let _ = client.set_nodelay(true);
    // The legacy client is local and unauthenticated; it is pending (bounded, shed when
    // full) until the gateway has answered, and takes a session slot only then.
    let tcp = match gateway.connect().await {
        Ok(tcp) => tcp,
        Err(e) => {
            metrics.upstream_failure();
            metrics.session_refused("upstream_unreachable");
            tracing::warn!(device, %from, "connection closed: gateway {} unreachable: {e}", gateway.address());
            return;
        }
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match admission
        .handshake(connector.connect(server_name, tcp))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.session_refused(session::handshake_refusal(&e));
            tracing::warn!(device, %from, gateway = gateway.address(), "connection closed: TLS with the gateway failed: {e}");
            return;
        }
        Err(NotAdmitted::Timeout) => {
            metrics.session_refused("handshake_timeout");
            tracing::warn!(device, %from, gateway = gateway.address(), "connection closed: no TLS handshake with the gateway within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
        Err(NotAdmitted::Shed) => {
            metrics.session_refused("handshake_shed");
            tracing::debug!(device, %from, "connection shed: pending handshakes full and this one the oldest");
            return;
        }
    };
    let _slot = match admission.session_slot() {
        Ok(slot) => slot,
        Err(max_sessions) => {
            metrics.session_refused("max_sessions");
            tracing::warn!(device, %from, max_sessions, "connection closed: the device has its maximum of open sessions");
            return;
        }
    };
    let mut session = Session::start(
        device,
        "outbound",
        &proxy.server_spiffe_id,
        None,
        from,
        metrics,
    );
    let traffic = Traffic::default();
    let end = tokio::select! {
        end = relay::bytes(client, tls, &traffic) => end.to_string(),
        () = relay::idle(&traffic, proxy.idle_timeout) => {
            format!("idle: nothing sent either way for {:?} (idle_timeout)", proxy.idle_timeout)
        }
    };
    session.end(&end, &traffic);
}
