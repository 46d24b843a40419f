//! Every certificate the issuer has signed, keyed by serial, with an index keyed by
//! `not_after || serial` so "what expires in the next 30 days" is a range scan.
//!
//! The index entry's value is the certificate's stored status (one byte), so questions that
//! filter only on time and status (the metrics gauges every few seconds, the CLI's
//! `--status`) are answered from the index alone. Reading every record instead pulled the
//! whole inventory through sled's page cache on each refresh: the issuer's memory grew with
//! every certificate it had ever issued.
//!
//! Renewals form lineages (DESIGN §3): a renewal belongs to the lineage of the certificate
//! it renews, whose root is the first certificate's serial. A `certificate_links` entry
//! names a renewal's lineage and, once renewed, a certificate's successor; a certificate
//! without one (every first certificate, and everything recorded before lineages existed)
//! is its own lineage root with no successor. Revoking any member writes the lineage into
//! `lineages_ended` in the revocation's own transaction; nothing of an ended lineage renews.

use super::journal::{Journal, Write};
use crate::serial::Serial;
use crate::store::{
    CertificateRecord, InventoryPage, InventoryQuery, Lineage, LineageEnd, NewRecord, Renewal,
    Revocation, Status,
};
use crate::Error;
use serde::{Deserialize, Serialize};

/// A certificate record as the `certificates` tree holds it (JSON): serials as hex, DER as
/// base64. Its bytes must not change: stores written by earlier issuers open as they are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    serial: String,
    subject: String,
    sans: Vec<String>,
    label: String,
    owner: String,
    issued_at: i64,
    not_after: i64,
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    renews: Option<String>,
    /// Absent on pending reservations.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    der: String,
}

impl From<&CertificateRecord> for Stored {
    fn from(r: &CertificateRecord) -> Self {
        use base64::Engine;
        Self {
            serial: r.serial.to_string(),
            subject: r.subject.clone(),
            sans: r.sans.clone(),
            label: r.label.clone(),
            owner: r.owner.clone(),
            issued_at: r.issued_at,
            not_after: r.not_after,
            status: r.status,
            renews: r.renews.map(|s| s.to_string()),
            der: if r.der.is_empty() {
                String::new()
            } else {
                base64::engine::general_purpose::STANDARD.encode(&r.der)
            },
        }
    }
}

impl Stored {
    /// The domain record; without its DER unless `with_der` (inventory rows never carry it,
    /// and decoding it for every row of a page would be wasted work).
    fn into_record(self, with_der: bool) -> Result<CertificateRecord, Error> {
        use base64::Engine;
        let serial = |text: &str| {
            Serial::parse(text).ok_or_else(|| {
                Error::Store(format!("certificate record: {text:?} is not a serial"))
            })
        };
        let der = if with_der && !self.der.is_empty() {
            base64::engine::general_purpose::STANDARD
                .decode(&self.der)
                .map_err(|e| Error::Store(format!("certificate {}: {e}", self.serial)))?
        } else {
            Vec::new()
        };
        Ok(CertificateRecord {
            serial: serial(&self.serial)?,
            subject: self.subject,
            sans: self.sans,
            label: self.label,
            owner: self.owner,
            issued_at: self.issued_at,
            not_after: self.not_after,
            status: self.status,
            renews: self.renews.as_deref().map(serial).transpose()?,
            der,
        })
    }
}

/// The certificate table, its expiry index, and the revocation list.
#[derive(Debug, Clone)]
pub struct Certificates {
    by_serial: sled::Tree,
    by_expiry: sled::Tree,
    revocations: sled::Tree,
    meta: sled::Tree,
    /// serial → [`Link`], for renewals and renewed certificates only.
    links: sled::Tree,
    /// lineage root serial → [`LineageEnd`].
    ended: sled::Tree,
    /// `label NUL subject` → serial of the newest certificate issued for that subject under
    /// that label: what makes "one valid certificate per subject" one lookup.
    holders: sled::Tree,
    journal: Journal,
}

/// A certificate's place in its lineage, for renewals and renewed certificates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Link {
    /// The lineage's root serial (hex); absent, the certificate is its own root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lineage: Option<String>,
    /// The certificate that renewed this one (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    successor: Option<String>,
}

