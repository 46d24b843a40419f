//! Short-lived signing keys (DESIGN §3 "Key custody").
//!
//! A discrete TPM signs 14–24 P-256 signatures a second, far below the EST budget. So the
//! issuing key, which never leaves its TPM or HSM, signs one certificate a day: a short-lived
//! P-256 key made in this process's memory, which then signs certificates at software speed.
//! The private half is never written anywhere; a restart makes a new one.
//!
//! Each signing key's certificate is *self-issued*: its subject is the issuing CA's own name,
//! and only the key differs (the RFC 5280 key-rollover form). Leaves therefore name the
//! issuing CA as their issuer, the CRL the issuing key signs covers them (OpenSSL finds the
//! CRL signer by name and authority key identifier), and verifiers that exempt self-issued
//! certificates from path-length counting see a three-level hierarchy.
//!
//! Rotation with overlap: with `lifetime` L and `overlap` O, a key signs for L. The next key
//! is certified and published in `cacerts` O before the current one stops signing, and the
//! old one stays published O after, so a client that fetched `cacerts` less than O before
//! enrolling can always verify what it gets. A signing key's certificate is valid until the
//! end of its signing period plus the longest leaf lifetime it may sign, so every
//! certificate it signed keeps a valid chain to its end.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca_key::HsmKey;
use crate::serial::Serial;
use crate::Error;
use proto::rfc3339;

/// `[ca.signing_key]` in issuer.toml.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyConfig {
    /// How long each short-lived key signs.
    #[serde(with = "proto::duration::serde_text", default = "default_lifetime")]
    pub lifetime: Duration,
    /// How long before taking over a key is published, and how long after it stops signing
    /// it stays published; at most half the lifetime.
    #[serde(with = "proto::duration::serde_text", default = "default_overlap")]
    pub overlap: Duration,
}

impl Default for SigningKeyConfig {
    fn default() -> Self {
        Self {
            lifetime: default_lifetime(),
            overlap: default_overlap(),
        }
    }
}

fn default_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_overlap() -> Duration {
    Duration::from_secs(3600)
}

impl SigningKeyConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.lifetime < Duration::from_secs(2) {
            return Err("ca.signing_key.lifetime must be at least 2s".into());
        }
        // checked: `overlap * 2` of a config's "500000000000y" overflows Duration (a panic).
        let twice = self.overlap.checked_mul(2);
        if self.overlap < Duration::from_secs(1) || twice.is_none_or(|twice| twice > self.lifetime)
        {
            return Err(format!(
                "ca.signing_key.overlap must be between 1s and half the lifetime ({})",
                proto::duration::format(self.lifetime / 2)
            ));
        }
        Ok(())
    }
}

/// One short-lived key and its certificate.
pub struct ShortLivedKey {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
    serial: Serial,
    signs_from: OffsetDateTime,
    signs_until: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for ShortLivedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShortLivedKey")
            .field("serial", &self.serial.to_string())
            .field("signs_from", &self.signs_from)
            .field("signs_until", &self.signs_until)
            .finish_non_exhaustive()
    }
}

impl ShortLivedKey {
    /// The rcgen issuer that signs leaves with this key.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Its certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Its certificate's serial.
    pub fn serial(&self) -> Serial {
        self.serial
    }

    /// When it starts signing.
    pub fn signs_from(&self) -> OffsetDateTime {
        self.signs_from
    }

    /// When the next key takes over.
    pub fn signs_until(&self) -> OffsetDateTime {
        self.signs_until
    }

    /// Its certificate's notAfter: no certificate it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

/// Where a key stands in its rotation, for `issuer status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Published, takes over at `signs_from`.
    Next,
    /// Signing now.
    Signing,
    /// Stopped signing; still published for the overlap.
    Retired,
}

/// The published short-lived keys, oldest first, and their rotation schedule.
#[derive(Debug)]
pub struct SigningKeys {
    config: SigningKeyConfig,
    /// The longest lifetime of a certificate these keys sign (from the profiles).
    longest_leaf: Duration,
    keys: RwLock<Vec<Arc<ShortLivedKey>>>,
}

