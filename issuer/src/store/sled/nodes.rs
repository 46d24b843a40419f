//! Attested nodes: which agents proved who they are, how, with what, and which node SVID
//! each holds now; and the bans that keep a node out across re-attestation.

use serde::{Deserialize, Serialize};

use super::journal::Journal;
use crate::store::{AttestedWith, NodeRecord, Recorded};
use crate::Error;

/// The keys of the ban table that match a credential.
fn ban_keys(with: &AttestedWith) -> Vec<String> {
    let mut keys = vec![format!("lineage:{}", with.lineage)];
    if let Some(key) = &with.key_sha256 {
        keys.push(format!("key:{key}"));
    }
    keys
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
            .map(ban_keys)
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
        for key in ban_keys(with) {
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
            .map(ban_keys)
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
            .map(ban_keys)
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

/// A node as stored: JSON, the layout every release has written (fields added later
/// default when absent).
#[derive(Serialize, Deserialize)]
struct Stored {
    spiffe_id: String,
    method: String,
    attested_at: i64,
    svid_serial: String,
    svid_not_after: i64,
    evicted: bool,
    can_reattest: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attested_with: Option<StoredWith>,
    #[serde(default)]
    released: bool,
    #[serde(default)]
    banned: bool,
}

#[derive(Serialize, Deserialize)]
struct StoredWith {
    lineage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_sha256: Option<String>,
}

fn encode(record: &NodeRecord) -> Result<Vec<u8>, Error> {
    let stored = Stored {
        spiffe_id: record.spiffe_id.clone(),
        method: record.method.clone(),
        attested_at: record.attested_at,
        svid_serial: record.svid_serial.clone(),
        svid_not_after: record.svid_not_after,
        evicted: record.evicted,
        can_reattest: record.can_reattest,
        attested_with: record.attested_with.as_ref().map(|with| StoredWith {
            lineage: with.lineage.clone(),
            certificate_serial: with.certificate_serial.clone(),
            key_sha256: with.key_sha256.clone(),
        }),
        released: record.released,
        banned: record.banned,
    };
    serde_json::to_vec(&stored).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<NodeRecord, Error> {
    let stored: Stored =
        serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("node record: {e}")))?;
    Ok(NodeRecord {
        spiffe_id: stored.spiffe_id,
        method: stored.method,
        attested_at: stored.attested_at,
        svid_serial: stored.svid_serial,
        svid_not_after: stored.svid_not_after,
        evicted: stored.evicted,
        can_reattest: stored.can_reattest,
        attested_with: stored.attested_with.map(|with| AttestedWith {
            lineage: with.lineage,
            certificate_serial: with.certificate_serial,
            key_sha256: with.key_sha256,
        }),
        released: stored.released,
        banned: stored.banned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_json_layout_existing_stores_hold() {
        // As an issuer from before nodes remembered their credential and bans wrote it.
        let old = br#"{"spiffe_id":"spiffe://plant.test/agent/join_token/ab","method":"join_token","attested_at":1,"svid_serial":"01","svid_not_after":2,"evicted":false,"can_reattest":false}"#;
        let record = decode(old).expect("an old record reads");
        assert_eq!(record.attested_with, None);
        assert!(!record.released && !record.banned);
        let bound = NodeRecord {
            attested_with: Some(AttestedWith {
                lineage: "join_token:ab".into(),
                certificate_serial: None,
                key_sha256: Some("cd".into()),
            }),
            banned: true,
            ..record
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(&bound).expect("encode")).expect("json");
        assert_eq!(json["attested_with"]["lineage"], "join_token:ab");
        assert!(json["attested_with"].get("certificate_serial").is_none());
        assert_eq!(json["banned"], true);
        assert_eq!(
            decode(&encode(&bound).expect("encode")).expect("decode"),
            bound
        );
    }
}
