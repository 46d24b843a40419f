//! The outbound proxy: a legacy client connects in plain TCP on a local port; the agent
//! connects to the remote gateway with mTLS, presenting the client's SVID and accepting only
//! the expected SPIFFE ID, and relays bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::config::Outbound;
use super::listener;
use super::metrics::ProxyMetrics;
use super::relay::{self, Traffic};
use super::session::{self, Session};
use super::upstream::Upstream;

/// A TLS handshake with the gateway that has not finished in this time fails the session.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        proxy.max_sessions,
        identity,
        &metrics,
        |stream, from, config| {
            let proxy = Arc::clone(&proxy);
            let gateway = Arc::clone(&gateway);
            let metrics = Arc::clone(&metrics);
            let server_name = server_name.clone();
            async move {
                session(
                    stream,
                    from,
                    &proxy,
                    &gateway,
                    config,
                    server_name,
                    &metrics,
                )
                .await;
            }
        },
    )
    .await;
}

async fn session(
    client: TcpStream,
    from: SocketAddr,
    proxy: &Outbound,
    gateway: &Upstream,
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    metrics: &Arc<ProxyMetrics>,
) {
    let device = &proxy.device;
    let _ = client.set_nodelay(true);
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
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.session_refused(session::handshake_refusal(&e));
            tracing::warn!(device, %from, gateway = gateway.address(), "connection closed: TLS with the gateway failed: {e}");
            return;
        }
        Err(_) => {
            metrics.session_refused("handshake_timeout");
            tracing::warn!(device, %from, gateway = gateway.address(), "connection closed: no TLS handshake with the gateway within {HANDSHAKE_TIMEOUT:?}");
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
    let end = relay::bytes(client, tls, &traffic).await;
    session.end(&end.to_string(), &traffic);
}