impl SigningKeys {
    /// No keys yet; [`SigningKeys::certify_due`] makes the first.
    pub fn new(config: SigningKeyConfig, longest_leaf: Duration) -> Self {
        Self {
            config,
            longest_leaf,
            keys: RwLock::new(Vec::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ShortLivedKey>>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn overlap(&self) -> time::Duration {
        to_time(self.config.overlap)
    }

    /// The key that signs at `now`: the newest that has started, while it is inside its
    /// period plus the overlap (a TPM outage at rotation time delays the hand-over, it does
    /// not stop issuance, as long as it ends within the overlap).
    pub fn current(&self, now: OffsetDateTime) -> Result<Arc<ShortLivedKey>, Error> {
        let keys = self.read();
        keys.iter()
            .rev()
            .find(|k| k.signs_from <= now)
            .filter(|k| now < k.signs_until + self.overlap())
            .cloned()
            .ok_or_else(|| {
                Error::SigningKey(match keys.last() {
                    None => "no short-lived signing key has been certified yet".into(),
                    Some(last) => format!(
                        "the short-lived signing key stopped signing at {} and the issuing key \
                         has not certified its successor (see the issuer log)",
                        rfc3339(last.signs_until)
                    ),
                })
            })
    }

    /// The certificates `cacerts` publishes at `now`, newest first.
    pub fn published(&self, now: OffsetDateTime) -> Vec<Vec<u8>> {
        self.read()
            .iter()
            .rev()
            .filter(|k| now < k.signs_until + self.overlap())
            .map(|k| k.der.clone())
            .collect()
    }

    /// Every key still held, with its phase at `now`.
    pub fn phases(&self, now: OffsetDateTime) -> Vec<(Arc<ShortLivedKey>, Phase)> {
        let keys = self.read();
        let signing = keys.iter().rev().position(|k| k.signs_from <= now);
        keys.iter()
            .rev()
            .enumerate()
            .map(|(i, k)| {
                let phase = match signing {
                    Some(s) if i == s => Phase::Signing,
                    Some(s) if i > s => Phase::Retired,
                    _ => Phase::Next,
                };
                (k.clone(), phase)
            })
            .collect()
    }

    /// When the next key must be certified, given the keys held: at once without any, else
    /// `overlap` before the newest stops signing.
    pub fn next_due(&self) -> Option<OffsetDateTime> {
        self.read().last().map(|k| k.signs_until - self.overlap())
    }

    /// Certifies the next key with the issuing key if one is due at `now` (one hardware
    /// signature, so call it off the async threads). The key is not used until
    /// [`SigningKeys::publish`]: the caller records it durably first.
    pub fn certify_due(
        &self,
        now: OffsetDateTime,
        issuing: &Issuer<'static, HsmKey>,
        issuing_name: &DistinguishedName,
        issuing_not_after: OffsetDateTime,
    ) -> Result<Option<ShortLivedKey>, Error> {
        if self.next_due().is_some_and(|due| now < due) {
            return Ok(None);
        }
        // Normally the next key is made `overlap` ahead and takes over when the newest stops.
        // Made late (the issuing key was unreachable), it still gets half the overlap in
        // `cacerts` before it signs, while the newest signs on, within its own overlap.
        let overlap = self.overlap();
        let signs_from = match self.read().last() {
            Some(last) if now < last.signs_until + overlap => {
                let soonest: OffsetDateTime = now + overlap / 2;
                last.signs_until
                    .max(soonest.min(last.signs_until + overlap))
            }
            _ => now,
        };
        let signs_until = signs_from + to_time(self.config.lifetime);
        if signs_from >= issuing_not_after {
            return Err(Error::OutsideCaValidity(format!(
                "the issuing CA expires at {}; it cannot certify another signing key \
                 (install a new issuing CA)",
                rfc3339(issuing_not_after)
            )));
        }
        let not_after = (signs_until + overlap + to_time(self.longest_leaf)).min(issuing_not_after);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let serial = Serial::random();
        let mut params = CertificateParams::default();
        params.distinguished_name = issuing_name.clone();
        // pathLen 0: a signing key signs leaves only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.serial_number = Some(serial.0.to_vec().into());
        params.not_before = now - time::Duration::seconds(60);
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&key, issuing)
            .map_err(|e| crate::ca_key::key_fault(e, issuing.key()))?;
        Ok(Some(ShortLivedKey {
            der: certificate.der().to_vec(),
            issuer: Issuer::new(params, key),
            serial,
            signs_from,
            signs_until,
            not_after,
        }))
    }

    /// Adds a certified (and recorded) key, and drops the private halves of keys whose
    /// publication has ended.
    pub fn publish(&self, key: ShortLivedKey, now: OffsetDateTime) {
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let overlap = self.overlap();
        keys.retain(|k| now < k.signs_until + overlap);
        keys.push(Arc::new(key));
        keys.sort_by_key(|k| k.signs_from);
    }
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuing() -> (Issuer<'static, HsmKey>, DistinguishedName) {
        let key: Arc<dyn hsm::Signer> = Arc::new(hsm::SoftKey::generate().expect("key"));
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test Issuing CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let name = params.distinguished_name.clone();
        (Issuer::new(params, HsmKey(key)), name)
    }

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).expect("time")
    }

