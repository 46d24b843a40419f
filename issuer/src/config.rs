//! `issuer.toml`: read once at start, validated, paths resolved against the file's folder.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::profile::Profile;
use crate::Error;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SPIFFE trust domain of this plant, e.g. `plant.example`.
    pub trust_domain: String,
    /// Where the store, admin socket and runtime files live.
    pub state_dir: PathBuf,
    /// The CA certificates and the issuing key.
    pub ca: CaConfig,
    /// The EST listener.
    pub est: EstConfig,
    /// One-time enrollment tokens.
    #[serde(default)]
    pub tokens: TokenConfig,
    /// The profile used when the EST URL has no label.
    pub default_profile: String,
    /// The CRL and its plain-HTTP listener; absent means no CRL is published.
    #[serde(default)]
    pub crl: Option<CrlConfig>,
    /// Certificate profiles; each name is also an EST label.
    pub profiles: BTreeMap<String, Profile>,
    /// The agent API (gRPC over TLS): node attestation and SVID minting.
    #[serde(default)]
    pub agent_api: AgentApiConfig,
    /// Node attestation methods that need configuration.
    #[serde(default)]
    pub attestation: AttestationConfig,
    /// Clock tolerance and the disk reserve every issuance checks.
    #[serde(default)]
    pub issuance: IssuanceConfig,
    /// The embedded store's memory.
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(skip)]
    base_dir: PathBuf,
}

/// CA material.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// The plant root CA certificate (PEM).
    pub root_certificate: PathBuf,
    /// The issuing CA certificate (PEM), signed by the root.
    pub issuing_certificate: PathBuf,
    /// The issuing CA key, as a key reference: `soft:path=…`, `tpm:…` or `pkcs11:…`.
    pub issuing_key: String,
    /// Short-lived in-memory signing keys certified by the issuing key; absent, the issuing
    /// key signs every certificate itself.
    #[serde(default)]
    pub signing_key: Option<crate::signing_key::SigningKeyConfig>,
    /// Signatures that may wait for a TPM issuing key at once; more are answered 503 with
    /// Retry-After (a TPM signs one at a time, 14–24 a second).
    #[serde(default = "default_key_queue")]
    pub key_queue: usize,
    /// Longest a signature waits for a TPM issuing key before the request is answered 503.
    #[serde(with = "proto::duration::serde_text", default = "default_key_deadline")]
    pub key_deadline: Duration,
}

fn default_key_queue() -> usize {
    hsm::TpmOptions::default().queue_capacity
}

fn default_key_deadline() -> Duration {
    hsm::TpmOptions::default().deadline
}

/// The EST HTTPS listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstConfig {
    /// Address to listen on; port 0 picks a free port (written to `state_dir/est.url`).
    pub listen: SocketAddr,
    /// The server certificate chain (PEM, leaf first).
    pub tls_certificate: PathBuf,
    /// The server key (PKCS#8 PEM, mode 0600).
    pub tls_key: PathBuf,
    /// Largest request body accepted.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most connections held at once. At the limit a new connection sheds the one that has
    /// waited longest, in its TLS handshake, idle between requests, still sending a request
    /// body, or serving a client without a certificate this CA issued; only when every
    /// connection serves an authenticated request does it wait (see `connections`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a client may take for its TLS handshake.
    #[serde(with = "proto::duration::serde_text", default = "default_ten_seconds")]
    pub handshake_timeout: Duration,
    /// Longest a client may take to send a request's headers, counted from when the server
    /// starts waiting for them: this also bounds a keep-alive connection left idle.
    #[serde(with = "proto::duration::serde_text", default = "default_ten_seconds")]
    pub header_timeout: Duration,
    /// Longest a client may take to upload a request body once its headers are in; past it
    /// the client gets 408.
    #[serde(with = "proto::duration::serde_text", default = "default_ten_seconds")]
    pub body_timeout: Duration,
    /// Largest request head (request line and headers); larger is answered 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// How long after a renewal the renewed certificate may `simplereenroll` again and get
    /// the same successor back (a device that lost the answer); never a new certificate,
    /// and only while that successor is valid. `0s` turns retries off.
    #[serde(
        with = "proto::duration::serde_text",
        default = "default_renewal_retry_window"
    )]
    pub renewal_retry_window: Duration,
    /// Most connections one source (an IPv4 address, an IPv6 /64) holds at once; at the cap
    /// its own longest-waiting idle connection is shed, or the new one refused.
    #[serde(default = "default_est_per_source")]
    pub max_connections_per_source: usize,
    /// Longest one request may take from its headers to its answer, a trickled body
    /// included; past it the client gets 408 and the connection closes.
    #[serde(
        with = "proto::duration::serde_text",
        default = "default_thirty_seconds"
    )]
    pub request_timeout: Duration,
    /// Requests served on one connection before it is closed (the client reconnects), so
    /// no connection stays busy for ever.
    #[serde(default = "default_requests_per_connection")]
    pub max_requests_per_connection: usize,
}

