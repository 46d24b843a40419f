//! `issuer serve`: the EST listener (HTTPS), the agent API (gRPC over TLS) and the admin
//! socket, with one shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use est::server::{ClientAddress, TlsClientCertificate};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tower::ServiceExt;

use crate::authority::Authority;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::connections::{Connections, Phase, Slot};
use crate::Error;

/// The bounds every HTTP/1 connection is served under (`[est]` settings; the CRL listener
/// shares them).
#[derive(Debug, Clone, Copy)]
struct HttpLimits {
    handshake_timeout: Duration,
    header_timeout: Duration,
    max_header_bytes: usize,
    request_timeout: Duration,
    max_requests_per_connection: usize,
}

/// How long a stopping issuer waits for requests in progress to be answered and written
/// (each is bounded on its own: body timeout, signing deadline).
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs until SIGINT/SIGTERM, or until the store fails for good.
pub async fn run(config: Config) -> Result<(), Error> {
    raise_open_file_limit();
    let limits = HttpLimits {
        handshake_timeout: config.est.handshake_timeout,
        header_timeout: config.est.header_timeout,
        max_header_bytes: config.est.max_header_bytes,
        request_timeout: config.est.request_timeout,
        max_requests_per_connection: config.est.max_requests_per_connection,
    };
    let state_dir = config.state_dir();
    std::fs::create_dir_all(&state_dir).map_err(Error::io(&state_dir))?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(&state_dir))?;
    let authority = Arc::new(Authority::open(&config, Arc::new(SystemClock))?);
    // A wrong clock (outside the issuing CA's validity) does not stop the issuer: it serves
    // cacerts and the API, and refuses every issuance with the reason, so operators see
    // what to fix from any client and from the log.
    let clock_wrong = authority.check_clock_within_ca(authority.now()).err();
    if let Some(e) = &clock_wrong {
        tracing::error!(error = %e, "nothing will be issued until the clock is right");
    }
    if authority.ca.signing_keys().is_some() {
        // The first short-lived key is certified before anything is served: its private
        // half never outlives this process, so every start makes a new one.
        if clock_wrong.is_none() {
            authority.certify_signing_key_if_due().await?;
        }
        tokio::spawn(authority.clone().keep_signing_key_fresh());
    }
    tokio::spawn(authority.clone().keep_refusal_summaries_written());
    if clock_wrong.is_none() {
        crate::tls::renew_listener_certificate_if_due(
            &authority,
            &config.resolve(&config.est.tls_certificate),
            &config.resolve(&config.est.tls_key),
        )
        .await;
    }
    let tls = crate::tls::server_config(
        &config.resolve(&config.est.tls_certificate),
        &config.resolve(&config.est.tls_key),
    )?;

    let listener = TcpListener::bind(config.est.listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.est.listen)))?;
    let addr = listener.local_addr().map_err(Error::io("est listener"))?;
    let url = format!("https://{addr}");

    if let Some(crl) = &config.crl {
        let listener = TcpListener::bind(crl.listen).await.map_err(|e| {
            Error::Config(format!("cannot listen on {} for the CRL: {e}", crl.listen))
        })?;
        let crl_addr = listener.local_addr().map_err(Error::io("crl listener"))?;
        let crl_url = crl
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{crl_addr}{}", crate::crl::PATH));
        authority.revocation.crl().set_url(crl_url.clone());
        if clock_wrong.is_none() {
            authority.revocation.publish_crl()?;
        }
        let crl_url_file = state_dir.join("crl.url");
        std::fs::write(&crl_url_file, format!("{crl_url}\n")).map_err(Error::io(&crl_url_file))?;
        let router = crate::crl::router(
            authority.revocation.crl().clone(),
            authority.metrics.clone(),
        );
        // Plain HTTP under the same bounds as EST (axum::serve has no timeouts at all).
        let connections = Connections::new(
            "crl",
            config.est.max_connections,
            config.est.max_connections_per_source,
            authority.metrics.connections_shed("crl"),
        );
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "CRL accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = connections.admit(peer.ip()).await else {
                    continue;
                };
                slot.set_phase(Phase::Idle);
                let slot = Arc::new(slot);
                let router = router.clone();
                let service =
                    hyper::service::service_fn(move |request: http::Request<axum::body::Body>| {
                        router.clone().oneshot(request)
                    });
                tokio::spawn(serve_http1(tcp, service, slot, limits, peer));
            }
        });
        tokio::spawn(authority.revocation.clone().keep_crl_fresh());
        tokio::spawn(
            authority
                .metrics
                .clone()
                .keep_fresh(authority.store.clone(), authority.clock.clone()),
        );
        println!("CRL served at {crl_url}");
    }

    let admin_path = config.admin_socket();
    let admin = bind_admin_socket(&admin_path)?;
    let admin_router = crate::admin::router(authority.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, admin_router).await {
            tracing::error!(error = %e, "admin socket stopped");
        }
    });

    let (stop_agent_api, agent_api_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_api = if config.agent_api.enabled {
        let listener = crate::agent_api::Listener::bind(&config, &authority).await?;
        let agent_api_url = format!("https://{}", listener.local_addr()?);
        let jwt = crate::agent_api::JwtKey::open_or_create(&state_dir.join("jwt-svid.key"))?;
        let service = crate::agent_api::AgentService::new(
            authority.clone(),
            crate::agent_api::attestors(&config, &authority)?,
            jwt,
            &config.agent_api,
        );
        let url_file = state_dir.join("agent_api.url");
        std::fs::write(&url_file, format!("{agent_api_url}\n")).map_err(Error::io(&url_file))?;
        println!("agent API listening on {agent_api_url}");
        Some(tokio::spawn(listener.serve(service, async move {
            let _ = agent_api_stopped.await;
        })))
    } else {
        None
    };

    // Written last: scripts and tests wait for this file to know the issuer is ready.
    let url_file = state_dir.join("est.url");
    std::fs::write(&url_file, format!("{url}\n")).map_err(Error::io(&url_file))?;

    let est_router = est::server::router(
        authority.clone(),
        est::server::ServerOptions {
            max_body_bytes: config.est.max_body_bytes,
            body_timeout: config.est.body_timeout,
        },
    )
    .merge(crate::operator_api::router(authority.clone()));
    let status = authority.status();
    tracing::info!(%url, admin = %admin_path.display(), key = %status.issuing_key, "issuer ready");
    println!("EST listening on {url}");
    println!("admin socket {}", admin_path.display());
    println!("root CA fingerprint (SHA-256) {}", status.root_fingerprint);

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = Connections::new(
        "est",
        config.est.max_connections,
        config.est.max_connections_per_source,
        authority.metrics.connections_shed("est"),
    );
    let durability = authority.store.durability.clone();
    let shutdown = async {
        tokio::select! {
            () = shutdown_signal() => None,
            error = durability.broken() => Some(error),
        }
    };
    tokio::pin!(shutdown);
    let store_broken;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            broken = &mut shutdown => { store_broken = broken; break },
        };
        let slot = tokio::select! {
            slot = connections.admit(peer.ip()) => slot,
            broken = &mut shutdown => { store_broken = broken; break },
        };
        // The source holds its maximum of connections, all serving authenticated requests.
        let Some(slot) = slot else { continue };
        let acceptor = acceptor.clone();
        let router = est_router.clone();
        let authority = authority.clone();
        tokio::spawn(serve_connection(
            acceptor, router, authority, tcp, peer, slot, limits,
        ));
    }
    tracing::info!("shutting down");
    let left = connections.close(DRAIN_DEADLINE).await;
    if left > 0 {
        tracing::warn!(connections = left, "EST connections still open at shutdown");
    }
    let _ = stop_agent_api.send(());
    if let Some(task) = agent_api {
        // Open attestation streams get a moment to finish; then the process goes anyway.
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "agent API stopped with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("agent API connections still open at shutdown"),
        }
    }
    let _ = std::fs::remove_file(&admin_path);
    if let Some(error) = store_broken {
        // Requests in flight were answered 503; nothing unrecorded was handed out.
        let message = format!(
            "writing the store failed ({error}); the issuer stops so that it restarts on what \
             is on disk (run it under a supervisor such as systemd with Restart=on-failure); \
             free space or fix the disk under {} first",
            state_dir.display()
        );
        tracing::error!("{message}");
        return Err(Error::Store(message));
    }
    let flushed = authority.store.durability.commit().await;
    authority.store.durability.close().await;
    flushed
}

