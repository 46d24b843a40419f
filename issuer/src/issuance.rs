//! The issuance pipeline (DESIGN §3), the one path every certificate takes:
//! authorize (the caller hands in a [`Grant`]) → build from the profile with a random serial
//! → sign → check → record (certificate, token spend, supersede and audit record in one
//! write) → durable commit → respond.
//!
//! It knows nothing of the dashboard, metrics or CRL serving: they observe it through
//! [`IssuanceObserver`], and the CRL's URL reaches it as a plain value set at start.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, SanType};
use time::OffsetDateTime;

use crate::ca::{CertificateAuthority, SignWith, SubjectKey};
use crate::clock::Clock;
use crate::grant::Grant;
use crate::profile::Profile;
use crate::serial::Serial;
use crate::state_volume::StateVolume;
use crate::store::{
    AuditEvent, CertificateRecord, Consumed, Issuance, Issued, LineageEnd, Renewal, Status, Store,
};
use crate::Error;

/// Told of every certificate issued (metrics count them and time them).
pub trait IssuanceObserver: Send + Sync + std::fmt::Debug {
    /// A certificate under `label` was issued and committed, `elapsed` after signing began.
    fn issued(&self, label: &str, elapsed: Duration);
}

/// The pipeline and what it needs: the CA, the store, the profiles and the clock.
#[derive(Debug)]
pub struct Pipeline {
    ca: Arc<CertificateAuthority>,
    store: Store,
    /// EST labels' profiles.
    profiles: BTreeMap<String, Profile>,
    /// The SVID profiles (`svid`, `node-svid`), apart from the EST labels.
    spiffe_profiles: BTreeMap<String, Profile>,
    clock: Arc<dyn Clock>,
    /// notBefore is set this far back so devices whose clocks lag accept new certificates.
    backdate: time::Duration,
    /// Checked before anything is written: a full or read-only disk answers 503.
    state_volume: StateVolume,
    /// The CRL distribution point put in certificates, once the CRL listener is bound.
    distribution_point: Arc<OnceLock<String>>,
    observer: OnceLock<Arc<dyn IssuanceObserver>>,
}

/// What builds a [`Pipeline`].
#[derive(Debug)]
pub struct Parts {
    /// The CA.
    pub ca: Arc<CertificateAuthority>,
    /// The store.
    pub store: Store,
    /// EST labels' profiles.
    pub profiles: BTreeMap<String, Profile>,
    /// SVID profiles.
    pub spiffe_profiles: BTreeMap<String, Profile>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// `[issuance] backdate`.
    pub backdate: time::Duration,
    /// The state folder's filesystem.
    pub state_volume: StateVolume,
    /// The CRL distribution point, set once known.
    pub distribution_point: Arc<OnceLock<String>>,
}

impl Pipeline {
    /// The pipeline over `parts`.
    pub fn new(parts: Parts) -> Self {
        Self {
            ca: parts.ca,
            store: parts.store,
            profiles: parts.profiles,
            spiffe_profiles: parts.spiffe_profiles,
            clock: parts.clock,
            backdate: parts.backdate,
            state_volume: parts.state_volume,
            distribution_point: parts.distribution_point,
            observer: OnceLock::new(),
        }
    }

