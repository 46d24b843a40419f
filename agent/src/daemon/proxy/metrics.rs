//! Each proxy's counters, rendered into the agent's `/metrics` ([`crate::daemon::metrics`]).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a connection did not become a session (the `reason` label).
pub const REFUSALS: [&str; 10] = [
    "not_allowed",
    "revoked",
    "bad_certificate",
    "no_certificate",
    "handshake_failed",
    "handshake_timeout",
    "handshake_shed",
    "no_identity",
    "max_sessions",
    "upstream_unreachable",
];

/// One proxy's counters.
#[derive(Debug)]
pub struct ProxyMetrics {
    device: String,
    mode: &'static str,
    opened: AtomicU64,
    active: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    refused: [AtomicU64; REFUSALS.len()],
    modbus_refused: AtomicU64,
    malformed: AtomicU64,
    upstream_failures: AtomicU64,
}

/// Every proxy's metrics, in configuration order.
static REGISTRY: Mutex<Vec<Arc<ProxyMetrics>>> = Mutex::new(Vec::new());

impl ProxyMetrics {
    /// Counters for `device`'s proxy, registered for rendering.
    pub fn register(device: &str, mode: &'static str) -> Arc<Self> {
        let metrics = Arc::new(Self {
            device: device.to_owned(),
            mode,
            opened: AtomicU64::new(0),
            active: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            refused: [const { AtomicU64::new(0) }; REFUSALS.len()],
            modbus_refused: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
        });
        REGISTRY
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&metrics));
        metrics
    }

    /// A session opened.
    pub fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A session ended after moving these bytes.
    pub fn closed(&self, sent: u64, received: u64) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }

    /// A connection turned away, `reason` one of [`REFUSALS`].
    pub fn session_refused(&self, reason: &str) {
        if let Some(i) = REFUSALS.iter().position(|r| *r == reason) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A Modbus request refused by policy.
    pub fn modbus_refused(&self) {
        self.modbus_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A session closed for a malformed frame.
    pub fn malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    /// A failed connect to the upstream (or a back-off refusal).
    pub fn upstream_failure(&self) {
        self.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// The proxies' part of the exposition text.
pub fn render(out: &mut String) {
    let proxies = REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if proxies.is_empty() {
        return;
    }
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let series =
        |out: &mut String, name: &str, kind: &str, help: &str, rows: &dyn Fn(&mut String)| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            rows(out);
        };
    series(
        out,
        "plant_agent_proxy_sessions_total",
        "counter",
        "Proxy sessions opened (after the TLS handshake), by device.",
        &|out| {
            for p in &proxies {
                let _ = writeln!(
                    out,
                    "plant_agent_proxy_sessions_total{{device=\"{}\",mode=\"{}\"}} {}",
                    p.device,
                    p.mode,
                    get(&p.opened)
                );
            }
        },
    );
    series(
        out,
        "plant_agent_proxy_sessions_active",
        "gauge",
        "Proxy sessions open now, by device.",
        &|out| {
            for p in &proxies {
                let _ = writeln!(
                    out,
                    "plant_agent_proxy_sessions_active{{device=\"{}\",mode=\"{}\"}} {}",
                    p.device,
                    p.mode,
                    get(&p.active)
                );
            }
        },
    );
    series(
        out,
        "plant_agent_proxy_bytes_total",
        "counter",
        "Bytes relayed by ended sessions, by device and direction.",
        &|out| {
            for p in &proxies {
                let _ = writeln!(out, "plant_agent_proxy_bytes_total{{device=\"{}\",mode=\"{}\",direction=\"to_device\"}} {}", p.device, p.mode, get(&p.sent));
                let _ = writeln!(out, "plant_agent_proxy_bytes_total{{device=\"{}\",mode=\"{}\",direction=\"from_device\"}} {}", p.device, p.mode, get(&p.received));
            }
        },
    );
    series(
        out,
        "plant_agent_proxy_connections_refused_total",
        "counter",
        "Connections turned away before or at the handshake, by device and reason.",
        &|out| {
            for p in &proxies {
                for (reason, n) in REFUSALS.iter().zip(&p.refused) {
                    let _ = writeln!(out, "plant_agent_proxy_connections_refused_total{{device=\"{}\",mode=\"{}\",reason=\"{reason}\"}} {}", p.device, p.mode, get(n));
                }
            }
        },
    );
    series(
        out,
        "plant_agent_proxy_modbus_requests_refused_total",
        "counter",
        "Modbus requests refused by the peer's access, answered with exception 01.",
        &|out| {
            for p in &proxies {
                let _ = writeln!(
                    out,
                    "plant_agent_proxy_modbus_requests_refused_total{{device=\"{}\"}} {}",
                    p.device,
                    get(&p.modbus_refused)
                );
            }
        },
    );
    series(
        out,
        "plant_agent_proxy_malformed_sessions_total",
        "counter",
        "Sessions closed for a malformed Modbus/TCP frame.",
        &|out| {
            for p in &proxies {
                let _ = writeln!(
                    out,
                    "plant_agent_proxy_malformed_sessions_total{{device=\"{}\"}} {}",
                    p.device,
                    get(&p.malformed)
                );
            }
        },
    );
    series(out, "plant_agent_proxy_upstream_failures_total", "counter", "Connections to the PLC (or remote gateway) that failed or were not tried while it was backing off.", &|out| {
        for p in &proxies {
            let _ = writeln!(out, "plant_agent_proxy_upstream_failures_total{{device=\"{}\",mode=\"{}\"}} {}", p.device, p.mode, get(&p.upstream_failures));
        }
    });
}
