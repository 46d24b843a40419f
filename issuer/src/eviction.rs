//! Evicting and banning attested nodes (DESIGN §5 "Node identity"). An eviction revokes the
//! node's SVID and refuses it on the agent API until it attests again; a ban keeps it out
//! across re-attestation, matched by node id and by what it attested with (device
//! certificate lineage and key, EK hash, join token), until lifted. Revoking the device
//! certificate a node attested with evicts the node.

use proto::SpiffeId;

use crate::attestation::x509pop;
use crate::authority::Authority;
use crate::revocation::{RevocationReason, RevokeRequest};
use crate::store::{CertificateRecord, NodeRecord, Status};
use crate::Error;

/// What an operator does to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// `issuer agent evict`: out until it attests again; another credential (a
    /// re-commissioned device) may then attest as the node.
    Evict,
    /// `issuer agent evict --ban`: evicted, and banned.
    EvictAndBan,
    /// `issuer agent ban`: banned (and evicted); still bound to its credential.
    Ban,
}

impl Authority {
    /// Evicts a node: it is refused on the agent API and its node SVID is revoked; audited
    /// `agent.evicted`. A node whose method can attest again (x509pop, tpm) may come back by
    /// attesting, as in SPIRE, and the node is released: a re-commissioned device's new
    /// certificate may attest as it. A join-token node needs a new token (and is a new
    /// node). With `ban`, the node is also banned ([`Authority::ban_agent`]).
    pub async fn evict_agent(&self, spiffe_id: &str, ban: bool) -> Result<NodeRecord, Error> {
        let removal = if ban {
            Removal::EvictAndBan
        } else {
            Removal::Evict
        };
        self.remove_agent(spiffe_id, removal).await
    }

    /// Bans a node: evicted (its node SVID revoked) and refused at every attestation, by its
    /// node id and by what it attested with (so a TPM's EK, a device certificate's lineage
    /// and key stay out under any node id), until [`Authority::unban_agent`]. Audited
    /// `agent.banned`.
    pub async fn ban_agent(&self, spiffe_id: &str) -> Result<NodeRecord, Error> {
        self.remove_agent(spiffe_id, Removal::Ban).await
    }

    /// Lifts a ban; the node stays evicted until it attests again. Audited `agent.unbanned`.
    pub async fn unban_agent(&self, spiffe_id: &str) -> Result<NodeRecord, Error> {
        let id = self.own_spiffe_id("the agent", spiffe_id.trim())?;
        let before = self
            .store
            .nodes
            .unban(id.as_str())?
            .ok_or_else(|| unknown_agent(&id))?;
        if !before.banned {
            return Err(Error::Admin(format!(
                "agent {id} is not banned; nothing to do"
            )));
        }
        self.audit(
            "agent.unbanned",
            serde_json::json!({ "spiffe_id": id.as_str(), "attested_with": before.attested_with }),
        )?;
        self.store.durability.commit().await?;
        Ok(NodeRecord {
            banned: false,
            ..before
        })
    }

    /// Evicts the x509pop nodes that attested with `revoked`'s lineage (the device
    /// certificate just revoked, or another of its renewals): a revoked device is out at
    /// once, not when its node SVID lapses. They stay bound to that lineage, so no other
    /// certificate takes them over until an operator evicts them. Returns their SPIFFE IDs.
    pub async fn evict_nodes_attested_with(
        &self,
        revoked: &CertificateRecord,
    ) -> Result<Vec<String>, Error> {
        if [crate::profile::SVID, crate::profile::NODE_SVID].contains(&revoked.label.as_str()) {
            return Ok(vec![]);
        }
        let lineage = x509pop::certificate_lineage(&*self.store.certificates, revoked)?;
        let revoked_serial = revoked.serial.to_string();
        let mut evicted = Vec::new();
        for node in self.store.nodes.list()? {
            let attested_with_it = node.method == x509pop::METHOD
                && node.attested_with.as_ref().is_some_and(|w| {
                    w.lineage == lineage
                        || w.certificate_serial.as_deref() == Some(revoked_serial.as_str())
                });
            if !attested_with_it || node.evicted {
                continue;
            }
            let Some(before) = self
                .store
                .nodes
                .update(&node.spiffe_id, |n| n.evicted = true)?
            else {
                continue;
            };
            self.audit(
                "agent.evicted",
                serde_json::json!({
                    "spiffe_id": before.spiffe_id, "svid_serial": before.svid_serial,
                    "reason": "device_certificate_revoked",
                    "certificate_serial": revoked_serial,
                }),
            )?;
            self.store.durability.commit().await?;
            self.revoke_node_svid(&before).await?;
            evicted.push(before.spiffe_id);
        }
        Ok(evicted)
    }

    async fn remove_agent(&self, spiffe_id: &str, removal: Removal) -> Result<NodeRecord, Error> {
        let id = self.own_spiffe_id("the agent", spiffe_id.trim())?;
        let nodes = &self.store.nodes;
        let before = match removal {
            Removal::Evict => nodes.update(id.as_str(), |n| {
                n.evicted = true;
                n.released = true;
            })?,
            Removal::EvictAndBan => nodes.ban(id.as_str(), true)?,
            Removal::Ban => nodes.ban(id.as_str(), false)?,
        }
        .ok_or_else(|| unknown_agent(&id))?;
        if removal == Removal::Ban && before.banned {
            return Err(Error::Admin(format!(
                "agent {id} is already banned; nothing to do"
            )));
        }
        if removal != Removal::Ban || !before.evicted {
            self.audit(
                "agent.evicted",
                serde_json::json!({
                    "spiffe_id": id.as_str(), "svid_serial": before.svid_serial,
                    "reason": "operator",
                }),
            )?;
        }
        if removal != Removal::Evict {
            self.audit(
                "agent.banned",
                serde_json::json!({
                    "spiffe_id": id.as_str(), "attested_with": before.attested_with,
                }),
            )?;
        }
        self.store.durability.commit().await?;
        self.revoke_node_svid(&before).await?;
        Ok(nodes.get(id.as_str())?.unwrap_or(before))
    }

    /// Revokes the node SVID `node` holds, unless it is revoked already.
    async fn revoke_node_svid(&self, node: &NodeRecord) -> Result<(), Error> {
        let current = match crate::serial::Serial::parse(&node.svid_serial) {
            Some(s) => self.store.certificates.get(&s)?,
            None => None,
        };
        if current.is_some_and(|c| c.status != Status::Revoked) {
            self.revocation
                .revoke(&RevokeRequest {
                    serial: node.svid_serial.clone(),
                    reason: RevocationReason::CessationOfOperation,
                })
                .await?;
        }
        Ok(())
    }
}

fn unknown_agent(id: &SpiffeId) -> Error {
    Error::NotFound(format!("no attested agent {id} (see `issuer agent list`)"))
}
