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
//! # tpm:     tcti = "swtpm:host=127.0.0.1,port=2321", ek = "auto" (or "rsa", "ecc")
//! ```
//!
//! Relative paths are relative to the directory of the config file, so a config and its
//! files can move together. Every error names the key to fix; the binary exits 64 for them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::TrustDomain;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::daemon::socket_address::SocketAddress;
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
    pub proxy: crate::daemon::proxy::config::ProxyConfig,
}

/// The `[attestation]` table: one node attestation method and what it needs.
#[derive(Clone)]
#[non_exhaustive]
pub enum AttestationConfig {
    /// A one-time token from `issuer token create --kind join`.
    JoinToken {
        /// Where the token is (`join_token` or `join_token_file`).
        token: JoinToken,
    },
    /// Proof of possession of a device certificate from EST enrollment.
    X509Pop {
        /// The device certificate (PEM; `chain.pem` beside it is sent along when present).
        certificate: PathBuf,
        /// The device key: `key.pem`, a `key.ref` file, or a key reference (`tpm:…`).
        key: DeviceKey,
    },
    /// TPM 2.0 credential activation (`agent::daemon::node::tpm`; needs the `tpm` feature).
    Tpm {
        /// The TCTI of the TPM, e.g. `device:/dev/tpmrm0`; `None` = `PLANT_TPM_TCTI` or the
        /// default device.
        tcti: Option<String>,
        /// Which endorsement key: RSA if certified, else ECC (`auto`), or one of them.
        ek: hsm::EndorsementKind,
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
            Self::Tpm { tcti, ek } => f
                .debug_struct("Tpm")
                .field("tcti", tcti)
                .field("ek", ek)
                .finish(),
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

/// Where a join token comes from. A token file is read only when the node attests, which is
/// when it has no cached node identity: the token is spent after the first attestation, so
/// a restart must work after its file is gone.
#[derive(Clone)]
pub enum JoinToken {
    /// `join_token = "…"` (checked to be non-empty).
    Inline(Zeroizing<String>),
    /// `join_token_file = "…"`: its first line.
    File {
        /// The token file, resolved against the config's directory.
        path: PathBuf,
        /// agent.toml, for messages.
        config: PathBuf,
    },
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(<redacted>)"),
            Self::File { path, .. } => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl JoinToken {
    /// The token, for a node with no cached identity; a missing or empty file is a config
    /// error that says how to get a token.
    pub fn read(&self) -> Result<Zeroizing<String>, Error> {
        let (path, config) = match self {
            Self::Inline(token) => return Ok(token.clone()),
            Self::File { path, config } => (path, config),
        };
        let bad = |message: String| Error::Config {
            path: config.clone(),
            key: "attestation.join_token_file".into(),
            message,
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                bad(format!(
                    "no cached node identity and join_token_file {} does not exist: create a token with `issuer token create --kind join` on the issuer, write it to that file and start the agent again",
                    path.display()
                ))
            } else {
                bad(format!("{}: {e}", path.display()))
            }
        })?);
        let token = Zeroizing::new(text.lines().next().unwrap_or_default().trim().to_owned());
        if token.is_empty() {
            return Err(bad(format!(
                "{} is empty: write the token from `issuer token create --kind join` to it",
                path.display()
            )));
        }
        Ok(token)
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
    proxy: crate::daemon::proxy::config::RawProxy,
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
    ek: Option<String>,
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
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigFile {
            path: path.to_owned(),
            source,
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
            let (key, message) = toml_error(text, &e);
            bad(&key, message)
        })?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let base = std::path::absolute(&base).map_err(|source| Error::ConfigFile {
            path: path.to_owned(),
            source,
        })?;
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
        let attestation = attestation(raw.attestation, path, &base, &bad)?;
        let proxy = crate::daemon::proxy::config::parse(raw.proxy, &bad)?;
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
    config: &Path,
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
                ("ek", raw.ek.is_some()),
            ])?;
            let token = match (&raw.join_token, &raw.join_token_file) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "attestation.join_token",
                        "give join_token or join_token_file, not both".into(),
                    ))
                }
                (Some(token), None) => {
                    let token = Zeroizing::new(token.trim().to_owned());
                    if token.is_empty() {
                        return Err(bad("attestation.join_token", "the token is empty".into()));
                    }
                    JoinToken::Inline(token)
                }
                // Read when the node attests, not here (see `JoinToken`).
                (None, Some(file)) => JoinToken::File {
                    path: base.join(file),
                    config: config.to_owned(),
                },
                (None, None) => {
                    return Err(bad(
                        "attestation.join_token",
                        "method join_token needs join_token or join_token_file (from `issuer token create --kind join`)".into(),
                    ))
                }
            };
            Ok(AttestationConfig::JoinToken { token })
        }
        "x509pop" => {
            unused(&[
                ("join_token", raw.join_token.is_some()),
                ("join_token_file", raw.join_token_file.is_some()),
                ("tcti", raw.tcti.is_some()),
                ("ek", raw.ek.is_some()),
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
            let ek = match raw.ek.as_deref() {
                Some(text) => text.parse().map_err(|e| bad("attestation.ek", e))?,
                None => hsm::EndorsementKind::Auto,
            };
            Ok(AttestationConfig::Tpm { tcti: raw.tcti, ek })
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

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`: a duration in the grammar both binaries share
/// ([`proto::duration`]), positive and at most a year.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = proto::duration::parse(text)?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    // The agent adds these to `Instant::now()`, which panics past its range.
    if duration > MAX_DURATION {
        return Err(format!("{:?} is too long; the longest is 1y", text.trim()));
    }
    Ok(duration)
}

/// The key a toml error is about (`attestation.method`) and the message with its line and
/// column. serde's messages name a missing or unknown field but not its table, and a wrong
/// type not even the field; the span says where, and the text around it which key and table.
/// A plain syntax error has no key: it is named by its line.
fn toml_error(text: &str, error: &toml::de::Error) -> (String, String) {
    let message = error.message().trim_end().to_owned();
    let named =
        backticked(&message, "missing field `").or_else(|| backticked(&message, "unknown field `"));
    let Some(span) = error.span() else {
        return (named.unwrap_or_else(|| "(whole file)".into()), message);
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let at = format!("line {line}, column {column}");
    let line_text = text.lines().nth(line - 1).unwrap_or_default().trim();
    // The table the span is in: the last header at or before its line (a missing field is
    // reported on the table's header itself).
    let table = text
        .lines()
        .take(line)
        .filter_map(table_header)
        .last()
        .unwrap_or_default();
    let field = named.or_else(|| {
        let (key, _) = line_text.split_once('=')?;
        let key = key.trim().trim_matches('"');
        (!key.is_empty() && table_header(line_text).is_none()).then(|| key.to_owned())
    });
    match field {
        Some(field) if table.is_empty() => (field, format!("{message} ({at})")),
        Some(field) => (format!("{table}.{field}"), format!("{message} ({at})")),
        None => (at, message),
    }
}

/// `attestation` for a `[attestation]` line, `proxy.inbound` for `[[proxy.inbound]]`.
fn table_header(line: &str) -> Option<String> {
    let line = line.trim();
    let name = line.strip_prefix('[')?.split(']').next()?;
    Some(name.trim_start_matches('[').trim().to_owned())
}

/// The name between `prefix` and the next backtick in `message`.
fn backticked(message: &str, prefix: &str) -> Option<String> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('`')?].to_owned())
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
    fn a_tpm_node_names_its_endorsement_key_or_takes_rsa_then_ecc() {
        let tpm = |extra: &str| {
            let text = GOOD.replace(
                "method = \"join_token\"\njoin_token = \"tok\"",
                &format!("method = \"tpm\"{extra}"),
            );
            match parse(&text).expect("valid").attestation {
                AttestationConfig::Tpm { ek, .. } => ek,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(tpm(""), hsm::EndorsementKind::Auto);
        assert_eq!(tpm("\nek = \"ecc\""), hsm::EndorsementKind::Ecc);
        assert_eq!(tpm("\nek = \"rsa\""), hsm::EndorsementKind::Rsa);
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
            (
                GOOD.replace(
                    "method = \"join_token\"\njoin_token = \"tok\"",
                    "method = \"tpm\"\nek = \"dsa\"",
                ),
                "attestation.ek",
            ),
            (
                GOOD.replace("join_token = \"tok\"", "join_token = \"tok\"\nek = \"ecc\""),
                "attestation.ek",
            ),
            (GOOD.replace("state_dir", "statedir"), "statedir"),
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
    fn toml_errors_name_the_file_the_table_key_and_the_line() {
        // (edit, key named, line named)
        let cases = [
            // An unknown key, at the top and in a table.
            (
                GOOD.replace("sync_interval", "sync_intervall"),
                "sync_intervall",
                "line 7",
            ),
            (
                GOOD.replace("join_token = \"tok\"", "join_tokn = \"tok\""),
                "attestation.join_tokn",
                "line 10",
            ),
            // A wrong type.
            (
                GOOD.replace("sync_interval = \"2s\"", "sync_interval = 2"),
                "sync_interval",
                "line 7",
            ),
            (
                GOOD.replace("method = \"join_token\"", "method = 5"),
                "attestation.method",
                "line 9",
            ),
            // A missing required key, at the top and in a table.
            (
                GOOD.replace("trust_domain = \"plant.example\"\n", ""),
                "trust_domain",
                "line ",
            ),
            (
                GOOD.replace("method = \"join_token\"\n", ""),
                "attestation.method",
                "line ",
            ),
        ];
        for (text, key, line) in cases {
            let error = parse(&text).expect_err(key);
            assert!(error.is_usage(), "{error}");
            let Error::Config { key: named, .. } = &error else {
                panic!("{error}");
            };
            assert_eq!(named, key, "{error}");
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("/etc/plant/agent.toml: {key}: ")),
                "{message}"
            );
            assert!(message.contains(line), "{message}");
        }
        // A missing table is a missing key too.
        let error =
            parse(GOOD.split("[attestation]").next().expect("top")).expect_err("no attestation");
        let Error::Config { key, .. } = &error else {
            panic!("{error}");
        };
        assert_eq!(key, "attestation", "{error}");
        // Broken syntax in a value names the key; elsewhere the line and column.
        let error = parse(&GOOD.replace("\"2s\"", "\"2s")).expect_err("syntax");
        assert!(
            error
                .to_string()
                .starts_with("/etc/plant/agent.toml: sync_interval: "),
            "{error}"
        );
        let error = parse(&GOOD.replace("[attestation]", "[attestation")).expect_err("syntax");
        assert!(
            error
                .to_string()
                .starts_with("/etc/plant/agent.toml: line 8, column "),
            "{error}"
        );
    }

    #[test]
    fn a_join_token_file_is_not_read_when_the_config_is_loaded() {
        let text = GOOD.replace("join_token = \"tok\"", "join_token_file = \"gone.token\"");
        let config = parse(&text).expect("valid without the file");
        let AttestationConfig::JoinToken {
            token: JoinToken::File { path, .. },
        } = config.attestation
        else {
            panic!("join token file");
        };
        assert_eq!(path, Path::new("/etc/plant/gone.token"));
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
        // The issuer's grammar: days and years too.
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("1y"), Ok(Duration::from_secs(365 * 86_400)));
        assert!(parse_duration("2y").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
    }
}
