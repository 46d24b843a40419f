//! Attested nodes: which agents proved who they are, how, and which node SVID each holds now.

use serde::{Deserialize, Serialize};

use crate::Error;

/// One attested node as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// `spiffe://<td>/agent/<method>/<id>`.
    pub spiffe_id: String,
    /// join_token, x509pop, tpm.
    pub method: String,
    /// Unix seconds of the latest attestation.
    pub attested_at: i64,
    /// Serial (hex) of the node SVID it holds now; older ones no longer authenticate it.
    pub svid_serial: String,
    /// notAfter of that SVID, unix seconds.
    pub svid_not_after: i64,
    /// Evicted by an operator: refused on the agent API until it attests again (if its
    /// method allows).
    pub evicted: bool,
    /// Whether its method lets it attest again (x509pop, tpm).
    pub can_reattest: bool,
}

/// The node table, keyed by SPIFFE ID.
#[derive(Debug, Clone)]
pub struct NodeStore {
    tree: sled::Tree,
}

impl NodeStore {
    pub(super) fn open(db: &sled::Db) -> Result<Self, Error> {
        Ok(Self {
            tree: db.open_tree("nodes")?,
        })
    }

    /// Records a node after an attestation: new, or replacing what was known of it (a
    /// re-attestation clears an eviction and names the new SVID).
    pub fn put(&self, record: &NodeRecord) -> Result<(), Error> {
        self.tree
            .insert(record.spiffe_id.as_bytes(), encode(record)?)?;
        Ok(())
    }

    /// The node `spiffe_id`.
    pub fn get(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, Error> {
        self.tree
            .get(spiffe_id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Every node, by SPIFFE ID.
    pub fn list(&self) -> Result<Vec<NodeRecord>, Error> {
        self.tree
            .iter()
            .map(|item| decode(&item?.1))
            .collect::<Result<_, _>>()
    }

    /// Applies `change` to node `spiffe_id` atomically (compare-and-swap); returns the node
    /// as it was before, or `None` if unknown.
    pub fn update(
        &self,
        spiffe_id: &str,
        change: impl Fn(&mut NodeRecord),
    ) -> Result<Option<NodeRecord>, Error> {
        loop {
            let Some(current) = self.tree.get(spiffe_id.as_bytes())? else {
                return Ok(None);
            };
            let before = decode(&current)?;
            let mut after = before.clone();
            change(&mut after);
            if self
                .tree
                .compare_and_swap(spiffe_id.as_bytes(), Some(current), Some(encode(&after)?))?
                .is_ok()
            {
                return Ok(Some(before));
            }
        }
    }
}

fn encode(record: &NodeRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<NodeRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("node record: {e}")))
}
