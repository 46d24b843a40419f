//! The issuing authority: the one issuance pipeline every certificate goes through
//! (DESIGN §3), token creation, and inventory answers.
//!
//! authenticate → authorize into a [`Grant`] → build from the profile with a random serial →
//! sign → check → record (insert-if-new serial) + audit → durable commit → respond.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, SanType};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{CertificateAuthority, SignWith, SubjectKey};
use crate::clock::Clock;
use crate::config::Config;
use crate::grant::{valid_dns, valid_subject, Grant};
use crate::profile::{Profile, SanKind};
use crate::serial::Serial;
use crate::store::{
    AuditEvent, CertificateRecord, InventoryPage, InventoryQuery, LineageEnd, NewRecord, Renewal,
    Status, Store, TokenKind, TokenRecord, TokenState,
};
use crate::Error;
use proto::rfc3339;

/// The CA service state, built once in `serve` and shared by the EST and admin routes.
#[derive(Debug)]
pub struct Authority {
    pub(crate) ca: CertificateAuthority,
    pub(crate) store: Store,
    pub(crate) profiles: BTreeMap<String, Profile>,
    /// The SVID profiles (`svid`, `node-svid`), apart from the EST labels.
    pub(crate) spiffe_profiles: BTreeMap<String, Profile>,
    pub(crate) default_profile: String,
    pub(crate) trust_domain: String,
    pub(crate) token_default_ttl: Duration,
    pub(crate) token_max_ttl: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) crl: crate::crl::Crl,
    pub(crate) crl_validity: Duration,
    pub(crate) crl_file: Option<std::path::PathBuf>,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Where the root key is, as `issuer status` says it.
    pub(crate) root_key: String,
    /// The dashboard's expiry timeline, recounted at most every 30 s.
    pub(crate) timeline_cache: crate::dashboard::TimelineCache,
    /// notBefore is set this far back so devices whose clocks lag the issuer's accept new
    /// certificates (`[issuance] backdate`).
    pub(crate) backdate: time::Duration,
    /// Checked before any request writes: a full or read-only disk answers 503.
    pub(crate) state_volume: crate::state_volume::StateVolume,
    /// Per-source lockout and audit summaries of refusals without a valid credential.
    pub(crate) lockouts: crate::lockout::Lockouts,
    /// How long after a renewal its predecessor may ask again and get the same successor
    /// (`[est] renewal_retry_window`): a device that lost the answer.
    pub(crate) renewal_retry_window: Duration,
    /// The names on the issuer's own TLS certificate, which no token or entry may grant.
    pub(crate) listener_names: crate::tls::ListenerNames,
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
        let ca = CertificateAuthority::load(
            &config.resolve(&config.ca.root_certificate),
            &config.resolve(&config.ca.issuing_certificate),
            &config.issuing_key()?,
            config.key_options(),
            config.signing_keys(),
        )?;
        let store =
            Store::open_with_cache(&config.state_dir().join("store"), config.store.cache_mb)?;
        Ok(Self {
            ca,
            store,
            profiles: config.profiles.clone(),
            spiffe_profiles: crate::profile::spiffe(&config.agent_api),
            default_profile: config.default_profile.clone(),
            trust_domain: config.trust_domain.clone(),
            token_default_ttl: config.tokens.default_ttl,
            token_max_ttl: config.tokens.max_ttl,
            clock,
            crl: crate::crl::Crl::default(),
            crl_validity: config
                .crl
                .as_ref()
                .map_or(Duration::from_secs(7 * 86_400), |c| c.validity),
            crl_file: config
                .crl
                .as_ref()
                .map(|_| config.state_dir().join("crl.der")),
            metrics: crate::metrics::Metrics::default(),
            timeline_cache: Default::default(),
            backdate: time::Duration::try_from(config.issuance.backdate)
                .map_err(|e| Error::Config(format!("issuance.backdate: {e}")))?,
            state_volume: crate::state_volume::StateVolume::new(
                &config.state_dir(),
                config.issuance.min_free_mb.saturating_mul(1024 * 1024),
            ),
            lockouts: crate::lockout::Lockouts::new(config.tokens.lockout),
            renewal_retry_window: config.est.renewal_retry_window,
            listener_names: crate::tls::ListenerNames::load(
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

    /// Whether `grant`'s certificate must be its subject's only valid one under its label:
    /// enrollments by token, unless the profile shares subjects. SVIDs overlap by design
    /// (rotation), and a renewal hands the subject on within its lineage.
    pub(crate) fn unique_subject(&self, grant: &Grant) -> bool {
        grant.token.is_some()
            && grant.renews.is_none()
            && self
                .profile(Some(&grant.label))
                .is_some_and(|(_, profile)| !profile.shared_subjects)
    }

    /// Issues a certificate for `public_key` (uncompressed P-256 point) under `grant`, signed
    /// by the key its profile names.
    pub async fn issue(&self, grant: &Grant, public_key: &[u8]) -> Result<Vec<u8>, Error> {
        self.issue_signed_by(grant, public_key, None).await
    }

    /// [`Authority::issue`], with `sign_with` overriding the profile's choice of key.
    pub async fn issue_signed_by(
        &self,
        grant: &Grant,
        public_key: &[u8],
        sign_with: Option<SignWith>,
    ) -> Result<Vec<u8>, Error> {
        // SVIDs are built from the issuer's own SPIFFE profiles and EST certificates from
        // the configured ones: no EST label can produce an SVID, and no agent an EST profile.
        let profiles = if grant.spiffe_id.is_some() {
            &self.spiffe_profiles
        } else {
            &self.profiles
        };
        let profile = profiles
            .get(&grant.label)
            .ok_or_else(|| Error::Config(format!("no profile {:?}", grant.label)))?;
        // The issuer's SPIFFE ID is what clients pin the issuer by: only the issuer's own
        // TLS certificate may carry it, and that certificate carries nothing else's.
        let issuer_id = grant
            .spiffe_id
            .as_ref()
            .is_some_and(|id| est::tls::is_issuer_id(id.as_str()));
        if issuer_id != (grant.label == crate::profile::ISSUER_SERVER) {
            return Err(Error::Denied(format!(
                "{} is the issuer's own identity; no other certificate may carry it",
                grant.spiffe_id.as_ref().map_or("", |id| id.as_str())
            )));
        }
        // Nothing is written (not even the token spent) unless it can also be recorded.
        self.state_volume.check()?;
        let now = self.now();
        self.check_clock_within_ca(now)?;
        let signer = self
            .ca
            .leaf_signer(sign_with.unwrap_or(profile.sign_with), now)?;
        let ca_not_after = signer.not_after();
        let not_after = (now + grant.lifetime.unwrap_or(profile.lifetime)).min(ca_not_after);
        let started = std::time::Instant::now();

        // A serial is taken by recording the certificate: the record is inserted only if
        // the serial was never used, in the same transaction as its expiry index. A
        // collision (odds 2^-127) re-signs with a new serial; the discarded signature never
        // left the process.
        let subject_key = SubjectKey(public_key.to_vec());
        let mut token_spent = false;
        let (der, record) = loop {
            let serial = Serial::random();
            // Back-dated for lagging clocks, but never before the issuing CA's own start.
            let not_before = (now - self.backdate).max(self.ca.not_before());
            let mut params = leaf_params(grant, profile, serial, not_before, not_after);
            if let Some(url) = self.crl.url() {
                params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                    uris: vec![url.to_owned()],
                }];
            }
            let der = signer.sign(&params, &subject_key).await?;
            crate::check::leaf(&der, grant, ca_not_after.unix_timestamp())?;
            let record = CertificateRecord {
                serial: serial.to_string(),
                subject: grant.common_name.clone(),
                sans: grant.san_strings(),
                label: grant.label.clone(),
                owner: grant.owner.clone(),
                issued_at: now.unix_timestamp(),
                not_after: not_after.unix_timestamp(),
                status: Status::Valid,
                renews: grant.renews.map(|s| s.to_string()),
                der: base64::engine::general_purpose::STANDARD.encode(&der),
            };
            // Spend the token only now that a certificate exists; of concurrent requests with
            // one token, the first to get here wins and the others' signatures are dropped.
            // A serial collision loops back to sign again; the token is spent only once.
            if let Some(token) = grant.token.as_ref().filter(|_| !token_spent) {
                self.spend_token(token, now.unix_timestamp())?;
                token_spent = true;
            }
            // A renewal is recorded and its predecessor superseded in one transaction, and
            // only while the predecessor is still current (not revoked, not renewed by a
            // concurrent request, its lineage not ended): a revocation that won the race is
            // never overwritten, and nothing of this renewal is kept.
            let recorded = match grant.renews {
                None => match self.store.certificates.record_new_holding(
                    &serial,
                    &record,
                    self.unique_subject(grant),
                )? {
                    NewRecord::Recorded => true,
                    NewRecord::SerialTaken => false,
                    NewRecord::SubjectHeld(held_by) => return Err(subject_held(grant, &held_by)),
                },
                Some(old) => match self
                    .store
                    .certificates
                    .record_renewal(&serial, &record, &old)?
                {
                    Renewal::Recorded => true,
                    Renewal::SerialTaken => false,
                    Renewal::PredecessorNotCurrent { status, ended } => {
                        return Err(renewal_overtaken(old, status, ended))
                    }
                },
            };
            if recorded {
                break (der, record);
            }
        };
        self.audit(
            "certificate.issued",
            serde_json::json!({
                "serial": record.serial,
                "subject": record.subject,
                "sans": record.sans,
                "label": record.label,
                "owner": record.owner,
                "not_after": record.not_after,
                "renews": record.renews,
            }),
        )?;
        self.store.durability.commit().await?;
        self.metrics.issued(&grant.label, started.elapsed());
        Ok(der)
    }

    /// Whether anything could be issued now: the state folder takes writes and the clock is
    /// inside the issuing CA's validity. Checked before authentication, and again in the
    /// pipeline itself.
    pub(crate) fn ready_to_issue(&self) -> Result<(), Error> {
        self.state_volume.check()?;
        self.check_clock_within_ca(self.now())
    }

    /// A clock outside the issuing CA's validity is a wrong clock (a gateway whose RTC
    /// battery died boots in 2000; a VM restored from an old snapshot): refuse to issue
    /// rather than sign certificates no verifier will accept.
    pub(crate) fn check_clock_within_ca(&self, now: OffsetDateTime) -> Result<(), Error> {
        let (ca_from, ca_until) = (self.ca.not_before(), self.ca.not_after());
        if now >= ca_until {
            return Err(Error::OutsideCaValidity(format!(
                "the issuer's clock reads {}, after the issuing CA expired ({}); nothing can be \
                 issued: check the issuer's clock, or install a new issuing CA",
                proto::rfc3339(now),
                proto::rfc3339(ca_until)
            )));
        }
        if now < ca_from {
            return Err(Error::OutsideCaValidity(format!(
                "the issuer's clock reads {}, before the issuing CA's validity starts ({}); \
                 nothing can be issued until the clock is set right",
                proto::rfc3339(now),
                proto::rfc3339(ca_from)
            )));
        }
        Ok(())
    }

    fn spend_token(&self, token: &[u8; 32], now: i64) -> Result<(), Error> {
        use crate::store::Consumed;
        let refused = |m: &str| Error::Est(est::Error::refused(est::Refusal::Unauthorized, m));
        match self.store.tokens.consume_hash(token, now)? {
            Consumed::Ok(_) => Ok(()),
            Consumed::AlreadyUsed(_) => Err(refused(
                "this token was already used; tokens are single use, ask the PKI operator for a new one",
            )),
            Consumed::Expired(_) => Err(refused(
                "this token expired; ask the PKI operator for a new one",
            )),
            Consumed::Revoked(_) => Err(refused(
                "this token was revoked by the PKI operator; ask them for a new one",
            )),
            Consumed::Unknown => Err(refused("unknown token")),
        }
    }

    pub(crate) fn audit(&self, kind: &str, detail: serde_json::Value) -> Result<u64, Error> {
        let at_ms = (self.now().unix_timestamp_nanos() / 1_000_000) as i64;
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
        self.refuse_listener_names(&request.dns, &request.ips)?;
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
                "serial": record.serial, "subject": record.subject,
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
            der: String::new(),
            ..record
        })
    }

    /// Answers an inventory query.
    pub fn inventory(&self, query: &InventoryQuery) -> Result<InventoryPage, Error> {
        self.store
            .certificates
            .query(query, self.now().unix_timestamp())
    }

    /// The Prometheus exposition text.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
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
        Ok((record.der_bytes()? == certificate).then_some((serial, record)))
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

