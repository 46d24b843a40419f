//! The `[[proxy.inbound]]` and `[[proxy.outbound]]` tables of agent.toml: one per legacy
//! device this agent holds an identity for.

use std::net::SocketAddr;
use std::time::Duration;

use proto::SpiffeId;
use serde::Deserialize;

use super::listener::Limits;
use super::modbus::Access;
use crate::daemon::config::parse_duration;

/// How long connecting to the PLC (or the remote gateway) may take by default.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Open sessions per device by default: more than a plant's SCADA, historians and HMIs
/// together, few enough that a runaway client cannot exhaust the gateway.
const DEFAULT_MAX_SESSIONS: usize = 256;
/// Connections in their TLS handshake per device by default; the oldest is shed beyond.
const DEFAULT_MAX_PENDING: usize = 512;
/// Of those, from one IP address by default: a flooding source sheds its own connections
/// before anyone else's, and a client gateway agent's burst (hundreds of legacy clients
/// reconnecting at once, all from its one address) still fits.
const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 256;
/// A session with no bytes either way for this long is closed by default: SCADA polls every
/// few seconds, so ten minutes of silence is a client that is gone.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Every proxy of this agent.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// PLCs behind this gateway.
    pub inbound: Vec<Inbound>,
    /// Legacy clients on this machine.
    pub outbound: Vec<Outbound>,
}

impl ProxyConfig {
    /// Whether no proxy is configured.
    pub fn is_empty(&self) -> bool {
        self.inbound.is_empty() && self.outbound.is_empty()
    }
}

/// What the inbound proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Bytes as they come.
    Tcp,
    /// Modbus/TCP frames, each request's function code checked against the peer's access.
    Modbus,
}

/// A peer the inbound proxy lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Which SPIFFE IDs.
    pub peers: Peers,
    /// What they may do (Modbus only).
    pub access: Access,
}

/// One SPIFFE ID or everything under a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// This ID and every ID below it, segment-wise.
    Prefix(SpiffeId),
}

impl Peers {
    fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(allowed) => allowed == id,
            Self::Prefix(prefix) => id.is_under(prefix),
        }
    }
}

/// The allow list of an inbound proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList(pub Vec<AllowRule>);

impl AllowList {
    /// The access `peer` gets, or `None` if it is not allowed. An exact rule wins over a
    /// prefix; among prefixes, the first that matches.
    pub fn access(&self, peer: &SpiffeId) -> Option<Access> {
        let exact = self
            .0
            .iter()
            .find(|r| matches!(&r.peers, Peers::Exact(id) if id == peer));
        exact
            .or_else(|| self.0.iter().find(|r| r.peers.matches(peer)))
            .map(|r| r.access)
    }
}

/// A PLC this gateway stands in front of.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The device name; its entry's selector is `legacy:device:<name>`.
    pub device: String,
    /// The identity held for it.
    pub spiffe_id: SpiffeId,
    /// Where peers connect (mTLS).
    pub listen: SocketAddr,
    /// The PLC, `host:port`.
    pub upstream: String,
    /// What is forwarded.
    pub protocol: Protocol,
    /// Who may connect.
    pub allow: AllowList,
    /// Connecting to the PLC.
    pub connect_timeout: Duration,
    /// Sessions and pending handshakes at most.
    pub limits: Limits,
    /// A session idle this long is closed.
    pub idle_timeout: Duration,
}

/// A legacy client on this machine that reaches a remote gateway through this agent.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The device name; its entry's selector is `legacy:device:<name>`.
    pub device: String,
    /// The identity the client gets.
    pub spiffe_id: SpiffeId,
    /// Where the client connects (plain TCP; keep it on loopback).
    pub listen: SocketAddr,
    /// The remote gateway's inbound proxy, `host:port`.
    pub gateway: String,
    /// Who the gateway must be.
    pub server_spiffe_id: SpiffeId,
    /// Connecting to the gateway.
    pub connect_timeout: Duration,
    /// Sessions and pending handshakes at most.
    pub limits: Limits,
    /// A session idle this long is closed.
    pub idle_timeout: Duration,
}

