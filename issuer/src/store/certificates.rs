//! The certificate aggregate as the rest of the issuer sees it: the domain types, and the
//! [`CertificateStore`] every backend implements. How a backend lays them out is its own
//! business (sled: `sled/certificates.rs`); what operators see is `operator_api`'s.

use serde::{Deserialize, Serialize};

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
    pub(crate) fn at(self, not_after: i64, now: i64) -> Status {
        if self == Status::Valid && not_after <= now {
            Status::Expired
        } else {
            self
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

/// One certificate as the inventory knows it: the domain type. The sled table stores it as
/// [`Stored`], operators see it as `operator_api::CertificateRow`.
/// One certificate as the inventory knows it: the domain type. The sled backend stores it
/// in its own format, operators see it as `operator_api::CertificateRow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Serial.
    pub serial: Serial,
    /// Subject commonName.
    pub subject: String,
    /// subjectAltNames as `dns:…` / `ip:…` / `uri:…`.
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
    pub renews: Option<Serial>,
    /// The certificate DER; empty in inventory pages and on pending reservations.
    pub der: Vec<u8>,
}

impl CertificateRecord {
    /// Status as of `now`: a valid certificate past notAfter reads as expired.
    pub fn status_at(&self, now: i64) -> Status {
        self.status.at(self.not_after, now)
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
#[derive(Debug, Clone)]
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

/// Why a lineage renews no more: the first revocation of one of its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageEnd {
    /// The revoked certificate's serial, hex.
    pub revoked: String,
    /// Unix seconds.
    pub at: i64,
}

/// Where a certificate stands in its lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    /// The serial of the lineage's first certificate.
    pub root: Serial,
    /// The certificate that renewed this one, if any.
    pub successor: Option<Serial>,
    /// Set once any member was revoked.
    pub ended: Option<LineageEnd>,
}

/// What recording a renewal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Recorded; the predecessor is superseded by it.
    Recorded,
    /// The new serial was taken already; nothing written.
    SerialTaken,
    /// The predecessor is no longer the current, unrevoked certificate of a live lineage
    /// (revoked, renewed by a concurrent request, or its lineage ended meanwhile); nothing
    /// written. Carries the predecessor's stored status and the lineage's end, if any.
    PredecessorNotCurrent {
        /// The predecessor's stored status (`None`: no such record).
        status: Option<Status>,
        /// The lineage's end, if it ended.
        ended: Option<LineageEnd>,
    },
}

/// What recording a new certificate did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewRecord {
    /// Recorded; it holds its subject now.
    Recorded,
    /// The serial was taken already; nothing written.
    SerialTaken,
    /// Another valid certificate (this serial, hex) holds the subject under the label;
    /// nothing written.
    SubjectHeld(String),
}

/// Issued certificates: the inventory, renewal lineages, subject holders and revocations.
pub trait CertificateStore: std::fmt::Debug + Send + Sync {
    /// Marks a certificate revoked, adds it to the revocation list and ends its lineage, in
    /// one write. Returns the record as it was, or None if no such certificate.
    fn revoke(
        &self,
        serial: &Serial,
        revoked_at: i64,
        reason_code: u8,
    ) -> Result<Option<CertificateRecord>, Error>;
    /// Every revocation of a certificate not yet expired at `now`.
    fn revocations(&self, now: i64) -> Result<Vec<Revocation>, Error>;
    /// The next CRL number (RFC 5280 §5.2.3: monotonically increasing), persisted.
    fn next_crl_number(&self) -> Result<u64, Error>;
    /// The valid certificate (at `now`) that holds `subject` under `label`, if any.
    fn subject_holder(
        &self,
        label: &str,
        subject: &str,
        now: i64,
    ) -> Result<Option<CertificateRecord>, Error>;
    /// Records a new certificate only if `serial` was never used; false (nothing written)
    /// if it was.
    fn record_new(&self, serial: &Serial, record: &CertificateRecord) -> Result<bool, Error>;
    /// [`record_new`](Self::record_new), and the certificate becomes its subject's holder;
    /// with `unique_subject`, only while no other valid certificate of the label holds it.
    fn record_new_holding(
        &self,
        serial: &Serial,
        record: &CertificateRecord,
        unique_subject: bool,
    ) -> Result<NewRecord, Error>;
    /// Records `record` as the renewal of `predecessor` and supersedes the predecessor, in
    /// one write, only if the serial is unused, the predecessor still valid and unrenewed,
    /// and its lineage not ended.
    fn record_renewal(
        &self,
        serial: &Serial,
        record: &CertificateRecord,
        predecessor: &Serial,
    ) -> Result<Renewal, Error>;
    /// Where `serial` stands in its lineage.
    fn lineage(&self, serial: &Serial) -> Result<Lineage, Error>;
    /// The record for `serial`.
    fn get(&self, serial: &Serial) -> Result<Option<CertificateRecord>, Error>;
    /// Changes a certificate's stored status; false if unknown.
    fn set_status(&self, serial: &Serial, status: Status) -> Result<bool, Error>;
    /// Answers an inventory query as of `now` (unix seconds): rows ordered by notAfter,
    /// then serial, `der` omitted, `status` as of `now`.
    fn query(&self, query: &InventoryQuery, now: i64) -> Result<InventoryPage, Error>;
    /// Number of certificate records.
    fn len(&self) -> usize;
    /// Whether nothing was ever issued.
    fn is_empty(&self) -> bool;
}
