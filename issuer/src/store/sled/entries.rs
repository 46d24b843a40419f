//! Registration entries: which SPIFFE ID a workload with which selectors may hold, under
//! which node (its parent). Indexed by parent, because an agent syncs exactly its own.

use serde::{Deserialize, Serialize};

use super::journal::Journal;
use crate::store::EntryRecord;
use crate::Error;

/// The entry table with its parent and identity indexes.
#[derive(Debug, Clone)]
pub struct Entries {
    by_id: sled::Tree,
    /// `parent_id || 0x00 || id` → empty.
    by_parent: sled::Tree,
    /// SHA-256 of (spiffe_id, parent_id, selectors) → id: refuses duplicates atomically.
    by_identity: sled::Tree,
    journal: Journal,
}

impl crate::store::EntryStore for Entries {
    /// Stores a new entry. `Ok(Some(existing_id))` and nothing written when an entry with the
    /// same SPIFFE ID, parent and selectors exists.
    fn insert(&self, record: &EntryRecord) -> Result<Option<String>, Error> {
        let value = encode(record)?;
        let identity = record.identity_key();
        let parent = parent_key(&record.parent_id, &record.id);
        let mut write = self.journal.begin()?;
        if let Some(existing) = self.by_identity.get(identity)? {
            return Ok(Some(String::from_utf8_lossy(&existing).into_owned()));
        }
        write.insert(&self.by_id, record.id.as_bytes(), value)?;
        write.insert(&self.by_parent, parent, [])?;
        write.insert(&self.by_identity, identity, record.id.as_bytes())?;
        Ok(None)
    }

    /// The entry `id`.
    fn get(&self, id: &str) -> Result<Option<EntryRecord>, Error> {
        self.by_id
            .get(id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Every entry, or those of one parent; ordered by id (by parent, then id).
    fn list(&self, parent_id: Option<&str>) -> Result<Vec<EntryRecord>, Error> {
        let mut out = Vec::new();
        match parent_id {
            None => {
                for item in self.by_id.iter() {
                    let (_, bytes) = item?;
                    out.push(decode(&bytes)?);
                }
            }
            Some(parent) => {
                let mut prefix = parent.as_bytes().to_vec();
                prefix.push(0);
                for item in self.by_parent.scan_prefix(&prefix) {
                    let (key, _) = item?;
                    let id = &key[prefix.len()..];
                    // The index is written with the record in one transaction; a missing
                    // record would be a concurrent delete between the two reads.
                    if let Some(bytes) = self.by_id.get(id)? {
                        out.push(decode(&bytes)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes entry `id` with its index rows; returns it, or `None` if there was none.
    fn delete(&self, id: &str) -> Result<Option<EntryRecord>, Error> {
        let mut write = self.journal.begin()?;
        let Some(bytes) = self.by_id.get(id.as_bytes())? else {
            return Ok(None);
        };
        let record = decode(&bytes).map_err(|e| Error::Store(format!("entry {id}: {e}")))?;
        write.remove(&self.by_id, id.as_bytes())?;
        write.remove(&self.by_parent, parent_key(&record.parent_id, &record.id))?;
        write.remove(&self.by_identity, record.identity_key())?;
        Ok(Some(record))
    }
}

fn parent_key(parent_id: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(parent_id.len() + 1 + id.len());
    key.extend_from_slice(parent_id.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

impl Entries {
    pub(in crate::store) fn open(db: &sled::Db, journal: Journal) -> Result<Self, Error> {
        Ok(Self {
            by_id: db.open_tree("entries")?,
            by_parent: db.open_tree("entries_by_parent")?,
            by_identity: db.open_tree("entries_by_identity")?,
            journal,
        })
    }
}

/// An entry as stored: JSON, the layout every release has written.
#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<String>,
    x509_svid_ttl_secs: u32,
    jwt_svid_ttl_secs: u32,
    dns_names: Vec<String>,
    hint: String,
    revision: u64,
    created_at: i64,
}

fn encode(record: &EntryRecord) -> Result<Vec<u8>, Error> {
    let stored = Stored {
        id: record.id.clone(),
        spiffe_id: record.spiffe_id.clone(),
        parent_id: record.parent_id.clone(),
        selectors: record.selectors.clone(),
        x509_svid_ttl_secs: record.x509_svid_ttl_secs,
        jwt_svid_ttl_secs: record.jwt_svid_ttl_secs,
        dns_names: record.dns_names.clone(),
        hint: record.hint.clone(),
        revision: record.revision,
        created_at: record.created_at,
    };
    serde_json::to_vec(&stored).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<EntryRecord, Error> {
    let stored: Stored =
        serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("entry record: {e}")))?;
    Ok(EntryRecord {
        id: stored.id,
        spiffe_id: stored.spiffe_id,
        parent_id: stored.parent_id,
        selectors: stored.selectors,
        x509_svid_ttl_secs: stored.x509_svid_ttl_secs,
        jwt_svid_ttl_secs: stored.jwt_svid_ttl_secs,
        dns_names: stored.dns_names,
        hint: stored.hint,
        revision: stored.revision,
        created_at: stored.created_at,
    })
}
