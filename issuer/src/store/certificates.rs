//! Every certificate the issuer has signed, keyed by serial, with an index keyed by
//! `not_after || serial` so "what expires in the next 30 days" is a range scan.
//!
//! The index entry's value is the certificate's stored status (one byte), so questions that
//! filter only on time and status (the metrics gauges every few seconds, the CLI's
//! `--status`) are answered from the index alone. Reading every record instead pulled the
//! whole inventory through sled's page cache on each refresh: the issuer's memory grew with
//! every certificate it had ever issued.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::serial::Serial;
use crate::Error;

/// A certificate's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Issued and usable.
    Valid,
    /// Past its notAfter (computed when read).
    Expired,
    /// Revoked by an operator.
    Revoked,
    /// Renewed by a re-enrollment; still valid until notAfter.
    Superseded,
}

impl Status {
    /// This stored status as of `now` for a certificate expiring at `not_after`.
    fn at(self, not_after: i64, now: i64) -> Status {
        if self == Status::Valid && not_after <= now {
            Status::Expired
        } else {
            self
        }
    }

    /// The byte the expiry index holds for this status.
    fn index_byte(self) -> u8 {
        match self {
            Status::Valid => 0,
            Status::Expired => 1,
            Status::Revoked => 2,
            Status::Superseded => 3,
        }
    }

    /// The status an expiry index value holds; None for an entry written before the index
    /// carried it (or anything unexpected): the record then decides.
    fn from_index(value: &[u8]) -> Option<Status> {
        match value {
            [0] => Some(Status::Valid),
            [1] => Some(Status::Expired),
            [2] => Some(Status::Revoked),
            [3] => Some(Status::Superseded),
            _ => None,
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "valid" => Ok(Self::Valid),
            "expired" => Ok(Self::Expired),
            "revoked" => Ok(Self::Revoked),
            "superseded" => Ok(Self::Superseded),
            _ => Err(format!(
                "unknown status {s:?}; use valid, expired, revoked or superseded"
            )),
        }
    }
}

/// One certificate as the inventory knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Serial, hex.
    pub serial: String,
    /// Subject commonName.
    pub subject: String,
    /// subjectAltNames as `dns:…` / `ip:…`.
    pub sans: Vec<String>,
    /// The label (profile) it was issued under.
    pub label: String,
    /// Who asked: `token:<id>`, `renewal:<serial>`, …
    pub owner: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Lifecycle state.
    pub status: Status,
    /// The serial this certificate renewed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renews: Option<String>,
    /// The certificate, base64 DER (absent on pending reservations).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub der: String,
}

impl CertificateRecord {
    /// Status as of `now`: a valid certificate past notAfter reads as expired.
    pub fn status_at(&self, now: i64) -> Status {
        self.status.at(self.not_after, now)
    }

    /// The certificate DER.
    pub fn der_bytes(&self) -> Result<Vec<u8>, Error> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.der)
            .map_err(|e| Error::Store(format!("certificate {}: {e}", self.serial)))
    }
}

/// An inventory question.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InventoryQuery {
    /// Only certificates whose notAfter is within this long from now (and not yet past).
    #[serde(default)]
    pub expiring_within_secs: Option<u64>,
    /// Only this label.
    #[serde(default)]
    pub label: Option<String>,
    /// Only this status.
    #[serde(default)]
    pub status: Option<Status>,
    /// Only this owner (`token:…`, `issuer:…`; later nodes, entries, gateways).
    #[serde(default)]
    pub owner: Option<String>,
    /// Only subjects containing this text (case-insensitive).
    #[serde(default)]
    pub subject: Option<String>,
    /// Only certificates with a URI SAN starting with this SPIFFE ID prefix.
    #[serde(default)]
    pub spiffe_prefix: Option<String>,
    /// Continue after this cursor (from the previous page's `next`).
    #[serde(default)]
    pub after: Option<String>,
    /// Page size (default 100, at most 10,000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Don't count all matching rows: stop scanning once the page is full and it is known
    /// whether more follow. A dashboard's first page needs this; `total` is then `None`.
    #[serde(default)]
    pub skip_total: bool,
}

/// One page of answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryPage {
    /// Rows ordered by notAfter, then serial; `der` omitted, `status` as of the query.
    pub certificates: Vec<CertificateRecord>,
    /// Cursor for the next page, if there are more rows.
    pub next: Option<String>,
    /// How many rows match in all (`None` when the query asked to skip counting).
    pub total: Option<usize>,
}

/// A revocation as the CRL needs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    /// Serial, hex.
    pub serial: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// RFC 5280 CRLReason code.
    pub reason_code: u8,
    /// The certificate's notAfter (expired entries may leave the CRL).
    pub not_after: i64,
}

/// The certificate table, its expiry index, and the revocation list.
#[derive(Debug, Clone)]
pub struct CertificateStore {
    by_serial: sled::Tree,
    by_expiry: sled::Tree,
    revocations: sled::Tree,
    meta: sled::Tree,
}

pub(super) fn expiry_key(not_after: i64, serial: &Serial) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&(not_after.max(0) as u64).to_be_bytes());
    key[8..].copy_from_slice(&serial.0);
    key
}