fn default_est_per_source() -> usize {
    256
}

fn default_thirty_seconds() -> Duration {
    Duration::from_secs(30)
}

fn default_requests_per_connection() -> usize {
    100
}

fn default_renewal_retry_window() -> Duration {
    Duration::from_secs(5 * 60)
}

/// Longest `[est] renewal_retry_window`: a lost answer is retried within minutes.
const MAX_RENEWAL_RETRY_WINDOW: Duration = Duration::from_secs(24 * 3600);

fn default_ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn default_max_header_bytes() -> usize {
    16 * 1024
}

fn default_max_body() -> usize {
    64 * 1024
}

fn default_max_connections() -> usize {
    4096
}

/// `[agent_api]`: the TLS listener agents attest on and mint SVIDs from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentApiConfig {
    /// Serve the agent API at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address to listen on; port 0 picks a free port (written to `state_dir/agent_api.url`).
    #[serde(default = "default_agent_api_listen")]
    pub listen: SocketAddr,
    /// Lifetime of node SVIDs.
    #[serde(with = "proto::duration::serde_text", default = "default_hour")]
    pub node_svid_ttl: Duration,
    /// Lifetime of workload X509-SVIDs whose entry sets none (SPIRE's default, 1 h).
    #[serde(with = "proto::duration::serde_text", default = "default_hour")]
    pub x509_svid_ttl: Duration,
    /// Lifetime of JWT-SVIDs whose entry sets none (SPIRE's default, 5 min).
    #[serde(with = "proto::duration::serde_text", default = "default_jwt_ttl")]
    pub jwt_svid_ttl: Duration,
    /// Most connections held at once. At the limit a new connection sheds the one that has
    /// waited longest, in its TLS handshake, with no RPC in progress, or of a client without
    /// its node SVID (an `Attest` stream); only when every connection has an authenticated
    /// RPC open does it wait.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a client may take for its TLS handshake.
    #[serde(with = "proto::duration::serde_text", default = "default_ten_seconds")]
    pub handshake_timeout: Duration,
    /// Labels whose certificates may attest nodes by x509pop; absent, those of
    /// [`DEFAULT_X509POP_LABELS`] that are profiles here. Never an operator profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509pop_labels: Option<Vec<String>>,
    /// Most connections one source (an IPv4 address, an IPv6 /64) holds at once; at the cap
    /// its own longest-waiting sheddable connection is shed, or the new one refused.
    #[serde(default = "default_agent_api_per_source")]
    pub max_connections_per_source: usize,
    /// Longest an `Attest` stream may stay open before its evidence has arrived.
    #[serde(with = "proto::duration::serde_text", default = "default_ten_seconds")]
    pub first_message_timeout: Duration,
    /// Longest a whole attestation may wait on the agent (evidence, challenge answer).
    #[serde(with = "proto::duration::serde_text", default = "default_minute")]
    pub attestation_timeout: Duration,
}

fn default_agent_api_per_source() -> usize {
    64
}

fn default_minute() -> Duration {
    Duration::from_secs(60)
}

/// The device labels of the default profiles, whose certificates attest by x509pop unless
/// `[agent_api] x509pop_labels` says otherwise.
pub const DEFAULT_X509POP_LABELS: [&str; 2] = ["device", "plc"];

/// The agent API's port unless configured: next to EST's 8443.
pub const DEFAULT_AGENT_API_PORT: u16 = 8444;

fn default_true() -> bool {
    true
}

fn default_agent_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_AGENT_API_PORT))
}

fn default_hour() -> Duration {
    Duration::from_secs(3600)
}

fn default_jwt_ttl() -> Duration {
    Duration::from_secs(300)
}

impl Default for AgentApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_agent_api_listen(),
            node_svid_ttl: default_hour(),
            x509_svid_ttl: default_hour(),
            jwt_svid_ttl: default_jwt_ttl(),
            max_connections: default_max_connections(),
            handshake_timeout: default_ten_seconds(),
            x509pop_labels: None,
            max_connections_per_source: default_agent_api_per_source(),
            first_message_timeout: default_ten_seconds(),
            attestation_timeout: default_minute(),
        }
    }
}

