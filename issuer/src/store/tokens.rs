//! The token aggregate as the rest of the issuer sees it: the domain types and the
//! [`TokenStore`] every backend implements (sled's encoding: `sled/tokens.rs`; the admin
//! socket's: `admin/wire.rs`).

use std::fmt::Debug;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What a token may be used for: one kind never stands in for the other, so a leaked join
/// token cannot enroll a device over EST and an enrollment token cannot attest an agent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// EST enrollment of one device certificate (the default).
    #[default]
    Enrollment,
    /// One agent's node attestation (`join_token`).
    Join,
}

/// A token: everything about it but the secret, which is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Short public id (first 8 hex digits of the hash), for logs and audit.
    pub id: String,
    /// What it may be used for.
    pub kind: TokenKind,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// The label (profile) it may enroll under.
    pub label: String,
    /// The subject it is bound to, if any.
    pub subject: Option<String>,
    /// DNS names the certificate may carry.
    pub dns: Vec<String>,
    /// IP addresses the certificate may carry.
    pub ips: Vec<IpAddr>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; unusable from then on.
    pub expires_at: i64,
    /// Unix seconds of its one use.
    pub used_at: Option<i64>,
    /// Unix seconds an operator revoked it; unusable from then on.
    pub revoked_at: Option<i64>,
}

/// Where a token is in its life, as `issuer token list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Can still be used once.
    Unused,
    /// Used (its one use is done).
    Spent,
    /// Past its expiry, never used.
    Expired,
    /// Revoked by an operator before it was used.
    Revoked,
}

impl TokenRecord {
    /// The token's state as of `now` (unix seconds). A revoked token was never used (only an
    /// unused one can be revoked), and a revocation outranks the expiry it may also be past.
    pub fn state(&self, now: i64) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.used_at.is_some() {
            TokenState::Spent
        } else if now >= self.expires_at {
            TokenState::Expired
        } else {
            TokenState::Unused
        }
    }
}

/// What revoking one token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRevocation {
    /// Now revoked; the record as it is now.
    Revoked(TokenRecord),
    /// Already used: revoking would not undo what it enrolled or joined.
    AlreadyUsed(TokenRecord),
    /// Revoked before.
    AlreadyRevoked(TokenRecord),
}

/// Why a token can't be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumed {
    /// Now used; the record as it was.
    Ok(TokenRecord),
    /// No such token.
    Unknown,
    /// Already used (possibly by a concurrent request a moment ago).
    AlreadyUsed(TokenRecord),
    /// Revoked by an operator.
    Revoked(TokenRecord),
    /// Past its expiry.
    Expired(TokenRecord),
}

/// SHA-256 of a token secret.
pub fn hash(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// Enrollment and join tokens, stored by the SHA-256 of their secret.
pub trait TokenStore: Debug + Send + Sync {
    /// Stores a new token (by its hash).
    fn insert(&self, record: &TokenRecord) -> Result<(), Error>;
    /// Looks a token up without using it.
    fn find(&self, secret: &str) -> Result<Option<TokenRecord>, Error>;
    /// Uses a token exactly once: of any number of concurrent requests one wins.
    fn consume(&self, secret: &str, now: i64) -> Result<Consumed, Error>;
    /// [`consume`](Self::consume) by the token's SHA-256.
    fn consume_hash(&self, digest: &[u8; 32], now: i64) -> Result<Consumed, Error>;
    /// Every token (hashes only), oldest first.
    fn list(&self) -> Result<Vec<TokenRecord>, Error>;
    /// Revokes the unused tokens with public id `id`; no match: an empty list.
    fn revoke(&self, id: &str, now: i64) -> Result<Vec<TokenRevocation>, Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_puts_revoked_before_spent_and_expired() {
        let fresh = crate::store::conformance::token("secret");
        let cases = [
            (fresh.clone(), 10, TokenState::Unused),
            (fresh.clone(), 100, TokenState::Expired),
            (
                TokenRecord {
                    used_at: Some(5),
                    ..fresh.clone()
                },
                200,
                TokenState::Spent,
            ),
            (
                TokenRecord {
                    revoked_at: Some(5),
                    ..fresh
                },
                200,
                TokenState::Revoked,
            ),
        ];
        for (record, now, state) in cases {
            assert_eq!(record.state(now), state, "{record:?} at {now}");
        }
    }
}
