//! The issuing authority: the issuance pipeline ([`crate::issuance`]) with what the EST,
//! agent and admin surfaces need beside it: token creation, revocation, inventory and
//! status answers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{CertificateAuthority, SignWith};
use crate::clock::Clock;
use crate::config::Config;
use crate::grant::{valid_dns, valid_subject, Grant};
use crate::profile::{Profile, SanKind};
use crate::serial::Serial;
use crate::store::{
    AuditEvent, CertificateRecord, InventoryPage, InventoryQuery, Status, Store, TokenKind,
    TokenRecord, TokenState,
};
use crate::Error;
use proto::rfc3339;

/// The CA service state, built once in `serve` and shared by the EST and admin routes.
#[derive(Debug)]
pub struct Authority {
    /// The issuance pipeline every certificate goes through.
    pub(crate) pipeline: crate::issuance::Pipeline,
    pub(crate) ca: Arc<CertificateAuthority>,
    pub(crate) store: Store,
    pub(crate) profiles: BTreeMap<String, Profile>,
    /// The SVID profiles (`svid`, `node-svid`), apart from the EST labels.
    pub(crate) spiffe_profiles: BTreeMap<String, Profile>,
    pub(crate) default_profile: String,
    pub(crate) trust_domain: String,
    pub(crate) token_default_ttl: Duration,
    pub(crate) token_max_ttl: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) crl: Arc<crate::crl::Crl>,
    pub(crate) crl_validity: Duration,
    pub(crate) crl_file: Option<std::path::PathBuf>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Where the root key is, as `issuer status` says it.
    pub(crate) root_key: String,
    /// Checked before any request writes: a full or read-only disk answers 503.
    pub(crate) state_volume: crate::state_volume::StateVolume,
    /// Per-source lockout and audit summaries of refusals without a valid credential.
    pub(crate) lockouts: crate::lockout::Lockouts,
    /// How long after a renewal its predecessor may ask again and get the same successor
    /// (`[est] renewal_retry_window`): a device that lost the answer.
    pub(crate) renewal_retry_window: Duration,
    /// The names on the issuer's own TLS certificate, which no token or entry may grant.
    pub(crate) listener_names: crate::grant::ListenerNames,
}

/// An operator's request for tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Enrollment (EST, the default) or join (agent node attestation).
    #[serde(default)]
    pub kind: TokenKind,
    /// The label the token enrolls under (default profile when absent).
    pub label: Option<String>,
    /// The subject it is bound to.
    pub subject: Option<String>,
    /// Lifetime in seconds (config default when absent).
    pub ttl_secs: Option<u64>,
    /// DNS names to grant.
    #[serde(default)]
    pub dns: Vec<String>,
    /// IP addresses to grant.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// How many tokens (for benches and cabinets); default 1, at most 100,000.
    pub count: Option<usize>,
}

/// A created token: the secret is shown once and never stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    /// Public id.
    pub id: String,
    /// The secret to hand to the engineer.
    pub token: String,
    /// Enrollment or join.
    #[serde(default)]
    pub kind: TokenKind,
    /// Label.
    pub label: String,
    /// Bound subject.
    pub subject: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("label", &self.label)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// Why a certificate is revoked (RFC 5280 §5.3.1 CRLReason names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
#[value(rename_all = "camelCase")]
pub enum RevocationReason {
    /// No reason given.
    Unspecified,
    /// The device's key may be known to someone else.
    KeyCompromise,
    /// The device changed role or owner.
    AffiliationChanged,
    /// Replaced by a newer certificate.
    Superseded,
    /// The device is decommissioned.
    CessationOfOperation,
}

impl RevocationReason {
    /// The RFC 5280 §5.3.1 CRLReason code.
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
        }
    }
}

/// An operator's revocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Serial, hex.
    pub serial: String,
    /// Reason.
    pub reason: RevocationReason,
}