/// `[attestation]`: settings of node attestation methods. `join_token` and `x509pop` need
/// none (they use the issuer's own tokens and inventory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// `[attestation.tpm]`: TPM credential activation; absent, the method is off.
    #[serde(default)]
    pub tpm: Option<TpmAttestationConfig>,
}

/// `[attestation.tpm]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmAttestationConfig {
    /// The TPM manufacturers' CA certificates this plant trusts, e.g. `ek_ca =
    /// ["ek-ca/infineon-root.pem"]` (relative to this file's folder): PEM files, DER
    /// `.crt`/`.cer` files, or folders of them. Each is trusted on its own.
    pub ek_ca: Vec<PathBuf>,
    /// The intermediate CAs between EK certificates and those roots, in the same forms
    /// (vendors publish folders of them): a TPM's NV holds only its EK certificate, and its
    /// AIA URL can't be followed from an air-gapped plant. An intermediate is trusted only
    /// through a chain to an `ek_ca` certificate.
    #[serde(default)]
    pub intermediates: Vec<PathBuf>,
    /// TPM nodes renew their node SVID by credential activation again, and renewal over
    /// mTLS is refused: a copied state directory then holds a node only until its SVID
    /// expires. Default true.
    #[serde(default = "default_true")]
    pub renew_by_attesting: bool,
}

/// `[issuance]`: what every certificate-producing path shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceConfig {
    /// notBefore is set this far before the issuer's clock, so a device or client whose
    /// clock is behind the issuer's by up to this much accepts a new certificate at once
    /// (and an issuer running this much ahead of its clients is covered the same way).
    #[serde(with = "proto::duration::serde_text", default = "default_backdate")]
    pub backdate: Duration,
    /// Free space (MiB) kept in reserve on the state folder's disk: below it, requests that
    /// would write are answered 503 instead of letting the store fail mid-write.
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,
}

fn default_backdate() -> Duration {
    Duration::from_secs(300)
}

fn default_min_free_mb() -> u64 {
    64
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        Self {
            backdate: default_backdate(),
            min_free_mb: default_min_free_mb(),
        }
    }
}

/// `[store]`: the embedded store under `<state_dir>/store`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The store's page cache (MiB). It fills with what is written and read until it reaches
    /// this size and stays there; sled's own default (1 GiB) would let the issuer's memory
    /// grow with every certificate it issues for a long time.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
}

fn default_cache_mb() -> u64 {
    crate::store::DEFAULT_CACHE_MB
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_mb: default_cache_mb(),
        }
    }
}

