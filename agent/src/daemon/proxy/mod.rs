//! The legacy PLC proxy (DESIGN §5): the gateway agent holds an identity on behalf of each
//! legacy device declared in agent.toml and terminates mTLS for it.
//!
//! - [`config`]: the `[[proxy.inbound]]` / `[[proxy.outbound]]` tables.
//! - [`identity`]: the rustls configurations built from the cache (the device's SVID, the
//!   trust bundle, the allow list, the CRL), republished on every change so rotation
//!   reaches new handshakes without touching open sessions.
//! - `inbound` / `outbound`: the listeners; [`relay`] moves the bytes ([`modbus`] checks
//!   function codes); [`listener`] is their shared accept loop with its limits; [`upstream`] rate-limits reconnects to a PLC that is down;
//!   `session` logs each session; [`metrics`] counts them.

pub mod config;
pub mod identity;
mod inbound;
pub mod listener;
pub mod metrics;
pub mod modbus;
mod outbound;
pub mod relay;
mod session;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::daemon::cache::Snapshot;
use crate::daemon::proxy_audit::ProxyAudit;
use crate::daemon::svid::X509Svid;
use crate::Error;
use config::{Inbound, Outbound, ProxyConfig};
use identity::Revoked;
use metrics::ProxyMetrics;

/// Where the bound listen addresses are written (for port 0, and for operators).
pub const ADDRESSES_FILE: &str = "proxies.json";

/// Every proxy's listener, bound.
#[derive(Debug)]
pub struct Bound {
    inbound: Vec<(Arc<Inbound>, TcpListener)>,
    outbound: Vec<(Arc<Outbound>, TcpListener)>,
}

/// Binds every proxy's listen address (failing at start-up with the device named if one is
/// taken) and writes `<state_dir>/proxies.json`.
pub async fn bind(config: &ProxyConfig, state_dir: &Path) -> Result<Bound, Error> {
    let listen = |device: &str, address: SocketAddr| {
        let device = device.to_owned();
        async move {
            TcpListener::bind(address).await.map_err(|e| Error::Socket {
                path: state_dir.join(ADDRESSES_FILE),
                reason: format!("the proxy for {device} cannot listen on {address}: {e}"),
            })
        }
    };
    let mut bound = Bound {
        inbound: Vec::new(),
        outbound: Vec::new(),
    };
    let mut addresses = BTreeMap::new();
    for proxy in &config.inbound {
        let listener = listen(&proxy.device, proxy.listen).await?;
        addresses.insert(proxy.device.clone(), entry("inbound", &listener));
        bound.inbound.push((Arc::new(proxy.clone()), listener));
    }
    for proxy in &config.outbound {
        let listener = listen(&proxy.device, proxy.listen).await?;
        addresses.insert(proxy.device.clone(), entry("outbound", &listener));
        bound.outbound.push((Arc::new(proxy.clone()), listener));
    }
    let path = state_dir.join(ADDRESSES_FILE);
    let text = serde_json::to_string_pretty(&addresses).unwrap_or_default();
    crate::pem_files::write_atomically(
        &path,
        text.as_bytes(),
        0o644,
        crate::pem_files::Overwrite::Allow,
    )?;
    Ok(bound)
}

/// The `proxies:` part of `agent status`: each proxy, where it listens (as bound, from
/// proxies.json) and where it forwards.
pub fn describe(config: &ProxyConfig, state_dir: &Path) -> String {
    use std::fmt::Write as _;
    if config.is_empty() {
        return String::new();
    }
    let bound: serde_json::Value = std::fs::read_to_string(state_dir.join(ADDRESSES_FILE))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let listen = |device: &str, configured: SocketAddr| {
        bound[device]["listen"]
            .as_str()
            .map_or_else(|| configured.to_string(), str::to_owned)
    };
    let mut text = String::from("proxies:\n");
    for p in &config.inbound {
        let protocol = match p.protocol {
            config::Protocol::Modbus => "modbus",
            config::Protocol::Tcp => "tcp",
        };
        let _ = writeln!(
            text,
            "  {:<12} inbound   mTLS {} -> {protocol} {}  as {} ({} allow rules)",
            p.device,
            listen(&p.device, p.listen),
            p.upstream,
            p.spiffe_id,
            p.allow.0.len()
        );
    }
    for p in &config.outbound {
        let _ = writeln!(
            text,
            "  {:<12} outbound  tcp {} -> mTLS {} ({})  as {}",
            p.device,
            listen(&p.device, p.listen),
            p.gateway,
            p.server_spiffe_id,
            p.spiffe_id
        );
    }
    text
}

fn entry(mode: &str, listener: &TcpListener) -> serde_json::Value {
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    serde_json::json!({ "mode": mode, "listen": listen })
}

