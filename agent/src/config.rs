//! `agent.toml`: what `agent run` needs to attest its node and serve the Workload API.
//!
//! ```toml
//! server = "https://127.0.0.1:8444"   # the issuer's agent API
//! trust_bundle = "ca.pem"             # the plant root CA (PEM), e.g. ca.pem from `agent enroll`
//! trust_domain = "plant.example"
//! state_dir = "/var/lib/plant-agent"  # node SVID + key (0600), status.json
//! socket = "/run/plant-agent/workload.sock"  # else SPIFFE_ENDPOINT_SOCKET, else this default
//! sync_interval = "5s"
//! metrics_listen = "127.0.0.1:9091"  # Prometheus GET /metrics, plain HTTP; absent: none
//!
//! [attestation]
//! method = "join_token"               # or "x509pop", "tpm"
//! join_token_file = "join.token"      # or join_token = "…"
//! # x509pop: certificate = "cert.pem", key = "key.pem" | "key.ref" | "tpm:…"
//! # tpm:     tcti = "swtpm:host=127.0.0.1,port=2321"
//! ```
//!
//! Relative paths are relative to the directory of the config file, so a config and its
//! files can move together. Every error names the key to fix; the binary exits 64 for them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::TrustDomain;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::socket_address::SocketAddress;
use crate::Error;

/// The environment variable SPIFFE clients and servers read the Workload API address from
/// (SPIFFE_Workload_Endpoint.md §4).
pub const SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Where the Workload API listens when neither the config nor the environment says.
pub const DEFAULT_SOCKET: &str = "/run/plant-agent/workload.sock";

/// How often entries are synced when the config does not say.
const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// The validated configuration of `agent run`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The config file itself, for messages.
    pub path: PathBuf,
    /// The issuer's agent API, `https://host:port`.
    pub server: String,
    /// The plant root CA(s) the issuer's certificate must chain to (PEM file).
    pub trust_bundle: PathBuf,
    /// The trust domain the agent's identities belong to.
    pub trust_domain: TrustDomain,
    /// Where the node SVID, its key and status.json live.
    pub state_dir: PathBuf,
    /// The Workload API's Unix socket.
    pub socket: PathBuf,
    /// How often entries are synced with the issuer.
    pub sync_interval: Duration,
    /// Where Prometheus `/metrics` is served (plain HTTP); `None` = not at all.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How the node proves its identity.
    pub attestation: AttestationConfig,
    /// Legacy devices this agent proxies for.
    pub proxy: crate::proxy::config::ProxyConfig,
}

/// The `[attestation]` table: one node attestation method and what it needs.
#[derive(Clone)]
#[non_exhaustive]
pub enum AttestationConfig {
    /// A one-time token from `issuer token create --kind join`.
    JoinToken {
        /// The token (from `join_token` or the first line of `join_token_file`).
        token: Zeroizing<String>,
    },
    /// Proof of possession of a device certificate from EST enrollment.
    X509Pop {
        /// The device certificate (PEM; `chain.pem` beside it is sent along when present).
        certificate: PathBuf,
        /// The device key: `key.pem`, a `key.ref` file, or a key reference (`tpm:…`).
        key: DeviceKey,
    },
    /// TPM 2.0 credential activation (`agent::node::tpm`, wired by the integrator).
    Tpm {
        /// The TCTI of the TPM, e.g. `device:/dev/tpmrm0`; `None` = `PLANT_TPM_TCTI` or the
        /// default device.
        tcti: Option<String>,
    },
}

impl std::fmt::Debug for AttestationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::JoinToken { .. } => f.write_str("JoinToken(<redacted>)"),
            Self::X509Pop { certificate, key } => f
                .debug_struct("X509Pop")
                .field("certificate", certificate)
                .field("key", key)
                .finish(),
            Self::Tpm { tcti } => f.debug_struct("Tpm").field("tcti", tcti).finish(),
        }
    }
}

impl AttestationConfig {
    /// The method name as in the node's SPIFFE ID.
    pub fn method(&self) -> &'static str {
        match self {
            Self::JoinToken { .. } => "join_token",
            Self::X509Pop { .. } => "x509pop",
            Self::Tpm { .. } => "tpm",
        }
    }
}