/// Token policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Lifetime of a token when `--ttl` is not given.
    #[serde(with = "proto::duration::serde_text")]
    pub default_ttl: Duration,
    /// Longest lifetime an operator may give a token.
    #[serde(with = "proto::duration::serde_text")]
    pub max_ttl: Duration,
    /// `[tokens.lockout]`: sources refused too often for want of a credential this CA made
    /// are refused for a while, and their refusals summarized in the audit log (see
    /// `lockout`).
    #[serde(default)]
    pub lockout: LockoutPolicy,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(30 * 86_400),
            lockout: Default::default(),
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            // Most often the issuer exists and this command was started elsewhere: point at
            // the existing configuration before suggesting a new CA.
            let looked_at = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Config(format!(
                    "no issuer configuration at {}; point to the existing one with \
                     `--config <path>` (or PLANT_ISSUER_CONFIG), or create a new CA with \
                     `issuer init --dir DIR`",
                    looked_at.display()
                ))
            } else {
                Error::Config(format!(
                    "cannot read the issuer configuration {}: {e}; check that this user may \
                     read it, or point to another with `--config <path>`",
                    looked_at.display()
                ))
            }
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates the text of a config file at `path` (relative paths in it are
    /// resolved against `path`'s folder); touches no file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.trust_domain.is_empty()
            || !self
                .trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(Error::Config(format!(
                "trust_domain {:?} must be lower-case letters, digits, '-', '.', '_'",
                self.trust_domain
            )));
        }
        self.trust_domain()?;
        if !(1..=1 << 20).contains(&self.store.cache_mb) {
            return Err(Error::Config(format!(
                "[store] cache_mb = {} must be between 1 and 1048576 (MiB)",
                self.store.cache_mb
            )));
        }
        if !self.profiles.contains_key(&self.default_profile) {
            return Err(Error::Config(format!(
                "default_profile {:?} is not one of the [profiles.*] tables",
                self.default_profile
            )));
        }
        for (name, profile) in &self.profiles {
            name.parse::<est::Label>()
                .map_err(|e| Error::Config(format!("profile name: {e}")))?;
            profile
                .validate()
                .map_err(|e| Error::Config(format!("[profiles.{name}]: {e}")))?;
        }
        if self.tokens.default_ttl > self.tokens.max_ttl {
            return Err(Error::Config(
                "tokens.default_ttl is longer than tokens.max_ttl".into(),
            ));
        }
        self.ca
            .issuing_key
            .parse::<hsm::KeyRef>()
            .map_err(|e| Error::Config(format!("ca.issuing_key: {e}")))?;
        if self.ca.key_queue == 0 {
            return Err(Error::Config("ca.key_queue must be at least 1".into()));
        }
        for (name, ttl) in [
            ("node_svid_ttl", self.agent_api.node_svid_ttl),
            ("x509_svid_ttl", self.agent_api.x509_svid_ttl),
            ("jwt_svid_ttl", self.agent_api.jwt_svid_ttl),
        ] {
            if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(u32::MAX.into()) {
                return Err(Error::Config(format!(
                    "agent_api.{name} must be between 1s and 136 years"
                )));
            }
        }
        self.tokens.lockout.validate().map_err(Error::Config)?;
        if self.est.max_connections == 0 {
            return Err(Error::Config(
                "est.max_connections must be at least 1".into(),
            ));
        }
        for (name, timeout) in [
            ("est.handshake_timeout", self.est.handshake_timeout),
            ("est.header_timeout", self.est.header_timeout),
            ("est.body_timeout", self.est.body_timeout),
            (
                "agent_api.handshake_timeout",
                self.agent_api.handshake_timeout,
            ),
            ("est.request_timeout", self.est.request_timeout),
            (
                "agent_api.first_message_timeout",
                self.agent_api.first_message_timeout,
            ),
        ] {
            if timeout.is_zero() {
                return Err(Error::Config(format!("{name} must be longer than 0s")));
            }
        }
        if self.est.max_header_bytes < 1024 {
            return Err(Error::Config(
                "est.max_header_bytes must be at least 1024".into(),
            ));
        }
        if self.est.renewal_retry_window > MAX_RENEWAL_RETRY_WINDOW {
            return Err(Error::Config(format!(
                "est.renewal_retry_window = {:?} is longer than 24h: it is for a device that \
                 lost the answer to its renewal and asks again, within minutes",
                proto::duration::format(self.est.renewal_retry_window)
            )));
        }
        if self.agent_api.max_connections == 0 {
            return Err(Error::Config(
                "agent_api.max_connections must be at least 1".into(),
            ));
        }
        self.validate_flood_limits()?;
        if let Some(signing_key) = &self.ca.signing_key {
            signing_key.validate().map_err(Error::Config)?;
        }
        for label in self.agent_api.x509pop_labels.iter().flatten() {
            match self.profiles.get(label) {
                None => {
                    return Err(Error::Config(format!(
                        "[agent_api] x509pop_labels: {label:?} is not one of the [profiles.*] \
                         tables"
                    )))
                }
                Some(profile) if profile.operator || label == "operator" => {
                    return Err(Error::Config(format!(
                        "[agent_api] x509pop_labels: {label} is an operator profile; operator \
                         certificates must never attest nodes, remove it from the list"
                    )))
                }
                Some(_) => {}
            }
        }
        if self.issuance.backdate > Duration::from_secs(24 * 3600) {
            return Err(Error::Config(
                "issuance.backdate must be at most 24h: it is for clock drift, not for \
                 certificates valid in the past"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The per-source caps and request bounds of both listeners.
    fn validate_flood_limits(&self) -> Result<(), Error> {
        for (name, cap) in [
            (
                "est.max_connections_per_source",
                self.est.max_connections_per_source,
            ),
            (
                "agent_api.max_connections_per_source",
                self.agent_api.max_connections_per_source,
            ),
            (
                "est.max_requests_per_connection",
                self.est.max_requests_per_connection,
            ),
        ] {
            if cap == 0 {
                return Err(Error::Config(format!("{name} must be at least 1")));
            }
        }
        if self.est.request_timeout < self.est.body_timeout {
            return Err(Error::Config(format!(
                "est.request_timeout ({} s) must be at least est.body_timeout ({} s): it \
                 bounds the whole request, body included",
                self.est.request_timeout.as_secs(),
                self.est.body_timeout.as_secs()
            )));
        }
        if self.agent_api.attestation_timeout < self.agent_api.first_message_timeout {
            return Err(Error::Config(format!(
                "agent_api.attestation_timeout ({} s) must be at least \
                 agent_api.first_message_timeout ({} s): it bounds the whole attestation",
                self.agent_api.attestation_timeout.as_secs(),
                self.agent_api.first_message_timeout.as_secs()
            )));
        }
        Ok(())
    }

    /// The short-lived signing key settings and the longest lifetime of the profiles they
    /// sign for (their certificates must outlast every leaf they sign), if configured.
    pub fn signing_keys(&self) -> Option<(crate::signing_key::SigningKeyConfig, Duration)> {
        let longest = self
            .profiles
            .values()
            .filter(|p| p.sign_with == crate::ca::SignWith::SigningKey)
            .map(|p| p.lifetime)
            .max()
            .unwrap_or_default();
        self.ca.signing_key.map(|config| (config, longest))
    }

    /// A path from the file, resolved against the file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The issuing key reference with a relative soft-key path resolved.
    pub fn issuing_key(&self) -> Result<hsm::KeyRef, Error> {
        let key: hsm::KeyRef = self
            .ca
            .issuing_key
            .parse()
            .map_err(|e| Error::Config(format!("ca.issuing_key: {e}")))?;
        // Relative key files, TPM blobs and PIN files are relative to this file's folder.
        Ok(key.with_base_dir(&self.base_dir))
    }

    /// How the issuing key's TPM, if it is one, queues and waits.
    pub fn key_options(&self) -> hsm::TpmOptions {
        hsm::TpmOptions {
            deadline: self.ca.key_deadline,
            queue_capacity: self.ca.key_queue,
        }
    }

    /// The state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.state_dir)
    }

    /// The trust domain, parsed (validated at load).
    pub fn trust_domain(&self) -> Result<proto::TrustDomain, Error> {
        proto::TrustDomain::new(&self.trust_domain)
            .map_err(|e| Error::Config(format!("trust_domain: {e}")))
    }

    /// The labels whose certificates may attest nodes by x509pop.
    pub fn x509pop_labels(&self) -> Vec<String> {
        match &self.agent_api.x509pop_labels {
            Some(labels) => labels.clone(),
            None => DEFAULT_X509POP_LABELS
                .iter()
                .filter(|l| self.profiles.get(**l).is_some_and(|p| !p.operator))
                .map(|l| (*l).to_owned())
                .collect(),
        }
    }

    /// The admin socket in the state folder.
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir().join("admin.sock")
    }
}

