//! Node attestation: how an agent proves which machine it runs on (DESIGN §5 "Node
//! identity"). Each method is one [`NodeAttestor`]; the agent API drives them over the
//! `Attest` stream: evidence in, maybe a challenge out and a response in, then a verdict.
//!
//! An attestor only decides *who* the node is ([`AttestedNode`]); the agent API turns that
//! into a node SVID `spiffe://<td>/agent/<method>/<id>` through the one issuance pipeline.

pub mod join_token;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod x509pop;

use proto::agent::{Challenge, ChallengeResponse, Evidence};

/// What an attestor concluded about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// The method, e.g. `tpm`: the segment after `/agent/` in the node's SPIFFE ID.
    pub method: &'static str,
    /// The node's id within its method, one valid SPIFFE path segment: the join token's id,
    /// the device certificate's common name, the hex SHA-256 of the EK public key.
    pub id: String,
    /// Whether the node can attest again on its own (x509pop, tpm), e.g. after its node SVID
    /// lapsed while the issuer was down. A join token is used once.
    pub can_reattest: bool,
    /// What it proved it holds: the node record is bound to its lineage, so another
    /// credential that yields the same `id` (a device certificate with the same commonName
    /// from another enrollment) can't take the node over, and bans match it.
    pub attested_with: crate::store::AttestedWith,
}

/// The first step of an attestation.
#[derive(Debug)]
pub enum Step {
    /// The evidence alone proves the node (join token).
    Attested(AttestedNode),
    /// The node must answer this challenge; `pending` checks the answer, once.
    Challenge {
        /// Sent to the agent.
        challenge: Challenge,
        /// Consumed by the answer: a nonce can never be answered twice.
        pending: Box<dyn PendingAttestation>,
    },
}

/// An attestation waiting for the agent's answer to a challenge. The agent API gives it
/// [`CHALLENGE_LIFETIME`] and drops it after; dropping it forgets the nonce.
pub trait PendingAttestation: Send + std::fmt::Debug {
    /// Checks the answer (constant-time where it compares secrets).
    fn verify(self: Box<Self>, response: &ChallengeResponse) -> Result<AttestedNode, Refusal>;
}

/// One attestation method on the issuer's side.
pub trait NodeAttestor: Send + Sync + std::fmt::Debug {
    /// The method name, as in the node SPIFFE ID and the `[attestation]` config.
    fn method(&self) -> &'static str;

    /// Examines the evidence: a verdict, or a challenge to answer. `evidence.csr` is the
    /// node SVID's CSR, which x509pop binds its signature to.
    fn begin(&self, evidence: &Evidence) -> Result<Step, Refusal>;

    /// Whether this method's nodes renew their node SVID only by attesting again, never
    /// over mTLS with the current one: then a copy of a node's state directory dies with the
    /// SVID it holds, since only the hardware can attest (SPIRE's default since 1.9).
    fn renews_by_attesting(&self) -> bool {
        false
    }
}

/// How long an agent has to answer a challenge before the nonce is forgotten.
pub const CHALLENGE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a node was not attested. `reason` is a short stable label for metrics and the audit
/// log; `message` tells the agent's operator what to fix and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// e.g. `join_token_used`, `ek_untrusted`, `ak_attributes`, `wrong_answer`.
    pub reason: &'static str,
    /// Human-readable cause and remedy.
    pub message: String,
}

impl Refusal {
    /// A refusal with a stable reason label and a message for the agent.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}