/// Where the x509pop device key is.
#[derive(Debug, Clone)]
pub enum DeviceKey {
    /// A PKCS#8 PEM file (mode 0600).
    Pem(PathBuf),
    /// A key in a TPM or PKCS#11 token (relative paths in it already resolved).
    Reference(hsm::KeyRef),
}

impl DeviceKey {
    /// Opens the key for signing.
    pub fn open(&self) -> Result<std::sync::Arc<dyn hsm::Signer>, Error> {
        match self {
            Self::Pem(path) => Ok(std::sync::Arc::new(hsm::SoftKey::open(path)?)),
            Self::Reference(reference) => Ok(hsm::open(reference)?),
        }
    }
}

/// agent.toml as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: String,
    trust_bundle: PathBuf,
    trust_domain: String,
    state_dir: PathBuf,
    socket: Option<String>,
    sync_interval: Option<String>,
    metrics_listen: Option<String>,
    attestation: RawAttestation,
    #[serde(default)]
    proxy: crate::proxy::config::RawProxy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    method: String,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    certificate: Option<PathBuf>,
    key: Option<String>,
    tcti: Option<String>,
}

impl std::fmt::Debug for RawAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawAttestation")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// Reads and validates `path`; the socket falls back to `SPIFFE_ENDPOINT_SOCKET`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_owned(),
            key: "(file)".into(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text, std::env::var(SOCKET_ENV).ok().as_deref())
    }

    /// Validates the text of a config file at `path`; `socket_env` is the value of
    /// `SPIFFE_ENDPOINT_SOCKET`, used when the file has no `socket`.
    pub fn parse(path: &Path, text: &str, socket_env: Option<&str>) -> Result<Self, Error> {
        let bad = |key: &str, message: String| Error::Config {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the key and shows the line.
            bad(
                "(syntax)",
                e.message().to_owned() + &span_line(text, e.span()),
            )
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let base = std::path::absolute(&base).map_err(|e| bad("(file)", e.to_string()))?;
        let resolve = |p: &Path| base.join(p);

        let server = raw.server.trim().to_owned();
        if !server.starts_with("https://") || server.len() <= "https://".len() {
            return Err(bad(
                "server",
                format!("{server:?} must be an https:// URL of the issuer's agent API"),
            ));
        }
        let trust_domain = TrustDomain::new(raw.trust_domain.trim())
            .map_err(|e| bad("trust_domain", e.to_string()))?;
        let socket = match (raw.socket.as_deref(), socket_env) {
            (Some(text), _) => SocketAddress::parse(text)
                .map_err(|e| bad("socket", e))?
                .resolve(&base),
            (None, Some(env)) if !env.is_empty() => SocketAddress::parse(env)
                .map_err(|e| bad(SOCKET_ENV, e))?
                .resolve(&base),
            _ => PathBuf::from(DEFAULT_SOCKET),
        };
        let sync_interval = match raw.sync_interval.as_deref() {
            Some(text) => parse_duration(text).map_err(|e| bad("sync_interval", e))?,
            None => DEFAULT_SYNC_INTERVAL,
        };
        let metrics_listen = match raw.metrics_listen.as_deref() {
            Some(text) => Some(text.trim().parse().map_err(|e| {
                bad(
                    "metrics_listen",
                    format!("{text:?} is not an address and port like 127.0.0.1:9091: {e}"),
                )
            })?),
            None => None,
        };
        let attestation = attestation(raw.attestation, &base, &bad)?;
        let proxy = crate::proxy::config::parse(raw.proxy, &bad)?;
        Ok(Self {
            path: path.to_owned(),
            server,
            trust_bundle: resolve(&raw.trust_bundle),
            trust_domain,
            state_dir: resolve(&raw.state_dir),
            socket,
            sync_interval,
            metrics_listen,
            attestation,
            proxy,
        })
    }
}