async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    authority: Arc<Authority>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: Slot,
    limits: HttpLimits,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        () = slot.shed() => {
            tracing::debug!(%peer, "TLS handshake shed at the connection limit");
            return;
        }
        () = slot.closing() => return,
    };
    let client_certificate =
        tls.get_ref().1.peer_certificates().map(|chain| {
            TlsClientCertificate(Arc::new(chain.iter().map(|c| c.to_vec()).collect()))
        });
    if client_certificate
        .as_ref()
        .and_then(TlsClientCertificate::leaf)
        .is_some_and(|leaf| authority.issued_here(leaf))
    {
        slot.set_authenticated();
    }
    slot.set_phase(Phase::Idle);
    let slot = Arc::new(slot);
    let service =
        hyper::service::service_fn(move |mut request: http::Request<axum::body::Body>| {
            if let Some(cert) = &client_certificate {
                request.extensions_mut().insert(cert.clone());
            }
            request.extensions_mut().insert(ClientAddress(peer));
            let router = router.clone();
            let authority = authority.clone();
            async move {
                let response = router.oneshot(request).await.unwrap_or_else(|e| match e {});
                authority.count_est_response(response.status().as_u16());
                Ok::<_, Infallible>(response)
            }
        });
    serve_http1(
        crate::header_case::HeaderCase(tls),
        service,
        slot,
        limits,
        peer,
    )
    .await;
}