/// A renewal whose predecessor stopped being current while it was signed: revoked (or its
/// lineage ended by another revocation), or renewed by a concurrent request. 403: the
/// certificate presented may not renew, and nothing was issued.
fn renewal_overtaken(old: Serial, status: Option<Status>, ended: Option<LineageEnd>) -> Error {
    let message = match (status, ended) {
        (Some(Status::Revoked), _) => format!(
            "certificate {old} was revoked while its renewal was being signed; nothing was \
             issued: enroll the device again with a new token"
        ),
        (_, Some(end)) => format!(
            "certificate {} of this lineage was revoked while the renewal of {old} was being \
             signed; nothing was issued: enroll the device again with a new token",
            end.revoked
        ),
        (Some(_), None) => format!(
            "certificate {old} was renewed by another request at the same time; nothing more \
             was issued: use the certificate that renewal returned"
        ),
        (None, None) => format!("certificate {old} is no longer in the inventory"),
    };
    Error::Est(est::Error::refused(est::Refusal::Forbidden, message))
}

/// A second enrollment for a subject that another valid certificate of the label holds.
pub(crate) fn subject_held(grant: &Grant, held_by: &str) -> Error {
    Error::Est(est::Error::refused(
        est::Refusal::Forbidden,
        format!(
            "certificate {held_by} already holds subject CN={} under label {} and is still \
             valid; a subject names one device at a time: renew that certificate \
             (simplereenroll), or have the PKI operator revoke it (issuer revoke {held_by}) \
             before enrolling again",
            grant.common_name, grant.label
        ),
    ))
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

/// The certificate, built from the profile and the grant only.
fn leaf_params(
    grant: &Grant,
    profile: &Profile,
    serial: Serial,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, grant.common_name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = grant
        .spiffe_id
        .iter()
        .filter_map(|u| u.to_string().try_into().ok().map(SanType::URI))
        .chain(
            grant
                .dns
                .iter()
                .filter_map(|d| d.clone().try_into().ok().map(SanType::DnsName)),
        )
        .chain(grant.ips.iter().map(|ip| SanType::IpAddress(*ip)))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = profile.rcgen_key_usages();
    params.extended_key_usages = profile.rcgen_extended_key_usages();
    params.serial_number = Some(serial.0.to_vec().into());
    params.not_before = not_before;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    params
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