/// `[crl]` in issuer.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrlConfig {
    /// Plain-HTTP listen address; port 0 picks one (written to `state_dir/crl.url`).
    pub listen: SocketAddr,
    /// The URL put in certificates; default `http://<listen address>/crl/issuing.crl`.
    /// Set it (and a fixed port) in production: certificates keep the URL they were issued with.
    #[serde(default)]
    pub url: Option<String>,
    /// How long each CRL is valid (its nextUpdate); it is re-issued at half this.
    #[serde(with = "proto::duration::serde_text", default = "default_validity")]
    pub validity: Duration,
}

fn default_validity() -> Duration {
    Duration::from_secs(7 * 86_400)
}

/// `[tokens]` settings of the lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutPolicy {
    /// Unauthenticated refusals of one source within `window` that lock it out.
    pub max_failures: u32,
    /// The window failures are counted in, from a source's first failure.
    #[serde(with = "proto::duration::serde_text")]
    pub window: Duration,
    /// How long a locked-out source is refused.
    #[serde(with = "proto::duration::serde_text")]
    pub lockout: Duration,
    /// Most sources tracked at once; the oldest is forgotten to make room.
    pub max_sources: usize,
    /// How long a source's refusals are counted before their `refusals.summarized` audit
    /// record is written (the first of each interval is audited on its own).
    #[serde(
        with = "proto::duration::serde_text",
        default = "default_summary_interval"
    )]
    pub summary_interval: Duration,
}

fn default_summary_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
            max_sources: 65_536,
            summary_interval: default_summary_interval(),
        }
    }
}

impl LockoutPolicy {
    /// Checked at config load.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures == 0 {
            return Err("tokens.lockout.max_failures must be at least 1".into());
        }
        if self.window.is_zero() || self.lockout.is_zero() {
            return Err("tokens.lockout.window and .lockout must be longer than 0s".into());
        }
        if self.max_sources == 0 {
            return Err("tokens.lockout.max_sources must be at least 1".into());
        }
        if self.summary_interval < Duration::from_secs(1) {
            return Err("tokens.lockout.summary_interval must be at least 1s".into());
        }
        Ok(())
    }
}