/// `[proxy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    #[serde(default)]
    inbound: Vec<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    device: String,
    spiffe_id: String,
    listen: String,
    upstream: String,
    protocol: Option<String>,
    #[serde(default)]
    allow: Vec<RawAllow>,
    connect_timeout: Option<String>,
    max_sessions: Option<usize>,
    max_pending_handshakes: Option<usize>,
    max_pending_per_source: Option<usize>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    spiffe_id: Option<String>,
    prefix: Option<String>,
    access: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    device: String,
    spiffe_id: String,
    listen: String,
    gateway: String,
    server_spiffe_id: String,
    connect_timeout: Option<String>,
    max_sessions: Option<usize>,
    max_pending_handshakes: Option<usize>,
    max_pending_per_source: Option<usize>,
    idle_timeout: Option<String>,
}

/// Validates `[proxy]`; `bad(key, message)` makes the error naming the key to fix.
pub(crate) fn parse<E>(raw: RawProxy, bad: &dyn Fn(&str, String) -> E) -> Result<ProxyConfig, E> {
    let mut names = Vec::new();
    let mut listens = Vec::new();
    let mut common = |table: &str,
                      device: &str,
                      spiffe_id: &str,
                      listen: &str,
                      timeouts: [Option<&str>; 2],
                      max: [Option<usize>; 3]|
     -> Result<(SpiffeId, SocketAddr, Duration, Limits, Duration), E> {
        let key = |k: &str| format!("{table}.{k}");
        proto::check_device_name(device).map_err(|e| bad(&key("device"), e))?;
        if names.iter().any(|n: &String| n == device) {
            return Err(bad(
                &key("device"),
                format!("{device:?} is declared twice; each legacy device has one proxy"),
            ));
        }
        names.push(device.to_owned());
        let key = |k: &str| format!("{table}.{k} (device {device})");
        let spiffe_id =
            SpiffeId::new(spiffe_id.trim()).map_err(|e| bad(&key("spiffe_id"), e.to_string()))?;
        let listen: SocketAddr = listen.trim().parse().map_err(|e| {
            bad(
                &key("listen"),
                format!("{listen:?} is not an address and port like 0.0.0.0:8502: {e}"),
            )
        })?;
        if listen.port() != 0 && listens.contains(&listen) {
            return Err(bad(
                &key("listen"),
                format!("{listen} is used by another proxy"),
            ));
        }
        listens.push(listen);
        let [connect_timeout, idle_timeout] = timeouts;
        let timeout = match connect_timeout {
            Some(text) => parse_duration(text).map_err(|e| bad(&key("connect_timeout"), e))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let idle_timeout = match idle_timeout {
            Some(text) => parse_duration(text).map_err(|e| bad(&key("idle_timeout"), e))?,
            None => DEFAULT_IDLE_TIMEOUT,
        };
        if idle_timeout < Duration::from_secs(1) {
            return Err(bad(
                &key("idle_timeout"),
                "must be at least 1s (SCADA polls every few seconds; the default is 10m)".into(),
            ));
        }
        let count = |name: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(bad(&key(name), "must be at least 1".into())),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        let [sessions, pending, per_source] = max;
        let limits = Limits {
            max_sessions: count("max_sessions", sessions, DEFAULT_MAX_SESSIONS)?,
            max_pending: count("max_pending_handshakes", pending, DEFAULT_MAX_PENDING)?,
            max_pending_per_source: count(
                "max_pending_per_source",
                per_source,
                DEFAULT_MAX_PENDING_PER_SOURCE,
            )?,
        };
        if limits.max_pending_per_source > limits.max_pending {
            return Err(bad(
                &key("max_pending_per_source"),
                format!(
                    "{} is above max_pending_handshakes ({}): one source could then shed everyone else's handshakes",
                    limits.max_pending_per_source, limits.max_pending
                ),
            ));
        }
        Ok((spiffe_id, listen, timeout, limits, idle_timeout))
    };

    let mut config = ProxyConfig::default();
    for raw in raw.inbound {
        let (spiffe_id, listen, connect_timeout, limits, idle_timeout) = common(
            "proxy.inbound",
            &raw.device,
            &raw.spiffe_id,
            &raw.listen,
            [raw.connect_timeout.as_deref(), raw.idle_timeout.as_deref()],
            [
                raw.max_sessions,
                raw.max_pending_handshakes,
                raw.max_pending_per_source,
            ],
        )?;
        let key = |k: &str| format!("proxy.inbound.{k} (device {})", raw.device);
        let upstream = host_port(&raw.upstream).map_err(|e| bad(&key("upstream"), e))?;
        let protocol = match raw.protocol.as_deref().map(str::trim) {
            None | Some("tcp") => Protocol::Tcp,
            Some("modbus") => Protocol::Modbus,
            Some(other) => {
                return Err(bad(
                    &key("protocol"),
                    format!("{other:?} is not a protocol: use \"modbus\" (function codes checked) or \"tcp\" (bytes forwarded as they are)"),
                ))
            }
        };
        if raw.allow.is_empty() {
            return Err(bad(
                &key("allow"),
                "no peer is allowed: list them, e.g. allow = [{ spiffe_id = \"spiffe://plant.example/scada/hmi-1\", access = \"read-write\" }]".into(),
            ));
        }
        let mut rules = Vec::with_capacity(raw.allow.len());
        for allow in raw.allow {
            let peers = match (allow.spiffe_id, allow.prefix) {
                (Some(id), None) => Peers::Exact(
                    SpiffeId::new(id.trim()).map_err(|e| bad(&key("allow.spiffe_id"), e.to_string()))?,
                ),
                (None, Some(prefix)) => Peers::Prefix(
                    SpiffeId::new(prefix.trim().trim_end_matches('/'))
                        .map_err(|e| bad(&key("allow.prefix"), e.to_string()))?,
                ),
                _ => {
                    return Err(bad(
                        &key("allow"),
                        "each rule has either spiffe_id (one peer) or prefix (every ID under a path), not both".into(),
                    ))
                }
            };
            let access = match (allow.access.as_deref(), protocol) {
                (None, _) => Access::ReadOnly,
                (Some(text), Protocol::Modbus) => {
                    Access::parse(text.trim()).map_err(|e| bad(&key("allow.access"), e))?
                }
                (Some(_), Protocol::Tcp) => {
                    return Err(bad(
                        &key("allow.access"),
                        "access applies to protocol = \"modbus\"; a tcp proxy forwards bytes it cannot judge".into(),
                    ))
                }
            };
            rules.push(AllowRule { peers, access });
        }
        config.inbound.push(Inbound {
            device: raw.device,
            spiffe_id,
            listen,
            upstream,
            protocol,
            allow: AllowList(rules),
            connect_timeout,
            limits,
            idle_timeout,
        });
    }
    for raw in raw.outbound {
        let (spiffe_id, listen, connect_timeout, mut limits, idle_timeout) = common(
            "proxy.outbound",
            &raw.device,
            &raw.spiffe_id,
            &raw.listen,
            [raw.connect_timeout.as_deref(), raw.idle_timeout.as_deref()],
            [
                raw.max_sessions,
                raw.max_pending_handshakes,
                raw.max_pending_per_source,
            ],
        )?;
        if raw.max_pending_per_source.is_none() {
            // The legacy clients are local: one address, no per-source share to keep.
            limits.max_pending_per_source = limits.max_pending;
        }
        let key = |k: &str| format!("proxy.outbound.{k} (device {})", raw.device);
        let gateway = host_port(&raw.gateway).map_err(|e| bad(&key("gateway"), e))?;
        let server_spiffe_id = SpiffeId::new(raw.server_spiffe_id.trim())
            .map_err(|e| bad(&key("server_spiffe_id"), e.to_string()))?;
        if !listen.ip().is_loopback() {
            tracing::warn!(device = raw.device, %listen, "an outbound proxy accepts plain TCP from anyone who can reach {listen}; keep it on loopback unless the legacy client is on a trusted wire");
        }
        config.outbound.push(Outbound {
            device: raw.device,
            spiffe_id,
            listen,
            gateway,
            server_spiffe_id,
            connect_timeout,
            limits,
            idle_timeout,
        });
    }
    Ok(config)
}

/// `host:port`, checked for the port (the host is resolved at each connect, so a PLC's DNS
/// name may change).
fn host_port(text: &str) -> Result<String, String> {
    let text = text.trim();
    let port = text
        .rsplit_once(':')
        .and_then(|(host, port)| (!host.is_empty()).then_some(port))
        .ok_or_else(|| format!("{text:?} is not host:port, e.g. 192.168.7.20:502"))?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(text.to_owned()),
        _ => Err(format!("{text:?}: {port:?} is not a port (1-65535)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<ProxyConfig, String> {
        let raw: RawProxy = toml::from_str(text).map_err(|e| e.to_string())?;
        parse(raw, &|key, message| format!("{key}: {message}"))
    }

    const PRESS: &str = r#"
[[inbound]]
device = "press-7"
spiffe_id = "spiffe://plant.example/plc/press-7"
listen = "0.0.0.0:8502"
upstream = "192.168.7.20:502"
protocol = "modbus"
allow = [
  { spiffe_id = "spiffe://plant.example/scada/hmi-1", access = "read-write" },
  { prefix = "spiffe://plant.example/scada/", access = "read-only" },
  { prefix = "spiffe://plant.example/historian" },
]

[[outbound]]
device = "hmi-1"
spiffe_id = "spiffe://plant.example/scada/hmi-1"
listen = "127.0.0.1:1502"
gateway = "gw7.plant.example:8502"
server_spiffe_id = "spiffe://plant.example/plc/press-7"
connect_timeout = "500ms"
"#;

    fn id(text: &str) -> SpiffeId {
        SpiffeId::new(text).expect(text)
    }

    #[test]
    fn a_plant_config_reads_as_written() {
        let config = parse_text(PRESS).expect("valid");
        let press = &config.inbound[0];
        assert_eq!(press.protocol, Protocol::Modbus);
        assert_eq!(press.upstream, "192.168.7.20:502");
        assert_eq!(press.limits.max_sessions, DEFAULT_MAX_SESSIONS);
        assert_eq!(press.limits.max_pending, DEFAULT_MAX_PENDING);
        assert_eq!(
            press.limits.max_pending_per_source,
            DEFAULT_MAX_PENDING_PER_SOURCE
        );
        assert_eq!(press.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let access = |peer: &str| press.allow.access(&id(peer));
        assert_eq!(
            access("spiffe://plant.example/scada/hmi-1"),
            Some(Access::ReadWrite)
        );
        assert_eq!(
            access("spiffe://plant.example/scada/hmi-2"),
            Some(Access::ReadOnly)
        );
        assert_eq!(
            access("spiffe://plant.example/historian/a"),
            Some(Access::ReadOnly)
        );
        assert_eq!(access("spiffe://plant.example/historianx"), None);
        assert_eq!(access("spiffe://other.example/scada/hmi-1"), None);
        let hmi = &config.outbound[0];
        assert_eq!(hmi.connect_timeout, Duration::from_millis(500));
        assert_eq!(
            hmi.server_spiffe_id,
            id("spiffe://plant.example/plc/press-7")
        );
    }

    #[test]
    fn mistakes_name_the_key_to_fix() {
        let cases = [
            (PRESS.replace("press-7\"\nspiffe", "press 7\"\nspiffe"), "proxy.inbound.device"),
            (PRESS.replace("192.168.7.20:502", "192.168.7.20"), "upstream"),
            (PRESS.replace("\"modbus\"", "\"modbus-rtu\""), "protocol"),
            (PRESS.replace("\"read-write\"", "\"rw\""), "allow.access"),
            (PRESS.replace("\"modbus\"", "\"tcp\""), "applies to protocol"),
            (PRESS.replace("0.0.0.0:8502", "8502"), "listen"),
            (PRESS.replace("hmi-1\"\nspiffe_id", "press-7\"\nspiffe_id"), "declared twice"),
            (PRESS.replace("500ms", "fast"), "connect_timeout"),
            (PRESS.replace("connect_timeout = \"500ms\"", "idle_timeout = \"10ms\""), "idle_timeout"),
            (PRESS.replace("connect_timeout = \"500ms\"", "max_pending_handshakes = 8\nmax_pending_per_source = 9"), "one source could then shed"),
            (PRESS.replace("connect_timeout = \"500ms\"", "max_pending_handshakes = 0"), "max_pending_handshakes"),
            (PRESS.replace("{ prefix = \"spiffe://plant.example/historian\" }", "{ spiffe_id = \"spiffe://plant.example/a\", prefix = \"spiffe://plant.example/b\" }"), "not both"),
        ];
        for (text, expected) in cases {
            let error = parse_text(&text).expect_err(expected);
            assert!(
                error.contains(expected),
                "{error} should mention {expected}"
            );
        }
        let no_allow = PRESS.replace(
            "allow = [\n  { spiffe_id = \"spiffe://plant.example/scada/hmi-1\", access = \"read-write\" },\n  { prefix = \"spiffe://plant.example/scada/\", access = \"read-only\" },\n  { prefix = \"spiffe://plant.example/historian\" },\n]",
            "",
        );
        assert!(parse_text(&no_allow)
            .expect_err("no allow")
            .contains("no peer is allowed"));
    }
}
