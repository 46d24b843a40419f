//! The issuing authority: the issuance pipeline ([`crate::issuance`]) with what the EST,
//! agent and admin surfaces need beside it: the token office ([`crate::tokens`]), revocation
//! and the CRL ([`crate::revocation`]), inventory and status answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{CertificateAuthority, SignWith};
use crate::clock::Clock;
use crate::config::Config;
use crate::grant::Grant;
use crate::profile::Profile;
use crate::serial::Serial;
use crate::store::{CertificateRecord, InventoryPage, InventoryQuery, Store};
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
    /// One-time tokens: creation, listing, revocation.
    pub(crate) tokens: crate::tokens::TokenOffice,
    /// Certificate revocation and the CRL.
    pub(crate) revocation: Arc<crate::revocation::Revocation>,
    pub(crate) clock: Arc<dyn Clock>,
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
        let listener_names =
            crate::grant::ListenerNames::load(&config.resolve(&config.est.tls_certificate));
        let tokens = crate::tokens::TokenOffice::new(crate::tokens::Parts {
            store: store.clone(),
            clock: clock.clone(),
            profiles: config.profiles.clone(),
            default_profile: config.default_profile.clone(),
            trust_domain: config.trust_domain.clone(),
            default_ttl: config.tokens.default_ttl,
            max_ttl: config.tokens.max_ttl,
            state_volume: state_volume.clone(),
            listener_names: listener_names.clone(),
        });
        let revocation = Arc::new(crate::revocation::Revocation::new(
            crate::revocation::Parts {
                ca: ca.clone(),
                store: store.clone(),
                clock: clock.clone(),
                crl,
                validity: config
                    .crl
                    .as_ref()
                    .map_or(Duration::from_secs(7 * 86_400), |c| c.validity),
                file: config
                    .crl
                    .as_ref()
                    .map(|_| config.state_dir().join("crl.der")),
                metrics: metrics.clone(),
                state_volume: state_volume.clone(),
            },
        ));
        Ok(Self {
            pipeline,
            ca,
            store,
            profiles: config.profiles.clone(),
            spiffe_profiles,
            default_profile: config.default_profile.clone(),
            trust_domain: config.trust_domain.clone(),
            tokens,
            revocation,
            clock,
            metrics,
            state_volume,
            lockouts: crate::lockout::Lockouts::new(config.tokens.lockout),
            renewal_retry_window: config.est.renewal_retry_window,
            listener_names,
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
        self.store.audit_event(kind, detail, self.now())
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
            crl_url: self.revocation.crl().url().map(str::to_owned),
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
