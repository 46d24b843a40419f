//! The audit aggregate as the rest of the issuer sees it: events, chained records, the
//! chain's hash (every backend computes the same one, so a log moved between backends
//! still verifies), and the [`AuditLog`] every backend implements (sled's: `sled/audit.rs`).

use std::fmt::Debug;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// What happened, before it is numbered and chained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// e.g. `certificate.issued`, `token.created`.
    pub kind: String,
    /// Event fields (never secrets).
    pub detail: serde_json::Value,
}

/// A numbered, chained audit record. Its JSON (the event's `kind` and `detail` beside the
/// chain fields) is the log's export format: `audit tail --format json`, the operators' API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// 1, 2, 3, … with no gaps.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous record's hash, hex (zeros for the first).
    pub prev: String,
    /// SHA-256 over `prev` and this record's content, hex.
    pub hash: String,
}

/// What `audit verify` found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verification {
    /// Records read.
    pub records: u64,
    /// The first break in the chain, if any, in words an auditor can act on.
    pub problem: Option<String>,
}

/// The hash that chains a record to its predecessor.
pub fn chain_hash(
    prev: &[u8; 32],
    seq: u64,
    at_ms: i64,
    event: &AuditEvent,
) -> Result<[u8; 32], Error> {
    let content = serde_json::to_vec(&(seq, at_ms, &event.kind, &event.detail))
        .map_err(|e| Error::Store(e.to_string()))?;
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(&content);
    Ok(hasher.finalize().into())
}

/// The hash-chained audit log.
pub trait AuditLog: Debug + Send + Sync {
    /// Appends an event; returns its sequence number.
    fn append(&self, event: AuditEvent, at_ms: i64) -> Result<u64, Error>;
    /// The newest `count` records, oldest first.
    fn tail(&self, count: usize) -> Result<Vec<AuditRecord>, Error>;
    /// The newest `count` records numbered below `before`, oldest first.
    fn page(&self, before: Option<u64>, count: usize) -> Result<Vec<AuditRecord>, Error>;
    /// Walks the whole chain and names its first break, if any.
    fn verify(&self) -> Result<Verification, Error>;
}