    #[test]
    fn rotation_publishes_the_next_key_before_it_signs_and_keeps_the_old_one_after() {
        let (issuing, name) = issuing();
        let ca_end = at(10 * 86_400);
        let keys = SigningKeys::new(
            SigningKeyConfig {
                lifetime: Duration::from_secs(100),
                overlap: Duration::from_secs(20),
            },
            Duration::from_secs(1000),
        );
        let first = keys
            .certify_due(at(0), &issuing, &name, ca_end)
            .expect("certify")
            .expect("due");
        assert_eq!(first.not_after(), at(100 + 20 + 1000));
        keys.publish(first, at(0));
        assert!(keys
            .certify_due(at(79), &issuing, &name, ca_end)
            .expect("ok")
            .is_none());
        let second = keys
            .certify_due(at(80), &issuing, &name, ca_end)
            .expect("certify")
            .expect("due");
        assert_eq!(second.signs_from(), at(100));
        let second_serial = second.serial();
        keys.publish(second, at(80));
        // Published before it signs; the first still signs.
        assert_eq!(keys.published(at(90)).len(), 2);
        assert_ne!(keys.current(at(99)).expect("key").serial(), second_serial);
        assert_eq!(keys.current(at(100)).expect("key").serial(), second_serial);
        // The first stays published for the overlap, then goes.
        assert_eq!(keys.published(at(119)).len(), 2);
        assert_eq!(keys.published(at(120)).len(), 1);
        let phases: Vec<Phase> = keys.phases(at(110)).into_iter().map(|(_, p)| p).collect();
        assert_eq!(phases, [Phase::Signing, Phase::Retired]);
    }

    #[test]
    fn a_missed_rotation_keeps_signing_through_the_overlap_then_refuses() {
        let (issuing, name) = issuing();
        let keys = SigningKeys::new(
            SigningKeyConfig {
                lifetime: Duration::from_secs(100),
                overlap: Duration::from_secs(20),
            },
            Duration::from_secs(10),
        );
        let first = keys
            .certify_due(at(0), &issuing, &name, at(86_400))
            .expect("certify")
            .expect("due");
        keys.publish(first, at(0));
        assert!(keys.current(at(119)).is_ok());
        // Made late but within the overlap: published for half the overlap before it signs.
        let late = keys
            .certify_due(at(105), &issuing, &name, at(86_400))
            .expect("certify")
            .expect("due");
        assert_eq!(late.signs_from(), at(115));
        let refused = keys.current(at(120)).expect_err("past the overlap");
        assert!(refused.to_string().contains("successor"), "{refused}");
        // A key certified late starts at once rather than in the past.
        let late = keys
            .certify_due(at(150), &issuing, &name, at(86_400))
            .expect("certify")
            .expect("due");
        assert_eq!(late.signs_from(), at(150));
    }

    #[test]
    fn signing_keys_never_outlive_the_issuing_ca() {
        let (issuing, name) = issuing();
        let keys = SigningKeys::new(SigningKeyConfig::default(), Duration::from_secs(86_400));
        let key = keys
            .certify_due(at(0), &issuing, &name, at(3600))
            .expect("certify")
            .expect("due");
        assert_eq!(key.not_after(), at(3600));
        assert!(keys
            .certify_due(at(3600), &issuing, &name, at(3600))
            .is_err());
    }

    #[test]
    fn overlap_must_fit_in_half_the_lifetime() {
        let config = SigningKeyConfig {
            lifetime: Duration::from_secs(10),
            overlap: Duration::from_secs(6),
        };
        assert!(config.validate().is_err());
        assert!(SigningKeyConfig::default().validate().is_ok());
    }
}