fn attestation(
    raw: RawAttestation,
    base: &Path,
    bad: &dyn Fn(&str, String) -> Error,
) -> Result<AttestationConfig, Error> {
    let unused = |keys: &[(&str, bool)]| -> Result<(), Error> {
        match keys.iter().find(|(_, present)| *present) {
            Some((key, _)) => Err(bad(
                &format!("attestation.{key}"),
                format!("does not apply to method {:?}", raw.method),
            )),
            None => Ok(()),
        }
    };
    match raw.method.as_str() {
        "join_token" => {
            unused(&[
                ("certificate", raw.certificate.is_some()),
                ("key", raw.key.is_some()),
                ("tcti", raw.tcti.is_some()),
            ])?;
            let token = match (&raw.join_token, &raw.join_token_file) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "attestation.join_token",
                        "give join_token or join_token_file, not both".into(),
                    ))
                }
                (Some(token), None) => Zeroizing::new(token.trim().to_owned()),
                (None, Some(file)) => {
                    let file = base.join(file);
                    let text = Zeroizing::new(std::fs::read_to_string(&file).map_err(|e| {
                        bad(
                            "attestation.join_token_file",
                            format!("{}: {e}", file.display()),
                        )
                    })?);
                    Zeroizing::new(text.lines().next().unwrap_or_default().trim().to_owned())
                }
                (None, None) => {
                    return Err(bad(
                        "attestation.join_token",
                        "method join_token needs join_token or join_token_file (from `issuer token create --kind join`)".into(),
                    ))
                }
            };
            if token.is_empty() {
                return Err(bad("attestation.join_token", "the token is empty".into()));
            }
            Ok(AttestationConfig::JoinToken { token })
        }
        "x509pop" => {
            unused(&[
                ("join_token", raw.join_token.is_some()),
                ("join_token_file", raw.join_token_file.is_some()),
                ("tcti", raw.tcti.is_some()),
            ])?;
            let certificate = base.join(raw.certificate.ok_or_else(|| {
                bad(
                    "attestation.certificate",
                    "method x509pop needs the device certificate (cert.pem from `agent enroll`)"
                        .into(),
                )
            })?);
            let dir = certificate
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| base.to_owned());
            let key = match raw.key.as_deref() {
                Some(text) => device_key(text, base).map_err(|e| bad("attestation.key", e))?,
                // As `agent reenroll`: key.ref beside the certificate, else key.pem.
                None if dir.join(crate::pem_files::KEY_REF_FILE).exists() => device_key(
                    &dir.join(crate::pem_files::KEY_REF_FILE).to_string_lossy(),
                    base,
                )
                .map_err(|e| bad("attestation.key", e))?,
                None => DeviceKey::Pem(dir.join(crate::pem_files::KEY_FILE)),
            };
            Ok(AttestationConfig::X509Pop { certificate, key })
        }
        "tpm" => {
            unused(&[
                ("join_token", raw.join_token.is_some()),
                ("join_token_file", raw.join_token_file.is_some()),
                ("certificate", raw.certificate.is_some()),
                ("key", raw.key.is_some()),
            ])?;
            if let Some(tcti) = &raw.tcti {
                tcti.parse::<hsm::Tcti>()
                    .map_err(|e| bad("attestation.tcti", e.to_string()))?;
            }
            Ok(AttestationConfig::Tpm { tcti: raw.tcti })
        }
        other => Err(bad(
            "attestation.method",
            format!("unknown method {other:?}: use \"join_token\", \"x509pop\" or \"tpm\""),
        )),
    }
}

/// `key = …`: a key reference (`tpm:…`, `pkcs11:…`, `soft:…`), a `*.ref` file holding one, or
/// a PEM key file.
fn device_key(text: &str, base: &Path) -> Result<DeviceKey, String> {
    if ["tpm:", "pkcs11:", "soft:"]
        .iter()
        .any(|scheme| text.starts_with(scheme))
    {
        let reference: hsm::KeyRef = text.parse().map_err(|e| format!("{e}"))?;
        return Ok(DeviceKey::Reference(reference.with_base_dir(base)));
    }
    let path = base.join(text);
    if path.extension().is_some_and(|e| e == "ref") {
        return crate::pem_files::read_key_ref(&path)
            .map(DeviceKey::Reference)
            .map_err(|e| e.to_string());
    }
    Ok(DeviceKey::Pem(path))
}

/// Longest interval or timeout accepted: a year.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`: a positive duration, at most a year.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like \"5s\", \"500ms\" or \"2m\""))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{text:?} has no unit: write e.g. \"5s\", \"500ms\" or \"2m\""
            ))
        }
    };
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    // The agent adds these to `Instant::now()`, which panics past its range.
    if duration > MAX_DURATION {
        return Err(format!(
            "{text:?} is too long; the longest is 8760h (a year)"
        ));
    }
    Ok(duration)
}