    /// Tells `observer` of every certificate issued from now on (set once, at start).
    pub fn observe(&self, observer: Arc<dyn IssuanceObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Whether `grant`'s certificate must be its subject's only valid one under its label:
    /// enrollments by token, unless the profile shares subjects. SVIDs overlap by design
    /// (rotation), and a renewal hands the subject on within its lineage.
    pub fn unique_subject(&self, grant: &Grant) -> bool {
        grant.token.is_some()
            && grant.renews.is_none()
            && self
                .profiles
                .get(&grant.label)
                .is_some_and(|profile| !profile.shared_subjects)
    }

    /// Issues a certificate for `public_key` (uncompressed P-256 point) under `grant`, signed
    /// by the key its profile names, or by `sign_with` when given.
    pub async fn issue(
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
        let now = self.clock.now();
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
        let der = loop {
            let serial = Serial::random();
            // Back-dated for lagging clocks, but never before the issuing CA's own start.
            let not_before = (now - self.backdate).max(self.ca.not_before());
            let mut params = leaf_params(grant, profile, serial, not_before, not_after);
            if let Some(url) = self.distribution_point.get() {
                params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                    uris: vec![url.clone()],
                }];
            }
            let der = signer.sign(&params, &subject_key).await?;
            crate::check::leaf(&der, grant, ca_not_after.unix_timestamp())?;
            let record = CertificateRecord {
                serial,
                subject: grant.common_name.clone(),
                sans: grant.san_strings(),
                label: grant.label.clone(),
                owner: grant.owner.clone(),
                issued_at: now.unix_timestamp(),
                not_after: not_after.unix_timestamp(),
                status: Status::Valid,
                renews: grant.renews,
                der,
            };
            let audit = AuditEvent {
                kind: "certificate.issued".into(),
                detail: serde_json::json!({
                    "serial": record.serial.to_string(),
                    "subject": record.subject,
                    "sans": record.sans,
                    "label": record.label,
                    "owner": record.owner,
                    "not_after": record.not_after,
                    "renews": record.renews.map(|s| s.to_string()),
                }),
            };
            // The certificate, the token it spends, the predecessor it supersedes and its
            // audit record are one write, made only if all of it can be: of concurrent
            // requests with one token the first to get here wins and the others' signatures
            // are dropped; a renewal racing a revocation yields nothing; a serial collision
            // (odds 2^-127) signs again with a new serial, the discarded signature never
            // having left the process.
            let issued = self.store.record_issuance(Issuance {
                serial: &serial,
                record: &record,
                renews: grant.renews.as_ref(),
                token: grant.token.as_ref(),
                unique_subject: self.unique_subject(grant),
                audit: (audit, crate::store::audit_ms(now)),
                now: now.unix_timestamp(),
            })?;
            match issued {
                Issued::Recorded => break record.der,
                Issued::SerialTaken => continue,
                Issued::TokenRefused(consumed) => return Err(token_refused(consumed)),
                Issued::SubjectHeld(held_by) => return Err(subject_held(grant, &held_by)),
                Issued::PredecessorNotCurrent(Renewal::PredecessorNotCurrent { status, ended }) => {
                    let old = grant.renews.unwrap_or(serial);
                    return Err(renewal_overtaken(old, status, ended));
                }
                Issued::PredecessorNotCurrent(other) => {
                    return Err(Error::Store(format!(
                        "unexpected renewal outcome {other:?}"
                    )))
                }
            }
        };
        self.store.durability.commit().await?;
        if let Some(observer) = self.observer.get() {
            observer.issued(&grant.label, started.elapsed());
        }
        Ok(der)
    }

    /// Whether anything could be issued now: the state folder takes writes and the clock is
    /// inside the issuing CA's validity. Checked before authentication, and again in the
    /// pipeline itself.
    pub fn ready(&self) -> Result<(), Error> {
        self.state_volume.check()?;
        self.check_clock_within_ca(self.clock.now())
    }

    /// A clock outside the issuing CA's validity is a wrong clock (a gateway whose RTC
    /// battery died boots in 2000; a VM restored from an old snapshot): refuse to issue
    /// rather than sign certificates no verifier will accept.
    pub fn check_clock_within_ca(&self, now: OffsetDateTime) -> Result<(), Error> {
        clock_within_ca(&self.ca, now)
    }
}

/// Whether `now` lies inside `ca`'s validity: nothing is signed (certificate or CRL) with a
/// clock outside it.
pub(crate) fn clock_within_ca(ca: &CertificateAuthority, now: OffsetDateTime) -> Result<(), Error> {
    let (ca_from, ca_until) = (ca.not_before(), ca.not_after());
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

/// Why a token can't enroll, in words the engineer can act on.
fn token_refused(consumed: Consumed) -> Error {
    let refused = |m: &str| Error::Est(est::Error::refused(est::Refusal::Unauthorized, m));
    match consumed {
        Consumed::Ok(_) => Error::Store("a usable token was refused".into()),
        Consumed::AlreadyUsed(_) => refused(
            "this token was already used; tokens are single use, ask the PKI operator for a new one",
        ),
        Consumed::Expired(_) => refused("this token expired; ask the PKI operator for a new one"),
        Consumed::Revoked(_) => {
            refused("this token was revoked by the PKI operator; ask them for a new one")
        }
        Consumed::Unknown => refused("unknown token"),
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
