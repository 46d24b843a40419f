//! Each proxy's counters, registered into the agent's `/metrics` ([`crate::daemon::metrics`]).

use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Proxy {
    device: String,
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    device: String,
    mode: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    device: String,
    mode: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Device {
    device: String,
}

/// Every proxy's series, one family per metric.
#[derive(Debug, Default)]
struct Families {
    sessions: Family<Proxy, Counter>,
    active: Family<Proxy, Gauge>,
    bytes: Family<Direction, Counter>,
    refused: Family<Refusal, Counter>,
    modbus_refused: Family<Device, Counter>,
    malformed: Family<Device, Counter>,
    upstream_failures: Family<Proxy, Counter>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(Families::default);

/// Adds the proxies' families to the agent's registry (a family without a proxy has no series).
pub(crate) fn register(registry: &mut Registry) {
    let f = &*FAMILIES;
    registry.register(
        "plant_agent_proxy_sessions",
        "Proxy sessions opened (after the TLS handshake), by device",
        f.sessions.clone(),
    );
    registry.register(
        "plant_agent_proxy_sessions_active",
        "Proxy sessions open now, by device",
        f.active.clone(),
    );
    registry.register(
        "plant_agent_proxy_bytes",
        "Bytes relayed by ended sessions, by device and direction",
        f.bytes.clone(),
    );
    registry.register(
        "plant_agent_proxy_connections_refused",
        "Connections turned away before or at the handshake, by device and reason",
        f.refused.clone(),
    );
    registry.register(
        "plant_agent_proxy_modbus_requests_refused",
        "Modbus requests refused by the peer's access, answered with exception 01",
        f.modbus_refused.clone(),
    );
    registry.register(
        "plant_agent_proxy_malformed_sessions",
        "Sessions closed for a malformed Modbus/TCP frame",
        f.malformed.clone(),
    );
    registry.register(
        "plant_agent_proxy_upstream_failures",
        "Connections to the PLC (or remote gateway) that failed or were not tried while it was backing off",
        f.upstream_failures.clone(),
    );
}

/// One proxy's counters: handles on its series in the families above.
#[derive(Debug)]
pub struct ProxyMetrics {
    opened: Counter,
    active: Gauge,
    sent: Counter,
    received: Counter,
    refused: [Counter; REFUSALS.len()],
    modbus_refused: Counter,
    malformed: Counter,
    upstream_failures: Counter,
}

impl ProxyMetrics {
    /// Counters for `device`'s proxy, every series present from the start at zero.
    pub fn register(device: &str, mode: &'static str) -> Arc<Self> {
        let f = &*FAMILIES;
        let proxy = Proxy {
            device: device.to_owned(),
            mode,
        };
        let direction = |direction| Direction {
            device: device.to_owned(),
            mode,
            direction,
        };
        let device_only = Device {
            device: device.to_owned(),
        };
        Arc::new(Self {
            opened: f.sessions.get_or_create_owned(&proxy),
            active: f.active.get_or_create_owned(&proxy),
            sent: f.bytes.get_or_create_owned(&direction("to_device")),
            received: f.bytes.get_or_create_owned(&direction("from_device")),
            refused: REFUSALS.map(|reason| {
                f.refused.get_or_create_owned(&Refusal {
                    device: device.to_owned(),
                    mode,
                    reason,
                })
            }),
            modbus_refused: f.modbus_refused.get_or_create_owned(&device_only),
            malformed: f.malformed.get_or_create_owned(&device_only),
            upstream_failures: f.upstream_failures.get_or_create_owned(&proxy),
        })
    }

    /// A session opened.
    pub fn opened(&self) {
        self.opened.inc();
        self.active.inc();
    }

    /// A session ended after moving these bytes.
    pub fn closed(&self, sent: u64, received: u64) {
        self.active.dec();
        self.sent.inc_by(sent);
        self.received.inc_by(received);
    }

    /// A connection turned away, `reason` one of [`REFUSALS`].
    pub fn session_refused(&self, reason: &str) {
        if let Some(i) = REFUSALS.iter().position(|r| *r == reason) {
            self.refused[i].inc();
        }
    }

    /// A Modbus request refused by policy.
    pub fn modbus_refused(&self) {
        self.modbus_refused.inc();
    }

    /// A session closed for a malformed frame.
    pub fn malformed(&self) {
        self.malformed.inc();
    }

    /// A failed connect to the upstream (or a back-off refusal).
    pub fn upstream_failure(&self) {
        self.upstream_failures.inc();
    }
}
