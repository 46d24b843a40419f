//! The daemon (`agent run`): it attests its node to the issuer and serves workloads SPIFFE
//! SVIDs over the Workload API. [`run`] binds the Workload API socket, then keeps the node
//! identity and the SVID cache fresh ([`cache`]) until SIGTERM or SIGINT, and removes the
//! socket on the way out.
//!
//! - [`config`] reads `agent.toml`.
//! - [`node`]: node attestation (join token, x509pop; tpm) and [`issuer_client`], the agent
//!   API client that drives it over TLS, then mTLS with the node SVID.
//! - [`cache`]: entry sync, X509-SVID minting and [`rotation`] at half life ± 10 %; what it
//!   holds is saved in the state directory and served after a restart until the issuer answers.
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket; callers attested by [`peer`];
//!   [`h2_authority`] rewrites the socket path some gRPC clients send as `:authority`.
//! - [`status`]: `<state_dir>/status.json` and `agent status`.
//! - [`metrics`]: Prometheus `/metrics` on `metrics_listen`.
//! - [`proxy`]: the legacy PLC proxy, inbound (mTLS in front of a PLC) and outbound (a legacy
//!   client's plain TCP out as mTLS); refused Modbus requests reach the issuer's audit log
//!   through [`proxy_audit`].
//!
//! Nothing here imports [`crate::commissioning`], nor the other way round: what both use
//! ([`crate::certificate`], [`crate::pem_files`], [`crate::Error`]) is at the crate's root.

pub mod cache;
pub mod cgroup;
pub mod config;
pub mod connections;
pub mod entry;
pub mod h2_authority;
pub mod issuer_client;
pub mod jwt;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod proxy;
pub mod proxy_audit;
pub mod rotation;
pub mod socket_address;
pub mod status;
pub mod svid;
pub mod workload_api;

use std::os::unix::fs::PermissionsExt;

use tokio::sync::watch;

use cache::Manager;
use config::{AgentConfig, AttestationConfig};
use issuer_client::IssuerEndpoint;
use proxy_audit::ProxyAudit;
use workload_api::WorkloadApi;

use crate::{pem_files, Error};

/// How long shutdown waits for open Workload API calls to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the agent until `shutdown` resolves. Fails at start-up on a bad trust bundle, an
/// unusable attestation or socket, and later only if the node's first attestation is
/// refused (a spent join token, a revoked device certificate).
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let anchors =
        pem_files::read_certificates(&config.trust_bundle).map_err(|e| Error::Config {
            path: config.path.clone(),
            key: "trust_bundle".into(),
            message: e.to_string(),
        })?;
    if anchors.is_empty() {
        return Err(Error::Config {
            path: config.path.clone(),
            key: "trust_bundle".into(),
            message: format!(
                "{} holds no CA certificate; give the plant root CA (ca.pem)",
                config.trust_bundle.display()
            ),
        });
    }
    // A join-token node with no cached identity must attest, which it can't without its
    // token: say so now, before anything is bound (the token is read again when attesting).
    if let AttestationConfig::JoinToken { token } = &config.attestation {
        if !cache::holds_node_identity(&config.state_dir) {
            token.read()?;
        }
    }
    raise_open_file_limit();
    let endpoint = IssuerEndpoint::new(&config.server, &anchors)?;
    let attestation = node::from_config(&config.attestation, &config.state_dir)?;
    std::fs::create_dir_all(&config.state_dir).map_err(Error::io(&config.state_dir))?;
    // The node key lives here: only the agent's user may look inside.
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(&config.state_dir))?;

    let protector = node::cache_key_protector(&config.attestation)?;
    let (mut manager, published) = Manager::new(
        config.trust_domain.clone(),
        config.state_dir.clone(),
        config.sync_interval,
        endpoint,
        attestation,
    );
    if let Some(protector) = protector {
        manager.protect_cache_keys_with(protector);
    }
    // Metrics first: once the socket is there, so is metrics.url.
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(metrics::bind(address, &config.state_dir).await?),
        None => None,
    };
    // Proxies before the socket too: once the socket is there, so is proxies.json.
    let proxies = if config.proxy.is_empty() {
        None
    } else {
        Some(proxy::bind(&config.proxy, &config.state_dir).await?)
    };
    let listener = workload_api::bind(&config.socket).await?;
    tracing::info!(socket = %config.socket.display(), server = %config.server, method = config.attestation.method(), "agent started");

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let proxy_task = proxies.map(|bound| {
        let audit = ProxyAudit::spawn(published.issuer.clone());
        tokio::spawn(proxy::serve(bound, published.state.clone(), audit))
    });
    let server = tokio::spawn(workload_api::serve(
        listener,
        config.socket.clone(),
        WorkloadApi::new(published),
        until_stopped(stopped.clone()),
    ));
    let metrics_server = metrics_listener
        .map(|listener| tokio::spawn(metrics::serve(listener, until_stopped(stopped.clone()))));
    let signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        })
    };
    let outcome = manager.run(until_stopped(stopped)).await;
    let _ = stop.send(true);
    signal.abort();
    if let Some(task) = metrics_server {
        task.abort();
    }
    // Aborting drops every proxy session; each logs its end.
    if let Some(task) = proxy_task {
        task.abort();
    }
    // Streams end when the manager (their watch sender) is gone, which lets the graceful
    // shutdown finish; a client that still holds a call open is not waited for long.
    let served = match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined.map_err(|e| Error::Socket {
            path: config.socket.clone(),
            reason: format!("the server task failed: {e}"),
        })?,
        Err(_) => {
            tracing::warn!(
                "Workload API connections still open after {SHUTDOWN_GRACE:?}; closing them"
            );
            let _ = std::fs::remove_file(&config.socket);
            Ok(())
        }
    };
    outcome.and(served)
}

/// Raises the soft limit of open files to the hard limit: every Workload API client, proxy
/// session (two sockets) and pending handshake is a descriptor, and the usual soft limit of
/// 1024 would turn a crowd of connections into EMFILE for everyone.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::Nofile);
    let mut limit = before;
    // An unlimited hard limit can't be the soft one for files: the kernel caps it at nr_open.
    let hard = limit.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse().ok())
    });
    if let (Some(soft), Some(hard)) = (limit.current, hard) {
        if soft < hard {
            limit.current = Some(hard);
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open file limit");
            }
        }
    }
    let now = getrlimit(Resource::Nofile);
    let show = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    tracing::info!(
        open_files = show(now.current),
        was = show(before.current),
        hard = show(now.maximum),
        "open file limit"
    );
}
