//! Revocation: the operator's revocation of a certificate, and the CRL that publishes every
//! revocation (signed by the issuing CA, served on the CRL listener, handed to agents).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ca::CertificateAuthority;
use crate::clock::Clock;
use crate::crl::Crl;
use crate::metrics::Metrics;
use crate::serial::Serial;
use crate::state_volume::StateVolume;
use crate::store::{CertificateRecord, Status, Store};
use crate::Error;

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

/// Revokes certificates and keeps the CRL current.
#[derive(Debug)]
pub struct Revocation {
    ca: Arc<CertificateAuthority>,
    store: Store,
    clock: Arc<dyn Clock>,
    crl: Arc<Crl>,
    /// `[crl] validity`.
    validity: Duration,
    /// Where the CRL is also written (`state_dir/crl.der`) when a CRL listener is configured.
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    state_volume: StateVolume,
}

/// What builds a [`Revocation`].
#[derive(Debug)]
pub struct Parts {
    /// The CA that signs the CRL.
    pub ca: Arc<CertificateAuthority>,
    /// The store.
    pub store: Store,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The published CRL.
    pub crl: Arc<Crl>,
    /// `[crl] validity`.
    pub validity: Duration,
    /// Where the CRL is also written.
    pub file: Option<PathBuf>,
    /// Told when the inventory changes.
    pub metrics: Arc<Metrics>,
    /// The state folder's filesystem.
    pub state_volume: StateVolume,
}

impl Revocation {
    /// Revocation over `parts`.
    pub fn new(parts: Parts) -> Self {
        Self {
            ca: parts.ca,
            store: parts.store,
            clock: parts.clock,
            crl: parts.crl,
            validity: parts.validity,
            file: parts.file,
            metrics: parts.metrics,
            state_volume: parts.state_volume,
        }
    }

    /// The published CRL.
    pub fn crl(&self) -> &Arc<Crl> {
        &self.crl
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
            .revoke(
                &serial,
                self.clock.now().unix_timestamp(),
                request.reason.code(),
            )?
            .ok_or_else(|| unknown_serial(serial))?;
        self.store.audit_event(
            "certificate.revoked",
            serde_json::json!({
                "serial": record.serial.to_string(), "subject": record.subject,
                "reason": request.reason,
            }),
            self.clock.now(),
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

    /// Builds, signs and publishes a new CRL (also written to `state_dir/crl.der`).
    pub fn publish_crl(&self) -> Result<(), Error> {
        let now = self.clock.now();
        // A CRL dated outside the CA's validity is one no verifier takes; the last good one
        // stays published.
        crate::issuance::clock_within_ca(&self.ca, now)?;
        let revocations = self.store.certificates.revocations(now.unix_timestamp())?;
        let number = self.store.certificates.next_crl_number()?;
        let next_update = (now + self.validity).min(self.ca.not_after());
        let der = self.ca.sign_crl(crate::crl::crl_params(
            &revocations,
            number,
            now,
            next_update,
        )?)?;
        if let Some(path) = &self.file {
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
            if self.crl.due(self.clock.now().unix_timestamp()) {
                if let Err(e) = self.publish_crl() {
                    tracing::error!(error = %e, "re-issuing the CRL failed; retrying in 30 s");
                }
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