/// What `issuer status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Trust domain.
    pub trust_domain: String,
    /// Root fingerprint (SHA-256 hex).
    pub root_fingerprint: String,
    /// Where the issuing key lives.
    pub issuing_key: String,
    /// Where the root key lives, if on this machine.
    #[serde(default)]
    pub root_key: String,
    /// Issuing CA notAfter, RFC 3339.
    pub issuing_ca_not_after: String,
    /// Labels served.
    pub labels: Vec<String>,
    /// Certificate records.
    pub certificates: usize,
    /// Where the CRL is served, if published.
    #[serde(default)]
    pub crl_url: Option<String>,
    /// Signatures waiting for the issuing key's device, and how many may wait (TPM only).
    #[serde(default)]
    pub issuing_key_queue: Option<(usize, usize)>,
    /// The short-lived signing keys held now, newest first (empty when not configured).
    #[serde(default)]
    pub signing_keys: Vec<SigningKeyStatus>,
    /// Labels whose certificates the issuing key signs itself.
    #[serde(default)]
    pub issuing_key_labels: Vec<String>,
}

/// One short-lived signing key in `issuer status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SigningKeyStatus {
    /// Its certificate's serial, hex.
    pub serial: String,
    /// next, signing or retired.
    pub phase: crate::signing_key::Phase,
    /// When it starts signing, RFC 3339.
    pub signs_from: String,
    /// When its successor takes over, RFC 3339.
    pub signs_until: String,
    /// Its certificate's notAfter, RFC 3339.
    pub not_after: String,
}

