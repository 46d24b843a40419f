//! The token table: one record per token, keyed by the SHA-256 of its secret, as JSON
//! (the layout every release has written, so existing stores open as they are).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::journal::{Journal, Write};
use crate::store::tokens::hash;
use crate::store::{Consumed, TokenKind, TokenRecord, TokenRevocation};
use crate::Error;

/// The token table.
#[derive(Debug, Clone)]
pub struct Tokens {
    tree: sled::Tree,
    journal: Journal,
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

/// A token as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    /// Records written before kinds existed are enrollment tokens.
    #[serde(default)]
    kind: StoredKind,
    hash: String,
    label: String,
    subject: Option<String>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_at: Option<i64>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredKind {
    #[default]
    Enrollment,
    Join,
}

fn encode(record: &TokenRecord) -> Result<Vec<u8>, Error> {
    let stored = Stored {
        id: record.id.clone(),
        kind: match record.kind {
            TokenKind::Enrollment => StoredKind::Enrollment,
            TokenKind::Join => StoredKind::Join,
        },
        hash: record.hash.clone(),
        label: record.label.clone(),
        subject: record.subject.clone(),
        dns: record.dns.clone(),
        ips: record.ips.clone(),
        created_at: record.created_at,
        expires_at: record.expires_at,
        used_at: record.used_at,
        revoked_at: record.revoked_at,
    };
    serde_json::to_vec(&stored).map_err(|e| Error::Store(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<TokenRecord, Error> {
    let stored: Stored =
        serde_json::from_slice(bytes).map_err(|e| Error::Store(format!("token record: {e}")))?;
    Ok(TokenRecord {
        id: stored.id,
        kind: match stored.kind {
            StoredKind::Enrollment => TokenKind::Enrollment,
            StoredKind::Join => TokenKind::Join,
        },
        hash: stored.hash,
        label: stored.label,
        subject: stored.subject,
        dns: stored.dns,
        ips: stored.ips,
        created_at: stored.created_at,
        expires_at: stored.expires_at,
        used_at: stored.used_at,
        revoked_at: stored.revoked_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_the_json_layout_existing_stores_hold() {
        // As an issuer from before token kinds wrote it: no kind, no revocation.
        let old = br#"{"id":"abcd1234","hash":"ab","label":"device","subject":null,"created_at":1,"expires_at":2,"used_at":null}"#;
        let record = decode(old).expect("an old record reads");
        assert_eq!(record.kind, TokenKind::Enrollment);
        assert_eq!(record.revoked_at, None);
        let join = TokenRecord {
            kind: TokenKind::Join,
            revoked_at: Some(3),
            ..record
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(&join).expect("encode")).expect("json");
        assert_eq!(json["kind"], "join");
        assert_eq!(json["revoked_at"], 3);
        assert_eq!(
            decode(&encode(&join).expect("encode")).expect("decode"),
            join
        );
    }
}