/// The byte the expiry index holds for `status`.
fn index_byte(status: Status) -> u8 {
    match status {
        Status::Valid => 0,
        Status::Expired => 1,
        Status::Revoked => 2,
        Status::Superseded => 3,
    }
}

/// The status an expiry index value holds; None for an entry written before the index
/// carried it (or anything unexpected): the record then decides.
fn status_from_index(value: &[u8]) -> Option<Status> {
    match value {
        [0] => Some(Status::Valid),
        [1] => Some(Status::Expired),
        [2] => Some(Status::Revoked),
        [3] => Some(Status::Superseded),
        _ => None,
    }
}

pub(in crate::store) fn expiry_key(not_after: i64, serial: &Serial) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&(not_after.max(0) as u64).to_be_bytes());
    key[8..].copy_from_slice(&serial.0);
    key
}

impl Certificates {
    pub(in crate::store) fn open(db: &sled::Db, journal: Journal) -> Result<Self, Error> {
        let store = Self {
            by_serial: db.open_tree("certificates")?,
            by_expiry: db.open_tree("certificates_by_expiry")?,
            revocations: db.open_tree("revocations")?,
            meta: db.open_tree("meta")?,
            links: db.open_tree("certificate_links")?,
            ended: db.open_tree("lineages_ended")?,
            holders: db.open_tree("subject_holders")?,
            journal,
        };
        store.put_status_in_index()?;
        store.fill_subject_holders()?;
        Ok(store)
    }

    /// Stores written before the expiry index carried the status have empty index values;
    /// fill them in once so status counts need no record reads there either. Queries stay
    /// correct without it (an empty value sends them to the record), so an interrupted run
    /// only leaves work for the next start.
    fn put_status_in_index(&self) -> Result<(), Error> {
        const DONE: &str = "expiry_index_has_status";
        if self.meta.contains_key(DONE)? {
            return Ok(());
        }
        let mut filled = 0usize;
        for entry in self.by_expiry.iter() {
            let (key, value) = entry?;
            if status_from_index(&value).is_some() {
                continue;
            }
            let Some(serial) = key.get(8..) else {
                continue;
            };
            // A record that does not decode keeps its empty value: queries that reach it
            // report it as they always did, and the issuer still starts.
            if let Some(Ok(record)) = self.by_serial.get(serial)?.map(|b| decode_stored(&b)) {
                self.by_expiry
                    .insert(key, &[index_byte(record.status)][..])?;
                filled += 1;
            }
        }
        self.meta.insert(DONE, &[1u8][..])?;
        if filled > 0 {
            tracing::info!(filled, "expiry index now carries each certificate's status");
        }
        Ok(())
    }

    /// Stores written before subjects had holders get them once: for each (label, subject),
    /// the newest certificate still valid. An interrupted run is simply repeated.
    fn fill_subject_holders(&self) -> Result<(), Error> {
        const DONE: &str = "subject_holders_filled";
        if self.meta.contains_key(DONE)? {
            return Ok(());
        }
        let mut newest: std::collections::BTreeMap<Vec<u8>, (i64, Vec<u8>)> = Default::default();
        for entry in self.by_serial.iter() {
            let (serial, bytes) = entry?;
            let Ok(record) = decode_stored(&bytes) else {
                continue;
            };
            if record.status != Status::Valid {
                continue;
            }
            let key = holder_key(&record.label, &record.subject);
            let slot = newest.entry(key).or_insert((i64::MIN, Vec::new()));
            if record.issued_at >= slot.0 {
                *slot = (record.issued_at, serial.to_vec());
            }
        }
        for (key, (_, serial)) in &newest {
            self.holders.insert(key, serial.as_slice())?;
        }
        self.meta.insert(DONE, &[1u8][..])?;
        if !newest.is_empty() {
            tracing::info!(
                subjects = newest.len(),
                "recorded which certificate holds each subject"
            );
        }
        Ok(())
    }