impl CertificateStore {
    pub(super) fn open(db: &sled::Db) -> Result<Self, Error> {
        let store = Self {
            by_serial: db.open_tree("certificates")?,
            by_expiry: db.open_tree("certificates_by_expiry")?,
            revocations: db.open_tree("revocations")?,
            meta: db.open_tree("meta")?,
        };
        store.put_status_in_index()?;
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
            if Status::from_index(&value).is_some() {
                continue;
            }
            let Some(serial) = key.get(8..) else {
                continue;
            };
            // A record that does not decode keeps its empty value: queries that reach it
            // report it as they always did, and the issuer still starts.
            if let Some(Ok(record)) = self.by_serial.get(serial)?.map(|b| decode(&b)) {
                self.by_expiry
                    .insert(key, &[record.status.index_byte()][..])?;
                filled += 1;
            }
        }
        self.meta.insert(DONE, &[1u8][..])?;
        if filled > 0 {
            tracing::info!(filled, "expiry index now carries each certificate's status");
        }
        Ok(())
    }

    /// Marks a certificate revoked and adds it to the revocation list, in one transaction.
    /// Returns the record as it was, or None if no such certificate.
    pub fn revoke(
        &self,
        serial: &Serial,
        revoked_at: i64,
        reason_code: u8,
    ) -> Result<Option<CertificateRecord>, Error> {
        let outcome = (&self.by_serial, &self.by_expiry, &self.revocations).transaction(
            |(by_serial, by_expiry, revocations)| {
                let Some(bytes) = by_serial.get(serial.0)? else {
                    return Ok(None);
                };
                let mut record: CertificateRecord = serde_json::from_slice(&bytes)
                    .map_err(|_| ConflictableTransactionError::Abort(()))?;
                let before = record.clone();
                record.status = Status::Revoked;
                let entry = Revocation {
                    serial: record.serial.clone(),
                    revoked_at,
                    reason_code,
                    not_after: record.not_after,
                };
                let record_bytes = serde_json::to_vec(&record)
                    .map_err(|_| ConflictableTransactionError::Abort(()))?;
                let entry_bytes = serde_json::to_vec(&entry)
                    .map_err(|_| ConflictableTransactionError::Abort(()))?;
                by_serial.insert(&serial.0, record_bytes)?;
                by_expiry.insert(
                    &expiry_key(record.not_after, serial),
                    &[Status::Revoked.index_byte()][..],
                )?;
                revocations.insert(&serial.0, entry_bytes)?;
                Ok(Some(before))
            },
        );
        match outcome {
            Ok(found) => Ok(found),
            Err(TransactionError::Abort(())) => Err(Error::Store(format!(
                "certificate record {serial} does not parse"
            ))),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Every revocation of a certificate not yet expired at `now`.
    pub fn revocations(&self, now: i64) -> Result<Vec<Revocation>, Error> {
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
    pub fn next_crl_number(&self) -> Result<u64, Error> {
        let updated = self.meta.update_and_fetch("crl_number", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(updated
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map_or(1, u64::from_be_bytes))
    }

    /// Records a newly issued certificate and its index entry in one transaction, only if
    /// `serial` was never used; returns false (writing nothing) if it was.
    pub fn record_new(&self, serial: &Serial, record: &CertificateRecord) -> Result<bool, Error> {
        let value = encode(record)?;
        let key = expiry_key(record.not_after, serial);
        let outcome = (&self.by_serial, &self.by_expiry).transaction(|(by_serial, by_expiry)| {
            if by_serial.get(serial.0)?.is_some() {
                return sled::transaction::abort(());
            }
            by_serial.insert(&serial.0, value.as_slice())?;
            by_expiry.insert(&key, &[record.status.index_byte()][..])?;
            Ok(())
        });
        match outcome {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// The record for `serial`.
    pub fn get(&self, serial: &Serial) -> Result<Option<CertificateRecord>, Error> {
        self.by_serial
            .get(serial.0)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    /// Changes a certificate's status (revocation, renewal).
    pub fn set_status(&self, serial: &Serial, status: Status) -> Result<bool, Error> {
        let outcome = (&self.by_serial, &self.by_expiry).transaction(|(by_serial, by_expiry)| {
            let Some(current) = by_serial.get(serial.0)? else {
                return Ok(false);
            };
            let mut record = decode(&current).map_err(ConflictableTransactionError::Abort)?;
            record.status = status;
            let bytes = encode(&record).map_err(ConflictableTransactionError::Abort)?;
            by_serial.insert(&serial.0, bytes)?;
            by_expiry.insert(
                &expiry_key(record.not_after, serial),
                &[status.index_byte()][..],
            )?;
            Ok(true)
        });
        match outcome {
            Ok(changed) => Ok(changed),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Answers an inventory query as of `now` (unix seconds).
    pub fn query(&self, query: &InventoryQuery, now: i64) -> Result<InventoryPage, Error> {
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
            let indexed = Status::from_index(&value).map(|s| s.at(not_after, now));
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
                let mut record = decode(&bytes)?;
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
                if let (true, Some(mut record)) = (wanted_row, record) {
                    record.der.clear();
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

    /// Whether every expiry index entry carries its status (tests of the migration).
    #[cfg(test)]
    pub(super) fn index_has_status(&self) -> bool {
        self.by_expiry
            .iter()
            .all(|entry| entry.is_ok_and(|(_, value)| Status::from_index(&value).is_some()))
    }

    /// Number of certificate records.
    pub fn len(&self) -> usize {
        self.by_serial.len()
    }

    /// Whether nothing was ever issued.
    pub fn is_empty(&self) -> bool {
        self.by_serial.is_empty()
    }
}

fn encode(record: &CertificateRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<CertificateRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("certificate record: {e}")))
}
