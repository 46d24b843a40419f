//! One-time enrollment tokens, stored only as SHA-256 hashes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

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
    /// Past its expiry.
    Expired(TokenRecord),
}

/// The token table.
#[derive(Debug, Clone)]
pub struct TokenStore {
    tree: sled::Tree,
}

/// SHA-256 of a token secret.
pub fn hash(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

impl TokenStore {
    pub(super) fn open(db: &sled::Db) -> Result<Self, Error> {
        Ok(Self {
            tree: db.open_tree("tokens")?,
        })
    }

    /// Stores a new token (by its hash).
    pub fn insert(&self, record: &TokenRecord) -> Result<(), Error> {
        let key = hex::decode(&record.hash).map_err(|e| Error::Store(e.to_string()))?;
        self.tree.insert(key, encode(record)?)?;
        Ok(())
    }

    /// Looks a token up without using it.
    pub fn find(&self, secret: &str) -> Result<Option<TokenRecord>, Error> {
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

    /// Uses a token exactly once: a compare-and-swap, so of any number of concurrent
    /// requests with the same token one wins.
    pub fn consume(&self, secret: &str, now: i64) -> Result<Consumed, Error> {
        self.consume_hash(&hash(secret), now)
    }

    /// [`TokenStore::consume`] by the token's SHA-256, for callers that no longer hold the
    /// secret.
    pub fn consume_hash(&self, digest: &[u8; 32], now: i64) -> Result<Consumed, Error> {
        let digest = *digest;
        loop {
            let Some(current) = self.tree.get(digest)? else {
                return Ok(Consumed::Unknown);
            };
            let record = decode(&current)?;
            if record.used_at.is_some() {
                return Ok(Consumed::AlreadyUsed(record));
            }
            if now >= record.expires_at {
                return Ok(Consumed::Expired(record));
            }
            let used = TokenRecord {
                used_at: Some(now),
                ..record.clone()
            };
            match self
                .tree
                .compare_and_swap(digest, Some(current), Some(encode(&used)?))?
            {
                Ok(()) => return Ok(Consumed::Ok(record)),
                Err(_) => continue,
            }
        }
    }
}

fn encode(record: &TokenRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<TokenRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("token record: {e}")))
}