/// Runs every proxy until the future is dropped: one task per listener, one that follows the
/// cache and republishes the TLS configurations.
pub async fn serve(bound: Bound, state: watch::Receiver<Arc<Snapshot>>, audit: ProxyAudit) {
    let mut tasks = JoinSet::new();
    let mut inbound = Vec::new();
    for (proxy, listener) in bound.inbound {
        let (identity, watched) = watch::channel(Err("starting".to_owned()));
        let metrics = ProxyMetrics::register(&proxy.device, "inbound");
        tracing::info!(device = proxy.device, spiffe_id = %proxy.spiffe_id, listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), upstream = proxy.upstream, "inbound proxy listening");
        tasks.spawn(inbound::serve(
            listener,
            Arc::clone(&proxy),
            watched,
            audit.clone(),
            metrics,
        ));
        inbound.push((proxy, identity));
    }
    let mut outbound = Vec::new();
    for (proxy, listener) in bound.outbound {
        let (identity, watched) = watch::channel(Err("starting".to_owned()));
        let metrics = ProxyMetrics::register(&proxy.device, "outbound");
        tracing::info!(device = proxy.device, spiffe_id = %proxy.spiffe_id, listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), gateway = proxy.gateway, "outbound proxy listening");
        tasks.spawn(outbound::serve(
            listener,
            Arc::clone(&proxy),
            watched,
            metrics,
        ));
        outbound.push((proxy, identity));
    }
    tasks.spawn(follow(state, inbound, outbound));
    while tasks.join_next().await.is_some() {}
}

/// What the published configurations were built from, to rebuild only what changed: the
/// cache republishes on every SVID of every workload, most of which concern no proxy.
#[derive(Default)]
struct Built {
    /// The bundle of the last build (`None` before the first); every proxy depends on it.
    bundle: Option<Vec<Vec<u8>>>,
    /// The CRLs of the last build.
    crl: Vec<Vec<u8>>,
    /// The CRLs, parsed once per change.
    revoked: Arc<Revoked>,
    /// Per device, the SVID presented (held, so `ptr_eq` cannot be fooled by a reused
    /// address) or why there is none.
    presented: BTreeMap<String, Result<Arc<X509Svid>, String>>,
}

impl Built {
    /// Takes the snapshot's trust; whether it differs from the last build's.
    fn trust(&mut self, snapshot: &Snapshot) -> bool {
        let same = self.bundle.as_ref() == Some(&snapshot.bundle) && self.crl == snapshot.crl;
        if !same {
            self.revoked = Arc::new(Revoked::from_crls(&snapshot.crl));
            self.bundle = Some(snapshot.bundle.clone());
            self.crl = snapshot.crl.clone();
        }
        !same
    }

    /// Whether `device` must be rebuilt for `svid` (always when the trust changed).
    fn device(
        &mut self,
        device: &str,
        svid: &Result<Arc<X509Svid>, String>,
        trust_changed: bool,
    ) -> bool {
        let same = match (self.presented.get(device), svid) {
            (Some(Ok(before)), Ok(now)) => Arc::ptr_eq(before, now),
            (Some(Err(before)), Err(now)) => before == now,
            _ => false,
        };
        if same && !trust_changed {
            return false;
        }
        self.presented.insert(device.to_owned(), svid.clone());
        true
    }
}

async fn follow(
    mut state: watch::Receiver<Arc<Snapshot>>,
    inbound: Vec<(Arc<Inbound>, watch::Sender<inbound::Identity>)>,
    outbound: Vec<(Arc<Outbound>, watch::Sender<outbound::Identity>)>,
) {
    let mut built = Built::default();
    loop {
        let snapshot = Arc::clone(&state.borrow_and_update());
        let trust_changed = built.trust(&snapshot);
        let revoked = Arc::clone(&built.revoked);
        for (proxy, sender) in &inbound {
            let svid = identity::device_svid(&snapshot, &proxy.device, &proxy.spiffe_id);
            if !built.device(&proxy.device, &svid, trust_changed) {
                continue;
            }
            let made = svid.and_then(|svid| {
                identity::server_config(
                    &svid,
                    &snapshot.bundle,
                    proxy.allow.clone(),
                    Arc::clone(&revoked),
                )
                .map(|config| (svid, config))
            });
            let _previous = sender.send_replace(announce(
                &proxy.device,
                &snapshot,
                made.map(|(svid, config)| {
                    (
                        svid,
                        inbound::InboundTls {
                            config,
                            revoked: Arc::clone(&revoked),
                        },
                    )
                }),
            ));
        }
        for (proxy, sender) in &outbound {
            let svid = identity::device_svid(&snapshot, &proxy.device, &proxy.spiffe_id);
            if !built.device(&proxy.device, &svid, trust_changed) {
                continue;
            }
            let made = svid.and_then(|svid| {
                identity::client_config(
                    &svid,
                    &snapshot.bundle,
                    proxy.server_spiffe_id.clone(),
                    Arc::clone(&revoked),
                )
                .map(|config| (svid, config))
            });
            let _previous = sender.send_replace(announce(&proxy.device, &snapshot, made));
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Logs what the proxy now presents (or why nothing) and passes the result on.
fn announce<T>(
    device: &str,
    snapshot: &Snapshot,
    built: Result<(Arc<X509Svid>, T), String>,
) -> Result<T, String> {
    match built {
        Ok((svid, value)) => {
            let not_after = time::OffsetDateTime::from(svid.not_after);
            tracing::info!(device, spiffe_id = %svid.spiffe_id, %not_after, "proxy identity ready for new sessions");
            Ok(value)
        }
        Err(problem) => {
            // Before the first sync the agent does not know yet: no alarm for that.
            if snapshot.synced {
                tracing::warn!(device, "proxy has no identity: {problem}");
            }
            Err(problem)
        }
    }
}
