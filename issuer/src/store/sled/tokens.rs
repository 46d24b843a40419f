//! One-time enrollment tokens, stored only as SHA-256 hashes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::journal::{Journal, Write};
use crate::Error;

/// What a token may be used for: one kind never stands in for the other, so a leaked join
/// token cannot enroll a device over EST and an enrollment token cannot attest an agent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// EST enrollment of one device certificate (the default; records written before kinds
    /// existed are enrollment tokens).
    #[default]
    Enrollment,
    /// One agent's node attestation (`join_token`).
    Join,
}

/// A token as stored: everything but the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// Short public id (first 8 hex digits of the hash), for logs and audit.
    pub id: String,
    /// What it may be used for.
    #[serde(default)]
    pub kind: TokenKind,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// The label (profile) it may enroll under.
    pub label: String,
    /// The subject it is bound to, if any.
    pub subject: Option<String>,
    /// DNS names the certificate may carry.
    #[serde(default)]
    pub dns: Vec<String>,
    /// IP addresses the certificate may carry.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; unusable from then on.
    pub expires_at: i64,
    /// Unix seconds of its one use.
    pub used_at: Option<i64>,
    /// Unix seconds an operator revoked it; unusable from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// The token table.
#[derive(Debug, Clone)]
pub struct Tokens {
    tree: sled::Tree,
    journal: Journal,
}

/// SHA-256 of a token secret.
pub fn hash(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

impl Tokens {
    pub(in crate::store) fn open(db: &sled::Db, journal: Journal) -> Result<Self, Error> {
        Ok(Self {
            tree: db.open_tree("tokens")?,
            journal,
        })
    }

    /// Whether the token could be used now ([`Consumed::Ok`]), without using it. Under a
    /// [`Write`], the answer holds until the write ends.
    pub(super) fn spendable(&self, digest: &[u8; 32], now: i64) -> Result<Consumed, Error> {
        let Some(current) = self.tree.get(digest)? else {
            return Ok(Consumed::Unknown);
        };
        let record = decode(&current)?;
        Ok(if record.revoked_at.is_some() {
            Consumed::Revoked(record)
        } else if record.used_at.is_some() {
            Consumed::AlreadyUsed(record)
        } else if now >= record.expires_at {
            Consumed::Expired(record)
        } else {
            Consumed::Ok(record)
        })
    }

    /// Marks `record` (found [`spendable`](Self::spendable) under `write`) used at `now`.
    pub(super) fn spend_in(
        &self,
        write: &mut Write<'_>,
        digest: &[u8; 32],
        record: &TokenRecord,
        now: i64,
    ) -> Result<(), Error> {
        let used = TokenRecord {
            used_at: Some(now),
            ..record.clone()
        };
        write.insert(&self.tree, digest, encode(&used)?)?;
        Ok(())
    }
}

impl crate::store::TokenStore for Tokens {
    /// Stores a new token (by its hash).
    fn insert(&self, record: &TokenRecord) -> Result<(), Error> {
        let key = hex::decode(&record.hash).map_err(|e| Error::Store(e.to_string()))?;
        self.journal
            .begin()?
            .insert(&self.tree, key, encode(record)?)?;
        Ok(())
    }

    /// Looks a token up without using it.
    fn find(&self, secret: &str) -> Result<Option<TokenRecord>, Error> {
        let digest = hash(secret);
        let Some(bytes) = self.tree.get(digest)? else {
            return Ok(None);
        };
        let record = decode(&bytes)?;
        // The key lookup already matched; compare the stored hash in constant time anyway so
        // no code path compares token material with a short-circuiting equality.
        let stored = hex::decode(&record.hash).map_err(|e| Error::Store(e.to_string()))?;
        if stored.ct_eq(&digest).into() {
            Ok(Some(record))
        } else {
            Ok(None)
        }
    }

    /// Uses a token exactly once: checked and spent under the store's write lock, so of
    /// any number of concurrent requests with the same token one wins.
    fn consume(&self, secret: &str, now: i64) -> Result<Consumed, Error> {
        self.consume_hash(&hash(secret), now)
    }

    /// [`Tokens::consume`] by the token's SHA-256, for callers that no longer hold the
    /// secret.
    fn consume_hash(&self, digest: &[u8; 32], now: i64) -> Result<Consumed, Error> {
        let mut write = self.journal.begin()?;
        let consumed = self.spendable(digest, now)?;
        if let Consumed::Ok(record) = &consumed {
            self.spend_in(&mut write, digest, record, now)?;
        }
        Ok(consumed)
    }

    /// Every token, secrets never included (only their hashes are stored), oldest first.
    fn list(&self) -> Result<Vec<TokenRecord>, Error> {
        let mut records = self
            .tree
            .iter()
            .values()
            .map(|value| decode(&value?))
            .collect::<Result<Vec<_>, Error>>()?;
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(records)
    }

    /// Revokes the unused tokens with public id `id`, under the store's write lock, so a
    /// concurrent use either wins (the token reads as used) or finds it revoked. An id is a
    /// prefix of the hash the tokens are keyed by; an enrollment token's 32-bit id may be
    /// shared by more than one token, and then each is revoked. No match: an empty list.
    fn revoke(&self, id: &str, now: i64) -> Result<Vec<TokenRevocation>, Error> {
        let Ok(prefix) = hex::decode(id) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        let mut write = self.journal.begin()?;
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, current) = entry?;
            let record = decode(&current)?;
            if record.id != id {
                continue;
            }
            if record.revoked_at.is_some() {
                found.push(TokenRevocation::AlreadyRevoked(record));
            } else if record.used_at.is_some() {
                found.push(TokenRevocation::AlreadyUsed(record));
            } else {
                let revoked = TokenRecord {
                    revoked_at: Some(now),
                    ..record
                };
                write.insert(&self.tree, &key, encode(&revoked)?)?;
                found.push(TokenRevocation::Revoked(revoked));
            }
        }
        Ok(found)
    }
}

fn encode(record: &TokenRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<TokenRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("token record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hash: &str, id_len: usize, kind: TokenKind) -> TokenRecord {
        TokenRecord {
            id: hash[..id_len].to_owned(),
            kind,
            hash: hash.to_owned(),
            label: "device".into(),
            subject: None,
            dns: vec![],
            ips: vec![],
            created_at: 0,
            expires_at: 100,
            used_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn state_puts_revoked_before_spent_and_expired() {
        let fresh = record(&"ab".repeat(32), 8, TokenKind::Enrollment);
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
