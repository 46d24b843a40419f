//! The registration-entry aggregate as the rest of the issuer sees it: the domain type and
//! the [`EntryStore`] every backend implements (sled's encoding: `sled/entries.rs`).

use std::fmt::Debug;

use crate::Error;

/// One registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    /// Random id (32 hex digits), what operators delete by.
    pub id: String,
    /// The SPIFFE ID a matching workload gets.
    pub spiffe_id: String,
    /// The node SPIFFE ID (`spiffe://<td>/agent/…`) whose agent serves it.
    pub parent_id: String,
    /// `type:value` selectors, sorted; all must match a workload.
    pub selectors: Vec<String>,
    /// X509-SVID lifetime in seconds; 0: the issuer's default.
    pub x509_svid_ttl_secs: u32,
    /// JWT-SVID lifetime in seconds; 0: the issuer's default.
    pub jwt_svid_ttl_secs: u32,
    /// dNSName SANs the X509-SVID carries besides its SPIFFE ID.
    pub dns_names: Vec<String>,
    /// Workload API hint.
    pub hint: String,
    /// Bumped on every change.
    pub revision: u64,
    /// Unix seconds.
    pub created_at: i64,
}

impl EntryRecord {
    /// What makes two entries the same: SPIFFE ID, parent and selector set.
    pub(crate) fn identity_key(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut selectors = self.selectors.clone();
        selectors.sort();
        let mut digest = sha2::Sha256::new();
        for part in [&self.spiffe_id, &self.parent_id]
            .into_iter()
            .chain(selectors.iter())
        {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part.as_bytes());
        }
        digest.finalize().into()
    }
}

/// Registration entries, indexed by parent node.
pub trait EntryStore: Debug + Send + Sync {
    /// Stores an entry unless an identical one (SPIFFE ID, parent, selectors) exists: then
    /// nothing is written and that entry's id returned.
    fn insert(&self, record: &EntryRecord) -> Result<Option<String>, Error>;
    /// The entry `id`.
    fn get(&self, id: &str) -> Result<Option<EntryRecord>, Error>;
    /// The entries under `parent_id` (all of them when `None`), by id.
    fn list(&self, parent_id: Option<&str>) -> Result<Vec<EntryRecord>, Error>;
    /// Deletes an entry with its indexes; the entry as it was.
    fn delete(&self, id: &str) -> Result<Option<EntryRecord>, Error>;
}