/// Serves HTTP/1.1 on one connection until the client leaves, a bound is hit, or a newer
/// connection sheds this one while it is not busy with a request.
async fn serve_http1<I, S>(io: I, service: S, slot: Arc<Slot>, limits: HttpLimits, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<axum::body::Body>,
            Response = axum::response::Response,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    // Title-case header names and a Content-Length on every response: Cisco libest compares
    // header names case-sensitively and refuses chunked responses (DESIGN §4). hyper's
    // header timer runs whenever it waits for a request head, so it bounds a client that
    // trickles its headers and a keep-alive connection left idle alike; a head larger than
    // `max_header_bytes` is answered 431.
    // Each request marks the connection receiving until its body is in, then busy until
    // its response is ready; a connection between requests or still receiving one can be
    // shed, and one serving a request only if its client is unauthenticated. Each request
    // is bounded as a whole (a trickled body included), and a connection serves a bounded
    // number of them, so none stays busy for ever.
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = {
        let slot = slot.clone();
        hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let received = Arc::new(AtomicBool::new(request.body().is_end_stream()));
            let in_flight = slot.begin_request(if received.load(Ordering::Relaxed) {
                Phase::Busy
            } else {
                Phase::Receiving
            });
            let request = request.map(|body| {
                axum::body::Body::new(TrackedBody {
                    inner: body,
                    slot: slot.clone(),
                    received: received.clone(),
                })
            });
            let response = hyper::service::Service::call(&service, request);
            let last =
                served.fetch_add(1, Ordering::Relaxed) + 1 >= limits.max_requests_per_connection;
            async move {
                let mut response =
                    match tokio::time::timeout(limits.request_timeout, response).await {
                        Ok(response) => response?,
                        Err(_) => {
                            tracing::debug!(%peer, "request not done within the request timeout");
                            est::server::error_response(&est::Error::refused(
                                est::Refusal::RequestTimeout,
                                format!(
                                    "the request did not complete within {} s; send it again",
                                    limits.request_timeout.as_secs()
                                ),
                            ))
                        }
                    };
                drop(in_flight);
                // A body not read to its end would be read (and could be trickled) after
                // the answer: close instead; and close after the last request allowed.
                if last || !received.load(Ordering::Relaxed) {
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = slot.shed() => {
            if !slot.is_busy() {
                tracing::debug!(%peer, phase = ?slot.phase(), "connection shed at the connection limit");
                return;
            }
            // Serving a request (unauthenticated, or it turned busy as it was picked): its
            // body is in and the rest is the issuer's own bounded work; answer, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = slot.closing() => {
            // The issuer stops: the request in progress (if any) is answered and written
            // before the connection closes; an idle one closes at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A request body that tells its connection's slot when it has arrived in full (or the
/// handler stopped reading it): from then on serving it is the issuer's work, not the
/// client's.
struct TrackedBody {
    inner: Incoming,
    slot: Arc<Slot>,
    received: Arc<AtomicBool>,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.received.store(true, Ordering::Relaxed);
            self.slot.received();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.slot.received();
    }
}

/// Raises the soft limit of open files to the hard limit: every connection is a descriptor,
/// and the default soft limit (often 1024) would make a few thousand clients hit EMFILE long
/// before `max_connections`.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let below_hard = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) => soft < hard,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "could not raise the open file limit");
        }
    }
    let limit = getrlimit(Resource::Nofile);
    tracing::info!(
        open_files = limit
            .current
            .map_or_else(|| "unlimited".into(), |n| n.to_string()),
        "open file limit"
    );
}

fn bind_admin_socket(path: &std::path::Path) -> Result<UnixListener, Error> {
    if path.exists() {
        // A live issuer answers on it; a stale file from a crash does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Config(format!(
                "another issuer is already serving the admin socket {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(Error::io(path))?;
    }
    let listener = UnixListener::bind(path).map_err(Error::io(path))?;
    // The state folder is 0700 already; the socket itself is owner-only too.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(path))?;
    Ok(listener)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
