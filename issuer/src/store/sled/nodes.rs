//! Attested nodes: which agents proved who they are, how, with what, and which node SVID
//! each holds now; and the bans that keep a node out across re-attestation.

use serde::{Deserialize, Serialize};

use super::journal::Journal;
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
    /// Evicted by an operator (or by the revocation of what it attested with): refused on
    /// the agent API until it attests again (if its method allows).
    pub evicted: bool,
    /// Whether its method lets it attest again (x509pop, tpm).
    pub can_reattest: bool,
    /// What it attested with last; absent on records from before nodes remembered it (the
    /// next attestation binds them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attested_with: Option<AttestedWith>,
    /// An operator evicted it, so another credential (a re-commissioned device's new
    /// certificate) may attest as this node. Cleared by the next attestation.
    #[serde(default)]
    pub released: bool,
    /// Banned by an operator: refused at attestation, by node id and by what it attested
    /// with, until unbanned.
    #[serde(default)]
    pub banned: bool,
}

/// What a node proved it holds, as a later attestation, a revocation or a ban recognises it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttestedWith {
    /// What stays the same across the node's re-attestations and its credential's
    /// renewals: `certificate:<serial of the lineage's first certificate>` (x509pop),
    /// `ek:<hex SHA-256 of the EK public key>` (tpm), `join_token:<id>`.
    pub lineage: String,
    /// x509pop: serial (hex) of the device certificate it attested with last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// x509pop: hex SHA-256 of that certificate's public key, so a banned device is known
    /// by its key even under a new certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
}

impl AttestedWith {
    /// The keys of the ban table that match this credential.
    fn ban_keys(&self) -> Vec<String> {
        let mut keys = vec![format!("lineage:{}", self.lineage)];
        if let Some(key) = &self.key_sha256 {
            keys.push(format!("key:{key}"));
        }
        keys
    }
}

impl NodeRecord {
    /// Whether a node proving `with` may attest as this node: the credential it is bound to
    /// (same lineage), or any once an operator released it by eviction, or any if the record
    /// predates bindings.
    pub fn admits(&self, with: &AttestedWith) -> bool {
        self.released
            || self
                .attested_with
                .as_ref()
                .is_none_or(|bound| bound.lineage == with.lineage)
    }
}

/// Why an attestation could not be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stored.
    Done,
    /// The node, or what it attested with, is banned (`spiffe_id` of the banned node).
    Banned(String),
    /// The node record changed since it was read (a concurrent attestation, ban or
    /// eviction): nothing stored.
    Changed,
}

/// The node table, keyed by SPIFFE ID, and the ban table keyed by credential
/// (`lineage:…`, `key:…`), each ban naming the banned node.
#[derive(Debug, Clone)]
pub struct Nodes {
    tree: sled::Tree,
    bans: sled::Tree,
    journal: Journal,
}

impl Nodes {
    pub(in crate::store) fn open(db: &sled::Db, journal: Journal) -> Result<Self, Error> {
        Ok(Self {
            tree: db.open_tree("nodes")?,
            bans: db.open_tree("node_bans")?,
            journal,
        })
    }
}

impl crate::store::NodeStore for Nodes {
    /// Records a node after an attestation: new, or replacing what was known of it (a
    /// re-attestation clears an eviction and names the new SVID).
    fn put(&self, record: &NodeRecord) -> Result<(), Error> {
        self.journal
            .begin()?
            .insert(&self.tree, record.spiffe_id.as_bytes(), encode(record)?)?;
        Ok(())
    }