    /// [`record_new_holding`](Self::record_new_holding) as part of `write`: checks, then
    /// writes only if the certificate can be recorded.
    pub(super) fn record_new_in(
        &self,
        write: &mut Write<'_>,
        serial: &Serial,
        record: &CertificateRecord,
        unique_subject: bool,
    ) -> Result<NewRecord, Error> {
        if self.by_serial.contains_key(serial.0)? {
            return Ok(NewRecord::SerialTaken);
        }
        let holder = holder_key(&record.label, &record.subject);
        if unique_subject {
            if let Some(held_by) = self.holders.get(&holder)? {
                if let Some(bytes) = self.by_serial.get(&held_by)? {
                    let current = decode_row(&bytes)?;
                    if current.status_at(record.issued_at) == Status::Valid {
                        return Ok(NewRecord::SubjectHeld(current.serial.to_string()));
                    }
                }
            }
        }
        write.insert(&self.by_serial, serial.0, encode(record)?)?;
        write.insert(
            &self.by_expiry,
            expiry_key(record.not_after, serial),
            [index_byte(record.status)],
        )?;
        write.insert(&self.holders, holder, serial.0)?;
        Ok(NewRecord::Recorded)
    }

    /// [`record_renewal`](Self::record_renewal) as part of `write`.
    pub(super) fn record_renewal_in(
        &self,
        write: &mut Write<'_>,
        serial: &Serial,
        record: &CertificateRecord,
        predecessor: &Serial,
    ) -> Result<Renewal, Error> {
        if self.by_serial.contains_key(serial.0)? {
            return Ok(Renewal::SerialTaken);
        }
        let Some(old_bytes) = self.by_serial.get(predecessor.0)? else {
            return Ok(Renewal::PredecessorNotCurrent {
                status: None,
                ended: None,
            });
        };
        let mut old = decode_stored(&old_bytes)?;
        let mut old_link = match self.links.get(predecessor.0)? {
            Some(bytes) => decode_link(&bytes)?,
            None => Link::default(),
        };
        let root = lineage_root(predecessor, &old_link);
        let end = self
            .ended
            .get(root.0)?
            .map(|bytes| decode_end(&bytes))
            .transpose()?;
        if old.status != Status::Valid || old_link.successor.is_some() || end.is_some() {
            return Ok(Renewal::PredecessorNotCurrent {
                status: Some(old.status),
                ended: end,
            });
        }
        old.status = Status::Superseded;
        old_link.successor = Some(serial.to_string());
        let new_link = Link {
            lineage: Some(root.to_string()),
            successor: None,
        };
        let (value, old_value) = (encode(record)?, encode_stored(&old)?);
        let (old_link, new_link) = (encode_link(&old_link)?, encode_link(&new_link)?);
        write.insert(&self.by_serial, serial.0, value)?;
        write.insert(
            &self.by_expiry,
            expiry_key(record.not_after, serial),
            [index_byte(record.status)],
        )?;
        write.insert(&self.links, serial.0, new_link)?;
        write.insert(&self.by_serial, predecessor.0, old_value)?;
        write.insert(
            &self.by_expiry,
            expiry_key(old.not_after, predecessor),
            [index_byte(Status::Superseded)],
        )?;
        write.insert(&self.links, predecessor.0, old_link)?;
        write.insert(
            &self.holders,
            holder_key(&record.label, &record.subject),
            serial.0,
        )?;
        Ok(Renewal::Recorded)
    }

    /// Whether every expiry index entry carries its status (tests of the migration).
    #[cfg(test)]
    pub(in crate::store) fn index_has_status(&self) -> bool {
        self.by_expiry
            .iter()
            .all(|entry| entry.is_ok_and(|(_, value)| status_from_index(&value).is_some()))
    }
}

impl crate::store::CertificateStore for Certificates {
    /// Marks a certificate revoked and adds it to the revocation list, in one transaction.
    /// Returns the record as it was, or None if no such certificate.
    fn revoke(
        &self,
        serial: &Serial,
        revoked_at: i64,
        reason_code: u8,
    ) -> Result<Option<CertificateRecord>, Error> {
        let mut write = self.journal.begin()?;
        let Some(bytes) = self.by_serial.get(serial.0)? else {
            return Ok(None);
        };
        let unreadable = || {
            Error::Store(format!(
                "certificate record or lineage link {serial} does not parse"
            ))
        };
        // The whole lineage stops renewing with this revocation, in the same write: a
        // renewal racing it either was written first or finds the lineage ended.
        let link = match self.links.get(serial.0)? {
            Some(bytes) => decode_link(&bytes).map_err(|_| unreadable())?,
            None => Link::default(),
        };
        let root = lineage_root(serial, &link);
        let mut record = decode_stored(&bytes).map_err(|_| unreadable())?;
        let before = record.clone().into_record(true)?;
        record.status = Status::Revoked;
        let entry = Revocation {
            serial: record.serial.clone(),
            revoked_at,
            reason_code,
            not_after: record.not_after,
        };
        let entry = serde_json::to_vec(&entry).map_err(|e| Error::Store(e.to_string()))?;
        if self.ended.get(root.0)?.is_none() {
            let end = LineageEnd {
                revoked: serial.to_string(),
                at: revoked_at,
            };
            let end = serde_json::to_vec(&end).map_err(|e| Error::Store(e.to_string()))?;
            write.insert(&self.ended, root.0, end)?;
        }
        write.insert(&self.by_serial, serial.0, encode_stored(&record)?)?;
        write.insert(
            &self.by_expiry,
            expiry_key(record.not_after, serial),
            [index_byte(Status::Revoked)],
        )?;
        write.insert(&self.revocations, serial.0, entry)?;
        Ok(Some(before))
    }

