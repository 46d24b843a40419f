//! The node aggregate as the rest of the issuer sees it: attested nodes, what they attested
//! with, and the [`NodeStore`] every backend implements (sled's encoding and ban table:
//! `sled/nodes.rs`).

use std::fmt::Debug;

use serde::Serialize;

use crate::Error;

/// One attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub attested_with: Option<AttestedWith>,
    /// An operator evicted it, so another credential (a re-commissioned device's new
    /// certificate) may attest as this node. Cleared by the next attestation.
    pub released: bool,
    /// Banned by an operator: refused at attestation, by node id and by what it attested
    /// with, until unbanned.
    pub banned: bool,
}

/// What a node proved it holds, as a later attestation, a revocation or a ban recognises it.
/// Audit records carry it as JSON (`agent.banned`, `agent.unbanned`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestedWith {
    /// What stays the same across the node's re-attestations and its credential's
    /// renewals: `certificate:<serial of the lineage's first certificate>` (x509pop),
    /// `ek:<hex SHA-256 of the EK public key>` (tpm), `join_token:<id>`.
    pub lineage: String,
    /// x509pop: serial (hex) of the device certificate it attested with last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// x509pop: hex SHA-256 of that certificate's public key, so a banned device is known
    /// by its key even under a new certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
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

/// Attested nodes and the bans on their credentials.
pub trait NodeStore: Debug + Send + Sync {
    /// Records a node, new or replacing what was known of it.
    fn put(&self, record: &NodeRecord) -> Result<(), Error>;
    /// Records an attestation only if the node is as it was read (`expected`) and neither
    /// it nor its credential is banned, in one write.
    fn record_attestation(
        &self,
        expected: Option<&NodeRecord>,
        record: &NodeRecord,
    ) -> Result<Recorded, Error>;
    /// The banned node whose credential matches `with`, if any.
    fn banned_credential(&self, with: &AttestedWith) -> Result<Option<String>, Error>;
    /// Bans (and evicts) a node and its credentials in one write; the node as it was.
    fn ban(&self, spiffe_id: &str, release: bool) -> Result<Option<NodeRecord>, Error>;
    /// Lifts a node's ban; the node as it was.
    fn unban(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, Error>;
    /// The node `spiffe_id`.
    fn get(&self, spiffe_id: &str) -> Result<Option<NodeRecord>, Error>;
    /// Every node, by SPIFFE ID.
    fn list(&self) -> Result<Vec<NodeRecord>, Error>;
    /// Applies `change` to a node atomically; the node as it was, or None if unknown.
    /// Callers use [`update`](dyn NodeStore::update).
    fn apply(
        &self,
        spiffe_id: &str,
        change: &dyn Fn(&mut NodeRecord),
    ) -> Result<Option<NodeRecord>, Error>;
}

impl dyn NodeStore {
    /// Applies `change` to node `spiffe_id` atomically; returns the node as it was before,
    /// or `None` if unknown.
    pub fn update(
        &self,
        spiffe_id: &str,
        change: impl Fn(&mut NodeRecord),
    ) -> Result<Option<NodeRecord>, Error> {
        self.apply(spiffe_id, &change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_admits_its_own_lineage_or_any_once_released() {
        let mut record = crate::store::conformance::node(
            "spiffe://plant.test/agent/x509pop/gw-1",
            Some(AttestedWith {
                lineage: "certificate:01".into(),
                certificate_serial: Some("0a".into()),
                key_sha256: None,
            }),
        );
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