    /// Records an attestation only if the node is as it was read (`expected`, `None`: still
    /// unknown) and neither it nor its credential is banned, in one write: a ban that
    /// lands while the node SVID is being signed is never overwritten.
    fn record_attestation(
        &self,
        expected: Option<&NodeRecord>,
        record: &NodeRecord,
    ) -> Result<Recorded, Error> {
        let value = encode(record)?;
        let ban_keys = record
            .attested_with
            .as_ref()
            .map(AttestedWith::ban_keys)
            .unwrap_or_default();
        let mut write = self.journal.begin()?;
        let current = self
            .tree
            .get(record.spiffe_id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()?;
        if current.as_ref().is_some_and(|c| c.banned) {
            return Ok(Recorded::Banned(record.spiffe_id.clone()));
        }
        for key in &ban_keys {
            if let Some(node) = self.bans.get(key.as_bytes())? {
                return Ok(Recorded::Banned(
                    String::from_utf8_lossy(&node).into_owned(),
                ));
            }
        }
        if current.as_ref() != expected {
            return Ok(Recorded::Changed);
        }
        write.insert(&self.tree, record.spiffe_id.as_bytes(), value)?;
        Ok(Recorded::Done)
    }

    /// The banned node whose credential matches `with`, if any.
    fn banned_credential(&self, with: &AttestedWith) -> Result<Option<String>, Error> {
        for key in with.ban_keys() {
            if let Some(node) = self.bans.get(key.as_bytes())? {
                return Ok(Some(String::from_utf8_lossy(&node).into_owned()));
            }
        }
        Ok(None)
    }

    /// Bans node `spiffe_id` (and evicts it), with what it attested with, in one
    /// write; returns the node as it was, or `None` if unknown.
    fn ban(&self, spiffe_id: &str, release: bool) -> Result<Option<NodeRecord>, Error> {
        let mut write = self.journal.begin()?;
        let Some(bytes) = self.tree.get(spiffe_id.as_bytes())? else {
            return Ok(None);
        };
        let before = decode(&bytes)?;
        let after = NodeRecord {
            banned: true,
            evicted: true,
            released: before.released || release,
            ..before.clone()
        };
        write.insert(&self.tree, spiffe_id.as_bytes(), encode(&after)?)?;
        for key in before
            .attested_with
            .as_ref()
            .map(AttestedWith::ban_keys)
            .unwrap_or_default()
        {
            write.insert(&self.bans, key.as_bytes(), spiffe_id.as_bytes())?;
        }
        Ok(Some(before))
    }

    /// Lifts the ban on node `spiffe_id`; it stays evicted until it attests again. Returns
    /// the node as it was, or `None` if unknown.
    fn unban(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, Error> {
        let mut write = self.journal.begin()?;
        let Some(bytes) = self.tree.get(spiffe_id.as_bytes())? else {
            return Ok(None);
        };
        let before = decode(&bytes)?;
        let after = NodeRecord {
            banned: false,
            ..before.clone()
        };
        write.insert(&self.tree, spiffe_id.as_bytes(), encode(&after)?)?;
        for key in before
            .attested_with
            .as_ref()
            .map(AttestedWith::ban_keys)
            .unwrap_or_default()
        {
            // Only this node's own ban: another banned node may share a key.
            if self.bans.get(key.as_bytes())?.as_deref() == Some(spiffe_id.as_bytes()) {
                write.remove(&self.bans, key.as_bytes())?;
            }
        }
        Ok(Some(before))
    }

    /// The node `spiffe_id`.
    fn get(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, Error> {
        self.tree
            .get(spiffe_id.as_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Every node, by SPIFFE ID.
    fn list(&self) -> Result<Vec<NodeRecord>, Error> {
        self.tree
            .iter()
            .map(|item| decode(&item?.1))
            .collect::<Result<_, _>>()
    }

    /// Applies `change` to node `spiffe_id` atomically (under the store's write lock); returns the node
    /// as it was before, or `None` if unknown.
    fn apply(
        &self,
        spiffe_id: &str,
        change: &dyn Fn(&mut NodeRecord),
    ) -> Result<Option<NodeRecord>, Error> {
        let mut write = self.journal.begin()?;
        let Some(current) = self.tree.get(spiffe_id.as_bytes())? else {
            return Ok(None);
        };
        let before = decode(&current)?;
        let mut after = before.clone();
        change(&mut after);
        write.insert(&self.tree, spiffe_id.as_bytes(), encode(&after)?)?;
        Ok(Some(before))
    }
}

fn encode(record: &NodeRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<NodeRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("node record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, lineage: &str) -> NodeRecord {
        NodeRecord {
            spiffe_id: id.into(),
            method: "x509pop".into(),
            attested_at: 1,
            svid_serial: "01".into(),
            svid_not_after: 100,
            evicted: false,
            can_reattest: true,
            attested_with: Some(AttestedWith {
                lineage: lineage.into(),
                certificate_serial: Some("0a".into()),
                key_sha256: Some(format!("key-of-{lineage}")),
            }),
            released: false,
            banned: false,
        }
    }

    #[test]
    fn a_node_admits_its_own_lineage_or_any_once_released() {
        let mut record = node("spiffe://plant.test/agent/x509pop/gw-1", "certificate:01");
        let same = record.attested_with.clone().expect("with");
        let other = AttestedWith {
            lineage: "certificate:02".into(),
            certificate_serial: None,
            key_sha256: None,
        };
        assert!(record.admits(&same));
        assert!(!record.admits(&other));
        record.released = true;
        assert!(record.admits(&other));
        record.released = false;
        record.attested_with = None;
        assert!(
            record.admits(&other),
            "a record from before bindings binds anew"
        );
    }
}