    /// Every revocation of a certificate not yet expired at `now`.
    fn revocations(&self, now: i64) -> Result<Vec<Revocation>, Error> {
        let mut out = Vec::new();
        for entry in self.revocations.iter() {
            let (_, bytes) = entry?;
            let revocation: Revocation = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Store(format!("revocation record: {e}")))?;
            if revocation.not_after > now {
                out.push(revocation);
            }
        }
        Ok(out)
    }

    /// The next CRL number (RFC 5280 §5.2.3: monotonically increasing), persisted.
    fn next_crl_number(&self) -> Result<u64, Error> {
        let mut write = self.journal.begin()?;
        let next = self
            .meta
            .get("crl_number")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(0, u64::from_be_bytes)
            + 1;
        write.insert(&self.meta, "crl_number", next.to_be_bytes())?;
        Ok(next)
    }

    /// The valid certificate (at `now`) that holds `subject` under `label`, if any: the
    /// newest one recorded for it. Renewals hand the subject on within a lineage.
    fn subject_holder(
        &self,
        label: &str,
        subject: &str,
        now: i64,
    ) -> Result<Option<CertificateRecord>, Error> {
        let Some(serial) = self.holders.get(holder_key(label, subject))? else {
            return Ok(None);
        };
        Ok(self
            .by_serial
            .get(serial)?
            .map(|b| decode(&b))
            .transpose()?
            .filter(|r| r.status_at(now) == Status::Valid))
    }

    /// Records a newly issued certificate and its index entry in one transaction, only if
    /// `serial` was never used; returns false (writing nothing) if it was.
    fn record_new(&self, serial: &Serial, record: &CertificateRecord) -> Result<bool, Error> {
        match self.record_new_holding(serial, record, false)? {
            NewRecord::Recorded => Ok(true),
            NewRecord::SerialTaken | NewRecord::SubjectHeld(_) => Ok(false),
        }
    }

    /// [`record_new`](Self::record_new), and the certificate becomes its subject's holder.
    /// With `unique_subject`, only while no other certificate of the label holds the subject
    /// validly, checked inside the transaction so two concurrent enrollments can't both win.
    fn record_new_holding(
        &self,
        serial: &Serial,
        record: &CertificateRecord,
        unique_subject: bool,
    ) -> Result<NewRecord, Error> {
        let mut write = self.journal.begin()?;
        self.record_new_in(&mut write, serial, record, unique_subject)
    }

    /// Records `record` (serial `serial`) as the renewal of `predecessor` and supersedes the
    /// predecessor, in one write: only if the serial is unused, the predecessor's stored
    /// status is still valid and its lineage has not ended. A revocation written in between
    /// is never overwritten, and a renewal racing it yields nothing. The new certificate
    /// joins the predecessor's lineage.
    fn record_renewal(
        &self,
        serial: &Serial,
        record: &CertificateRecord,
        predecessor: &Serial,
    ) -> Result<Renewal, Error> {
        let mut write = self.journal.begin()?;
        self.record_renewal_in(&mut write, serial, record, predecessor)
    }

    /// Where `serial` stands in its lineage: its root, its successor and whether the
    /// lineage ended. A certificate recorded before lineages existed is its own root.
    fn lineage(&self, serial: &Serial) -> Result<Lineage, Error> {
        let link = match self.links.get(serial.0)? {
            Some(bytes) => decode_link(&bytes)?,
            None => Link::default(),
        };
        let root = lineage_root(serial, &link);
        let ended = self
            .ended
            .get(root.0)?
            .map(|b| decode_end(&b))
            .transpose()?;
        let successor = match &link.successor {
            Some(text) => Some(Serial::parse(text).ok_or_else(|| {
                Error::Store(format!(
                    "certificate {serial}: successor {text:?} is not a serial"
                ))
            })?),
            None => None,
        };
        Ok(Lineage {
            root,
            successor,
            ended,
        })
    }

    /// The record for `serial`.
    fn get(&self, serial: &Serial) -> Result<Option<CertificateRecord>, Error> {
        self.by_serial
            .get(serial.0)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Changes a certificate's status (revocation, renewal).
    fn set_status(&self, serial: &Serial, status: Status) -> Result<bool, Error> {
        let mut write = self.journal.begin()?;
        let Some(current) = self.by_serial.get(serial.0)? else {
            return Ok(false);
        };
        let mut record = decode_stored(&current)?;
        record.status = status;
        write.insert(&self.by_serial, serial.0, encode_stored(&record)?)?;
        write.insert(
            &self.by_expiry,
            expiry_key(record.not_after, serial),
            [index_byte(status)],
        )?;
        Ok(true)
    }

    /// Answers an inventory query as of `now` (unix seconds).
    fn query(&self, query: &InventoryQuery, now: i64) -> Result<InventoryPage, Error> {
        let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
        let (low, high) = match query.expiring_within_secs {
            Some(secs) => {
                let end = now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX));
                (
                    (now.max(0) as u64 + 1).to_be_bytes(),
                    (end.max(0) as u64 + 1).to_be_bytes(),
                )
            }
            None => (0u64.to_be_bytes(), u64::MAX.to_be_bytes()),
        };
        let cursor = match &query.after {
            Some(text) => {
                let bytes = hex::decode(text).map_err(|_| {
                    Error::Store("the paging cursor is not one this issuer gave out".into())
                })?;
                Some(bytes)
            }
            None => None,
        };
        // Time and status come from the index; only the other filters and the rows of the
        // page need the record.
        let needs_record = query.label.is_some()
            || query.owner.is_some()
            || query.subject.is_some()
            || query.spiffe_prefix.is_some();
        let subject_needle = query.subject.as_ref().map(|s| s.to_lowercase());
        let mut certificates = Vec::new();
        let mut last_key = Vec::new();
        let mut total = 0usize;
        let mut past_cursor_matches = 0usize;
        for entry in self.by_expiry.range(low.to_vec()..high.to_vec()) {
            let (key, value) = entry?;
            // Every key is notAfter (8 bytes) || serial (16); skip anything else.
            let Some(not_after) = key.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                continue;
            };
            let not_after = i64::try_from(u64::from_be_bytes(not_after)).unwrap_or(i64::MAX);
            let indexed = status_from_index(&value).map(|s| s.at(not_after, now));
            if let (Some(wanted), Some(status)) = (query.status, indexed) {
                if wanted != status {
                    continue;
                }
            }
            let past_cursor = cursor.as_deref().is_none_or(|c| key.as_ref() > c);
            let wanted_row = past_cursor && certificates.len() < limit;
            let status_unknown = query.status.is_some() && indexed.is_none();
            let record = if needs_record || wanted_row || status_unknown {
                let Some(bytes) = self.by_serial.get(&key[8..])? else {
                    continue;
                };
                let mut record = decode_row(&bytes)?;
                record.status = record.status_at(now);
                let spiffe_match = |prefix: &String| {
                    record.sans.iter().any(|san| {
                        san.strip_prefix("uri:")
                            .is_some_and(|u| u.starts_with(prefix.as_str()))
                    })
                };
                if query.label.as_ref().is_some_and(|l| *l != record.label)
                    || query.status.is_some_and(|s| s != record.status)
                    || query.owner.as_ref().is_some_and(|o| *o != record.owner)
                    || subject_needle
                        .as_ref()
                        .is_some_and(|n| !record.subject.to_lowercase().contains(n.as_str()))
                    || query
                        .spiffe_prefix
                        .as_ref()
                        .is_some_and(|p| !spiffe_match(p))
                {
                    continue;
                }
                Some(record)
            } else {
                None
            };
            total += 1;
            if past_cursor {
                past_cursor_matches += 1;
                if let (true, Some(record)) = (wanted_row, record) {
                    certificates.push(record);
                    last_key = key.to_vec();
                }
            }
            if query.skip_total && past_cursor_matches > certificates.len() {
                // The page is full and one more row exists: that is all a page needs.
                break;
            }
        }
        let next = (past_cursor_matches > certificates.len()).then(|| hex::encode(&last_key));
        Ok(InventoryPage {
            certificates,
            next,
            total: (!query.skip_total).then_some(total),
        })
    }

    /// Number of certificate records.
    fn len(&self) -> usize {
        self.by_serial.len()
    }

    /// Whether nothing was ever issued.
    fn is_empty(&self) -> bool {
        self.by_serial.is_empty()
    }
}

