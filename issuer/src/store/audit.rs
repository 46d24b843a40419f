//! The audit log: append-only, each record numbered and chained to the previous one by
//! SHA-256, so an edited, removed or reordered record breaks the chain (DESIGN §6).

use std::sync::{Arc, Mutex};

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

/// A stored audit record.
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

/// The audit table.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tree: sled::Tree,
    /// (last seq, last hash); appends serialise here so seq order is chain order.
    tail: Arc<Mutex<(u64, [u8; 32])>>,
}

impl AuditLog {
    pub(super) fn open(db: &sled::Db) -> Result<Self, Error> {
        let tree = db.open_tree("audit")?;
        let tail = match tree.last()? {
            Some((_, bytes)) => {
                let record: AuditRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Store(format!("last audit record: {e}")))?;
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&record.hash, &mut hash)
                    .map_err(|e| Error::Store(format!("last audit record hash: {e}")))?;
                (record.seq, hash)
            }
            None => (0, [0u8; 32]),
        };
        Ok(Self {
            tree,
            tail: Arc::new(Mutex::new(tail)),
        })
    }

    /// Appends an event; the caller commits the store before acting on it.
    pub fn append(&self, event: AuditEvent, at_ms: i64) -> Result<u64, Error> {
        let mut tail = self
            .tail
            .lock()
            .map_err(|_| Error::Store("audit log lock poisoned".into()))?;
        let seq = tail.0 + 1;
        let prev = tail.1;
        let hash = chain_hash(&prev, seq, at_ms, &event)?;
        let record = AuditRecord {
            seq,
            at_ms,
            event,
            prev: hex::encode(prev),
            hash: hex::encode(hash),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::Store(e.to_string()))?;
        self.tree.insert(seq.to_be_bytes(), bytes)?;
        *tail = (seq, hash);
        Ok(seq)
    }

    /// The newest `count` records, oldest first.
    pub fn tail(&self, count: usize) -> Result<Vec<AuditRecord>, Error> {
        let mut records = self
            .tree
            .iter()
            .rev()
            .take(count)
            .map(|entry| {
                let (_, bytes) = entry?;
                serde_json::from_slice(&bytes).map_err(|e| Error::Store(e.to_string()))
            })
            .collect::<Result<Vec<AuditRecord>, Error>>()?;
        records.reverse();
        Ok(records)
    }
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