impl Authority {
    /// Opens the CA and the store named by `config`.
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let ca = Arc::new(CertificateAuthority::load(
            &config.resolve(&config.ca.root_certificate),
            &config.resolve(&config.ca.issuing_certificate),
            &config.issuing_key()?,
            config.key_options(),
            config.signing_keys(),
        )?);
        let store =
            Store::open_with_cache(&config.state_dir().join("store"), config.store.cache_mb)?;
        let state_volume = crate::state_volume::StateVolume::new(
            &config.state_dir(),
            config.issuance.min_free_mb.saturating_mul(1024 * 1024),
        );
        store.durability.watch_volume(state_volume.clone());
        let crl = Arc::new(crate::crl::Crl::default());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let backdate = time::Duration::try_from(config.issuance.backdate)
            .map_err(|e| Error::Config(format!("issuance.backdate: {e}")))?;
        let spiffe_profiles = crate::profile::spiffe(
            config.agent_api.x509_svid_ttl,
            config.agent_api.node_svid_ttl,
        );
        let pipeline = crate::issuance::Pipeline::new(crate::issuance::Parts {
            ca: ca.clone(),
            store: store.clone(),
            profiles: config.profiles.clone(),
            spiffe_profiles: spiffe_profiles.clone(),
            clock: clock.clone(),
            backdate,
            state_volume: state_volume.clone(),
            distribution_point: crl.distribution_point(),
        });
        pipeline.observe(metrics.clone());
        Ok(Self {
            pipeline,
            ca,
            store,
            profiles: config.profiles.clone(),
            spiffe_profiles,
            default_profile: config.default_profile.clone(),
            trust_domain: config.trust_domain.clone(),
            token_default_ttl: config.tokens.default_ttl,
            token_max_ttl: config.tokens.max_ttl,
            clock,
            crl,
            crl_validity: config
                .crl
                .as_ref()
                .map_or(Duration::from_secs(7 * 86_400), |c| c.validity),
            crl_file: config
                .crl
                .as_ref()
                .map(|_| config.state_dir().join("crl.der")),
            metrics,
            state_volume,
            lockouts: crate::lockout::Lockouts::new(config.tokens.lockout),
            renewal_retry_window: config.est.renewal_retry_window,
            listener_names: crate::grant::ListenerNames::load(
                &config.resolve(&config.est.tls_certificate),
            ),
            root_key: {
                // `init` writes the root key beside the root certificate; operators are told
                // to move it offline, and status says whether they did.
                let path = config
                    .resolve(&config.ca.root_certificate)
                    .with_file_name("root.key");
                if path.exists() {
                    format!(
                        "software key file {} (needed only to make a new issuing CA: move it offline)",
                        path.display()
                    )
                } else {
                    "not on this machine (offline)".to_owned()
                }
            },
        })
    }

    pub(crate) fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The profile for an EST label (`None`: the default profile).
    pub fn profile(&self, label: Option<&str>) -> Option<(&str, &Profile)> {
        let name = label.unwrap_or(&self.default_profile);
        self.profiles
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Whether `grant`'s certificate must be its subject's only valid one under its label.
    pub(crate) fn unique_subject(&self, grant: &Grant) -> bool {
        self.pipeline.unique_subject(grant)
    }

    /// Issues a certificate for `public_key` (uncompressed P-256 point) under `grant`
    /// through the pipeline ([`crate::issuance`]).
    pub async fn issue(&self, grant: &Grant, public_key: &[u8]) -> Result<Vec<u8>, Error> {
        self.pipeline.issue(grant, public_key, None).await
    }

    /// [`Authority::issue`], with `sign_with` overriding the profile's choice of key.
    pub async fn issue_signed_by(
        &self,
        grant: &Grant,
        public_key: &[u8],
        sign_with: Option<SignWith>,
    ) -> Result<Vec<u8>, Error> {
        self.pipeline.issue(grant, public_key, sign_with).await
    }

    /// Whether anything could be issued now (see [`Pipeline::ready`]).
    pub(crate) fn ready_to_issue(&self) -> Result<(), Error> {
        self.pipeline.ready()
    }

    /// Whether `now` lies inside the issuing CA's validity (see [`Pipeline::ready`]).
    pub(crate) fn check_clock_within_ca(&self, now: OffsetDateTime) -> Result<(), Error> {
        self.pipeline.check_clock_within_ca(now)
    }

    pub(crate) fn audit(&self, kind: &str, detail: serde_json::Value) -> Result<u64, Error> {
        let at_ms = crate::issuance::now_ms(self.now());
        self.store.audit.append(
            AuditEvent {
                kind: kind.to_owned(),
                detail,
            },
            at_ms,
        )
    }

    /// Creates one-time tokens; their secrets exist only in the answer.
    pub async fn create_tokens(&self, request: &TokenRequest) -> Result<Vec<CreatedToken>, Error> {
        self.state_volume.check()?;
        let bad = |why: String| Error::Admin(why);
        if request.kind == TokenKind::Join
            && (request.label.is_some()
                || request.subject.is_some()
                || !request.dns.is_empty()
                || !request.ips.is_empty())
        {
            return Err(bad(
                "a join token names no label, subject, DNS name or IP address: the node's \
                 identity is spiffe://<trust domain>/agent/join_token/<token id>"
                    .into(),
            ));
        }
        let (label, profile) = self.profile(request.label.as_deref()).ok_or_else(|| {
            bad(format!(
                "unknown label {:?}; this issuer serves {}",
                request.label.clone().unwrap_or_default(),
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if let Some(subject) = &request.subject {
            if !valid_subject(subject) {
                return Err(bad(format!(
                    "subject {subject:?} must be 1-64 letters, digits, '.', '-', '_'"
                )));
            }
        }
        if let Some(dns) = request.dns.iter().find(|d| !valid_dns(d)) {
            return Err(bad(format!("{dns:?} is not a valid DNS name")));
        }
        if !request.dns.is_empty() && !profile.allows(SanKind::Dns) {
            return Err(bad(format!("profile {label} does not allow DNS names")));
        }
        if !request.ips.is_empty() && !profile.allows(SanKind::Ip) {
            return Err(bad(format!("profile {label} does not allow IP addresses")));
        }
        self.listener_names.refuse(&request.dns, &request.ips)?;
        let ttl = request
            .ttl_secs
            .map(Duration::from_secs)
            .unwrap_or(self.token_default_ttl);
        if ttl > self.token_max_ttl || ttl.is_zero() {
            return Err(bad(format!(
                "token lifetime must be between 1s and {} (tokens.max_ttl)",
                proto::duration::format(self.token_max_ttl)
            )));
        }
        let count = request.count.unwrap_or(1);
        if count == 0 || count > 100_000 {
            return Err(bad("count must be between 1 and 100000".into()));
        }
        let now = self.now().unix_timestamp();
        let expires_at = now + ttl.as_secs() as i64;
        let mut created = Vec::with_capacity(count);
        for _ in 0..count {
            let secret = new_secret();
            let hash = hex::encode(crate::store::tokens_hash(&secret));
            let record = TokenRecord {
                // A join token's id names a node for as long as the node lives, so it gets
                // more of the hash than an enrollment token's: 128 bits, not 32. Either way it
                // is of the hash, never of the secret.
                id: match request.kind {
                    TokenKind::Enrollment => hash[..8].to_owned(),
                    TokenKind::Join => hash[..32].to_owned(),
                },
                kind: request.kind,
                hash,
                label: match request.kind {
                    TokenKind::Enrollment => label.to_owned(),
                    TokenKind::Join => String::new(),
                },
                subject: request.subject.clone(),
                dns: request.dns.clone(),
                ips: request.ips.clone(),
                created_at: now,
                expires_at,
                used_at: None,
                revoked_at: None,
            };
            self.store.tokens.insert(&record)?;
            self.audit(
                "token.created",
                serde_json::json!({
                    "token_id": record.id, "kind": record.kind, "label": record.label,
                    "subject": record.subject, "expires_at": expires_at,
                }),
            )?;
            created.push(CreatedToken {
                id: record.id,
                token: secret,
                kind: record.kind,
                label: record.label,
                subject: request.subject.clone(),
                expires_at,
            });
        }
        self.store.durability.commit().await?;
        Ok(created)
    }

    /// Every token with its state now, oldest first; secrets are never stored, so never
    /// listed.
    pub fn list_tokens(&self) -> Result<Vec<(TokenRecord, TokenState)>, Error> {
        let now = self.now().unix_timestamp();
        Ok(self
            .store
            .tokens
            .list()?
            .into_iter()
            .map(|t| {
                let state = t.state(now);
                (t, state)
            })
            .collect())
    }

    /// Revokes the unused token(s) with public id `id`: they can no longer enroll or join.
    /// Recorded and audited before the answer. A spent token is not revoked (what it
    /// enrolled is revoked or evicted instead); the error says how.
    pub async fn revoke_token(&self, id: &str) -> Result<Vec<TokenRecord>, Error> {
        use crate::store::TokenRevocation;
        self.state_volume.check()?;
        let id = id.trim().to_ascii_lowercase();
        let found = self.store.tokens.revoke(&id, self.now().unix_timestamp())?;
        let mut revoked = Vec::new();
        let mut refusal = None;
        for outcome in found {
            match outcome {
                TokenRevocation::Revoked(record) => revoked.push(record),
                TokenRevocation::AlreadyRevoked(_) => {
                    refusal = Some(format!("token {id} is already revoked; nothing to do"))
                }
                TokenRevocation::AlreadyUsed(record) => {
                    let used = record.used_at.map(proto::rfc3339_unix).unwrap_or_default();
                    refusal = Some(match record.kind {
                        TokenKind::Enrollment => format!(
                            "token {id} was already used ({used}); revoking it now changes \
                             nothing: revoke the certificate it enrolled instead (`issuer \
                             inventory --owner token:{id}` shows its serial, then `issuer \
                             revoke <serial>`)"
                        ),
                        TokenKind::Join => format!(
                            "token {id} was already used ({used}); revoking it now changes \
                             nothing: evict the agent it joined instead (`issuer agent evict \
                             spiffe://{}/agent/join_token/{id}`)",
                            self.trust_domain
                        ),
                    })
                }
            }
        }
        if revoked.is_empty() {
            return Err(match refusal {
                Some(message) => Error::Admin(message),
                None => Error::NotFound(format!(
                    "no token with id {id:?}; `issuer token list` shows the ids (a token's \
                     secret is not its id)"
                )),
            });
        }
        for record in &revoked {
            self.audit(
                "token.revoked",
                serde_json::json!({
                    "token_id": record.id, "kind": record.kind, "label": record.label,
                    "subject": record.subject,
                }),
            )?;
        }
        self.store.durability.commit().await?;
        Ok(revoked)
    }

    /// Revokes a certificate: it can no longer re-enroll. Recorded and audited before the
    /// answer.
    pub async fn revoke(&self, request: &RevokeRequest) -> Result<CertificateRecord, Error> {
        self.state_volume.check()?;
        let serial = Serial::parse(&request.serial).ok_or_else(|| {
            Error::Admin(format!(
                "{:?} is not a certificate serial; give it in hex, as `issuer inventory` shows it",
                request.serial
            ))
        })?;
        let existing = self
            .store
            .certificates
            .get(&serial)?
            .ok_or_else(|| unknown_serial(serial))?;
        if existing.status == Status::Revoked {
            return Err(Error::Admin(format!(
                "certificate {serial} is already revoked; nothing to do"
            )));
        }
        let record = self
            .store
            .certificates
            .revoke(&serial, self.now().unix_timestamp(), request.reason.code())?
            .ok_or_else(|| unknown_serial(serial))?;
        self.audit(
            "certificate.revoked",
            serde_json::json!({
                "serial": record.serial.to_string(), "subject": record.subject,
                "reason": request.reason,
            }),
        )?;
        self.store.durability.commit().await?;
        self.metrics.inventory_changed();
        // The revocation is recorded; a failure to sign the CRL now is retried by the
        // refresher and must not make the operator think the revocation was lost.
        if let Err(e) = self.publish_crl() {
            tracing::error!(error = %e, "publishing the CRL after a revocation failed");
        }
        Ok(CertificateRecord {
            status: Status::Revoked,
            der: Vec::new(),
            ..record
        })
    }

    /// Answers an inventory query.
    pub fn inventory(&self, query: &InventoryQuery) -> Result<InventoryPage, Error> {
        self.store
            .certificates
            .query(query, self.now().unix_timestamp())
    }

    /// Counts one EST answer.
    pub fn count_est_response(&self, status: u16) {
        self.metrics.est_response(status);
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        StatusReport {
            trust_domain: self.trust_domain.clone(),
            root_fingerprint: self.ca.root_fingerprint(),
            issuing_key: self.ca.key_location(),
            root_key: self.root_key.clone(),
            issuing_ca_not_after: self
                .ca
                .not_after()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            labels: self.profiles.keys().cloned().collect(),
            certificates: self.store.certificates.len(),
            crl_url: self.crl.url().map(str::to_owned),
            issuing_key_queue: self.ca.key_queue().map(|q| (q.waiting, q.capacity)),
            signing_keys: self
                .ca
                .signing_keys()
                .map(|keys| keys.phases(self.now()))
                .unwrap_or_default()
                .into_iter()
                .map(|(key, phase)| SigningKeyStatus {
                    serial: key.serial().to_string(),
                    phase,
                    signs_from: rfc3339(key.signs_from()),
                    signs_until: rfc3339(key.signs_until()),
                    not_after: rfc3339(key.not_after()),
                })
                .collect(),
            issuing_key_labels: self
                .profiles
                .iter()
                .filter(|(_, p)| {
                    self.ca.signing_keys().is_none() || p.sign_with == SignWith::IssuingKey
                })
                .map(|(name, _)| name.clone())
                .collect(),
        }
    }

    /// Whether `leaf`, a TLS client certificate, is one this CA issued (byte for byte in the
    /// inventory) and has neither revoked nor let expire: its connection's requests are then
    /// authenticated work, never shed while being served. A foreign or self-signed certificate
    /// authenticates nothing.
    pub(crate) fn issued_here(&self, leaf: &[u8]) -> bool {
        use crate::store::Status;
        let now = self.now().unix_timestamp();
        matches!(
            self.issued_record(leaf),
            Ok(Some((_, record))) if matches!(record.status_at(now), Status::Valid | Status::Superseded)
        )
    }

    /// The inventory record of `certificate` (DER) if this CA issued it, byte for byte;
    /// `None` for anything else: unparsable, an unknown serial, or other bytes under a known
    /// serial. How TLS client certificates are judged (re-enrollment, the operator API).
    pub(crate) fn issued_record(
        &self,
        certificate: &[u8],
    ) -> Result<Option<(Serial, CertificateRecord)>, Error> {
        use der::Decode;
        let Some(serial) = x509_cert::Certificate::from_der(certificate)
            .ok()
            .and_then(|c| Serial::from_bytes(c.tbs_certificate.serial_number.as_bytes()))
        else {
            return Ok(None);
        };
        let Some(record) = self.store.certificates.get(&serial)? else {
            return Ok(None);
        };
        Ok((record.der == certificate).then_some((serial, record)))
    }

    /// Certifies the next short-lived signing key if one is due, records it (audit, durable)
    /// and only then publishes it. `Ok(false)`: nothing was due.
    pub async fn certify_signing_key_if_due(self: &Arc<Self>) -> Result<bool, Error> {
        let this = Arc::clone(self);
        let now = self.now();
        let key = tokio::task::spawn_blocking(move || this.ca.certify_due(now))
            .await
            .map_err(|e| Error::SigningKey(format!("certifying task failed: {e}")))??;
        let (Some(key), Some(keys)) = (key, self.ca.signing_keys()) else {
            return Ok(false);
        };
        self.audit(
            "signing_key.certified",
            serde_json::json!({
                "serial": key.serial().to_string(),
                "signs_from": key.signs_from().unix_timestamp(),
                "signs_until": key.signs_until().unix_timestamp(),
                "not_after": key.not_after().unix_timestamp(),
                "certificate": base64::engine::general_purpose::STANDARD.encode(key.der()),
            }),
        )?;
        self.store.durability.commit().await?;
        tracing::info!(
            serial = %key.serial(),
            signs_from = %rfc3339(key.signs_from()),
            signs_until = %rfc3339(key.signs_until()),
            "short-lived signing key certified"
        );
        keys.publish(key, self.now());
        Ok(true)
    }

    /// Keeps a short-lived signing key certified ahead of need; a failure (TPM down) is
    /// retried every second while the current key goes on signing through the overlap.
    pub async fn keep_signing_key_fresh(self: Arc<Self>) {
        let mut failing = false;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match self.certify_signing_key_if_due().await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("short-lived signing key rotation recovered");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "certifying the next short-lived signing key failed; retrying every second");
                }
                Err(_) => {}
            }
        }
    }
}