pub(super) fn encode(record: &CertificateRecord) -> Result<Vec<u8>, Error> {
    encode_stored(&Stored::from(record))
}

fn encode_stored(stored: &Stored) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(stored).map_err(|e| Error::Store(e.to_string()))
}

fn decode_stored(bytes: &[u8]) -> Result<Stored, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("certificate record: {e}")))
}

/// The whole record, DER included.
fn decode(bytes: &[u8]) -> Result<CertificateRecord, Error> {
    decode_stored(bytes)?.into_record(true)
}

/// The record without its DER.
fn decode_row(bytes: &[u8]) -> Result<CertificateRecord, Error> {
    decode_stored(bytes)?.into_record(false)
}

fn encode_link(link: &Link) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(link).map_err(|e| Error::Store(e.to_string()))
}

fn decode_link(bytes: &[u8]) -> Result<Link, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("lineage link: {e}")))
}

fn decode_end(bytes: &[u8]) -> Result<LineageEnd, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("lineage end: {e}")))
}

fn holder_key(label: &str, subject: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(label.len() + 1 + subject.len());
    key.extend_from_slice(label.as_bytes());
    key.push(0);
    key.extend_from_slice(subject.as_bytes());
    key
}

/// The lineage root of `serial`: the link's, else itself (a first certificate, or one
/// recorded before lineages existed). An unparsable root also falls back to itself, so a
/// damaged link can't merge two lineages.
fn lineage_root(serial: &Serial, link: &Link) -> Serial {
    link.lineage
        .as_deref()
        .and_then(Serial::parse)
        .unwrap_or(*serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as issuers before the typed domain record wrote it, byte for byte.
    const TODAY: &str = concat!(
        r#"{"serial":"4f1c2a9e0b7d3c5e6a8f0b1c2d3e4f50","subject":"gw-1","#,
        r#""sans":["dns:gw-1.plant.test","ip:10.0.0.7"],"label":"device","#,
        r#""owner":"renewal:1a2b3c4d5e6f708192a3b4c5d6e7f801","issued_at":1700000000,"#,
        r#""not_after":1702592000,"status":"superseded","#,
        r#""renews":"1a2b3c4d5e6f708192a3b4c5d6e7f801","der":"MAMCAQE="}"#
    );

    #[test]
    fn a_record_stored_in_todays_format_decodes_and_encodes_to_the_same_bytes() {
        let record = decode(TODAY.as_bytes()).expect("decodes");
        assert_eq!(
            record.serial,
            Serial::parse("4f1c2a9e0b7d3c5e6a8f0b1c2d3e4f50").expect("serial")
        );
        assert_eq!(
            record.renews,
            Serial::parse("1a2b3c4d5e6f708192a3b4c5d6e7f801")
        );
        assert_eq!(record.der, [0x30, 0x03, 0x02, 0x01, 0x01]);
        assert_eq!(record.status, Status::Superseded);
        assert_eq!(encode(&record).expect("encodes"), TODAY.as_bytes());
        // Without renews and DER (a first certificate's reservation): both keys absent.
        let bare = CertificateRecord {
            renews: None,
            der: Vec::new(),
            ..record
        };
        let text = String::from_utf8(encode(&bare).expect("encodes")).expect("utf-8");
        assert!(text.ends_with(r#""status":"superseded"}"#), "{text}");
        assert_eq!(decode(text.as_bytes()).expect("decodes"), bare);
    }

    #[test]
    fn a_record_whose_serial_is_not_one_is_refused() {
        let broken = TODAY.replace("4f1c2a9e0b7d3c5e6a8f0b1c2d3e4f50", "not-hex");
        assert!(decode(broken.as_bytes()).is_err());
    }
}