/// The line a toml error points at, so the message shows what is wrong where.
fn span_line(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let line = text
        .get(..span.start)
        .map(|before| before.matches('\n').count() + 1)
        .unwrap_or(0);
    format!(" (line {line})")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
server = "https://127.0.0.1:8444"
trust_bundle = "ca.pem"
trust_domain = "plant.example"
state_dir = "state"
socket = "unix:///run/x/workload.sock"
sync_interval = "2s"
[attestation]
method = "join_token"
join_token = "tok"
"#;

    fn parse(text: &str) -> Result<AgentConfig, Error> {
        AgentConfig::parse(Path::new("/etc/plant/agent.toml"), text, None)
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.trust_bundle, Path::new("/etc/plant/ca.pem"));
        assert_eq!(config.state_dir, Path::new("/etc/plant/state"));
        assert_eq!(config.socket, Path::new("/run/x/workload.sock"));
        assert_eq!(config.sync_interval, Duration::from_secs(2));
        assert_eq!(config.attestation.method(), "join_token");
        assert!(!format!("{config:?}").contains("tok\""), "token redacted");
    }

    #[test]
    fn metrics_listen_is_optional_and_must_be_an_address_and_port() {
        assert_eq!(parse(GOOD).expect("valid").metrics_listen, None);
        let with = |value: &str| {
            parse(&GOOD.replace(
                "[attestation]",
                &format!("metrics_listen = \"{value}\"\n[attestation]"),
            ))
        };
        let config = with("127.0.0.1:9091").expect("valid");
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9091".parse().expect("address"))
        );
        let error = with("localhost").expect_err("no port").to_string();
        assert!(error.contains("metrics_listen"), "{error}");
    }

    #[test]
    fn socket_comes_from_the_environment_when_the_file_has_none() {
        let text = GOOD.replace("socket = \"unix:///run/x/workload.sock\"\n", "");
        let config = AgentConfig::parse(
            Path::new("/etc/plant/agent.toml"),
            &text,
            Some("unix:/tmp/api.sock"),
        )
        .expect("valid");
        assert_eq!(config.socket, Path::new("/tmp/api.sock"));
        let config = parse(&text).expect("valid");
        assert_eq!(config.socket, Path::new(DEFAULT_SOCKET));
    }

    #[test]
    fn errors_name_the_key_to_fix() {
        let cases = [
            (GOOD.replace("https://", "http://"), "server"),
            (GOOD.replace("plant.example", "Plant"), "trust_domain"),
            (GOOD.replace("\"2s\"", "\"2\""), "sync_interval"),
            (
                GOOD.replace("join_token\"", "magic\""),
                "attestation.method",
            ),
            (
                GOOD.replace("join_token = \"tok\"", ""),
                "attestation.join_token",
            ),
            (
                GOOD.replace("join_token = \"tok\"", "join_token = \"tok\"\ntcti = \"x\""),
                "attestation.tcti",
            ),
            (GOOD.replace("unix:///run", "tcp://run"), "socket"),
            (
                GOOD.replace(
                    "method = \"join_token\"\njoin_token = \"tok\"",
                    "method = \"tpm\"\ntcti = \"carrier-pigeon\"",
                ),
                "attestation.tcti",
            ),
            (GOOD.replace("state_dir", "statedir"), "(syntax)"),
        ];
        for (text, key) in cases {
            let error = parse(&text).expect_err(key);
            assert!(error.is_usage(), "{error}");
            let Error::Config { key: named, .. } = &error else {
                panic!("{error}");
            };
            assert_eq!(named, key, "{error}");
        }
    }

    #[test]
    fn x509pop_finds_the_key_beside_the_certificate() {
        let text = GOOD.replace(
            "method = \"join_token\"\njoin_token = \"tok\"",
            "method = \"x509pop\"\ncertificate = \"device/cert.pem\"",
        );
        let config = parse(&text).expect("valid");
        let AttestationConfig::X509Pop { certificate, key } = config.attestation else {
            panic!("x509pop");
        };
        assert_eq!(certificate, Path::new("/etc/plant/device/cert.pem"));
        let DeviceKey::Pem(key) = key else {
            panic!("pem key")
        };
        assert_eq!(key, Path::new("/etc/plant/device/key.pem"));
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(
            parse_duration("8760h"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert!(parse_duration("8761h").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
    }
}