/// A revocation of a serial this issuer never issued: likely a typo or another CA's.
fn unknown_serial(serial: Serial) -> Error {
    Error::Admin(format!(
        "this issuer has no certificate with serial {serial}; check it against `issuer inventory` \
         (a certificate from another CA must be revoked there)"
    ))
}

/// 256 random bits, base64url: the one-time token an engineer types or pastes.
fn new_secret() -> String {
    // A token that starts with '-' reads as an option to command-line tools
    // (`agent enroll --token -x…`), so draw again: one in 64 times, costing 6 bits of 256.
    loop {
        let bytes: [u8; 32] = rand::random();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        if !secret.starts_with('-') {
            return secret;
        }
    }
}

impl Authority {
    /// Builds, signs and publishes a new CRL (also written to `state_dir/crl.der`).
    pub fn publish_crl(&self) -> Result<(), Error> {
        let now = self.now();
        // A CRL dated outside the CA's validity is one no verifier takes; the last good one
        // stays published.
        self.check_clock_within_ca(now)?;
        let revocations = self.store.certificates.revocations(now.unix_timestamp())?;
        let number = self.store.certificates.next_crl_number()?;
        let next_update = (now + self.crl_validity).min(self.ca.not_after());
        let der = self.ca.sign_crl(crate::crl::crl_params(
            &revocations,
            number,
            now,
            next_update,
        )?)?;
        if let Some(path) = &self.crl_file {
            let tmp = path.with_extension("der.tmp");
            std::fs::write(&tmp, &der).map_err(Error::io(&tmp))?;
            std::fs::rename(&tmp, path).map_err(Error::io(path))?;
        }
        self.crl
            .publish(der, now.unix_timestamp(), next_update.unix_timestamp());
        tracing::info!(number, revoked = revocations.len(), "CRL published");
        Ok(())
    }

    /// Re-issues the CRL whenever half its validity has passed; runs for the process's life.
    pub async fn keep_crl_fresh(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if self.crl.due(self.now().unix_timestamp()) {
                if let Err(e) = self.publish_crl() {
                    tracing::error!(error = %e, "re-issuing the CRL failed; retrying in 30 s");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::new_secret;

    #[test]
    fn token_secrets_never_start_with_a_hyphen() {
        // Without the redraw, one in 64 would: 2,000 draws would all but surely show one.
        for _ in 0..2000 {
            let secret = new_secret();
            assert!(!secret.starts_with('-'), "{secret}");
            assert_eq!(secret.len(), 43);
        }
    }
}
