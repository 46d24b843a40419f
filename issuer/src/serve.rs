//! `issuer serve`: the EST listener (HTTPS), the agent API (gRPC over TLS) and the admin
//! socket, with one shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use est::server::TlsClientCertificate;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::authority::Authority;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::Error;

/// Longest a client may take to finish the TLS handshake or send its headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until SIGINT/SIGTERM.
pub async fn run(config: Config) -> Result<(), Error> {
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
        authority.crl.set_url(crl_url.clone());
        if clock_wrong.is_none() {
            authority.publish_crl()?;
        }
        let crl_url_file = state_dir.join("crl.url");
        std::fs::write(&crl_url_file, format!("{crl_url}\n")).map_err(Error::io(&crl_url_file))?;
        let router = crate::crl::router(authority.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "CRL listener stopped");
            }
        });
        tokio::spawn(authority.clone().keep_crl_fresh());
        tokio::spawn(authority.clone().keep_metrics_fresh());
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
        },
    )
    .merge(crate::operator_api::router(authority.clone()));
    let status = authority.status();
    tracing::info!(%url, admin = %admin_path.display(), key = %status.issuing_key, "issuer ready");
    println!("EST listening on {url}");
    println!("admin socket {}", admin_path.display());
    println!("root CA fingerprint (SHA-256) {}", status.root_fingerprint);

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(config.est.max_connections));
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
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.map_err(|e| Error::Tls(e.to_string()))?,
            broken = &mut shutdown => { store_broken = broken; break },
        };
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
        let acceptor = acceptor.clone();
        let router = est_router.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(acceptor, router, authority, tcp, peer).await;
        });
    }
    tracing::info!("shutting down");
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
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let client_certificate =
        tls.get_ref().1.peer_certificates().map(|chain| {
            TlsClientCertificate(Arc::new(chain.iter().map(|c| c.to_vec()).collect()))
        });
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let mut request = request.map(axum::body::Body::new);
        if let Some(cert) = &client_certificate {
            request.extensions_mut().insert(cert.clone());
        }
        let router = router.clone();
        let authority = authority.clone();
        async move {
            let response = router.oneshot(request).await.unwrap_or_else(|e| match e {});
            authority.count_est_response(response.status().as_u16());
            Ok::<_, Infallible>(response)
        }
    });
    // Title-case header names and a Content-Length on every response: Cisco libest compares
    // header names case-sensitively and refuses chunked responses (DESIGN §4).
    let result = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(crate::header_case::HeaderCase(tls)), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
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
