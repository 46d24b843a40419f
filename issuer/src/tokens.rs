//! The token office: one-time tokens for commissioning (EST enrollment) and agents (join),
//! created, listed and revoked by the operator. Secrets exist only in the answer to their
//! creation; the store keeps their SHA-256.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::grant::{valid_dns, valid_subject, ListenerNames};
use crate::profile::{Profile, SanKind};
use crate::state_volume::StateVolume;
use crate::store::{Store, TokenKind, TokenRecord, TokenState};
use crate::Error;

/// An operator's request for tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Enrollment (EST, the default) or join (agent node attestation).
    #[serde(default)]
    pub kind: TokenKind,
    /// The label the token enrolls under (default profile when absent).
    pub label: Option<String>,
    /// The subject it is bound to.
    pub subject: Option<String>,
    /// Lifetime in seconds (config default when absent).
    pub ttl_secs: Option<u64>,
    /// DNS names to grant.
    #[serde(default)]
    pub dns: Vec<String>,
    /// IP addresses to grant.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// How many tokens (for benches and cabinets); default 1, at most 100,000.
    pub count: Option<usize>,
}

/// A created token: the secret is shown once and never stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    /// Public id.
    pub id: String,
    /// The secret to hand to the engineer.
    pub token: String,
    /// Enrollment or join.
    #[serde(default)]
    pub kind: TokenKind,
    /// Label.
    pub label: String,
    /// Bound subject.
    pub subject: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("label", &self.label)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// Creates, lists and revokes tokens.
#[derive(Debug)]
pub struct TokenOffice {
    store: Store,
    clock: Arc<dyn Clock>,
    /// EST labels' profiles: what an enrollment token may grant.
    profiles: BTreeMap<String, Profile>,
    default_profile: String,
    trust_domain: String,
    /// `[tokens] default_ttl` and `max_ttl`.
    default_ttl: Duration,
    max_ttl: Duration,
    state_volume: StateVolume,
    /// The issuer's own TLS names, which no token may grant.
    listener_names: ListenerNames,
}

/// What builds a [`TokenOffice`].
#[derive(Debug)]
pub struct Parts {
    /// The store.
    pub store: Store,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// EST labels' profiles.
    pub profiles: BTreeMap<String, Profile>,
    /// The label of a token that names none.
    pub default_profile: String,
    /// The trust domain (join tokens name agents in it).
    pub trust_domain: String,
    /// `[tokens] default_ttl`.
    pub default_ttl: Duration,
    /// `[tokens] max_ttl`.
    pub max_ttl: Duration,
    /// The state folder's filesystem.
    pub state_volume: StateVolume,
    /// The issuer's own TLS names.
    pub listener_names: ListenerNames,
}

impl TokenOffice {
    /// The office over `parts`.
    pub fn new(parts: Parts) -> Self {
        Self {
            store: parts.store,
            clock: parts.clock,
            profiles: parts.profiles,
            default_profile: parts.default_profile,
            trust_domain: parts.trust_domain,
            default_ttl: parts.default_ttl,
            max_ttl: parts.max_ttl,
            state_volume: parts.state_volume,
            listener_names: parts.listener_names,
        }
    }

    /// The profile for an EST label (`None`: the default profile).
    fn profile(&self, label: Option<&str>) -> Option<(&str, &Profile)> {
        let name = label.unwrap_or(&self.default_profile);
        self.profiles
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Creates one-time tokens; their secrets exist only in the answer.
    pub async fn create(&self, request: &TokenRequest) -> Result<Vec<CreatedToken>, Error> {
        self.state_volume.check()?;
        let bad = |why: String| Error::Admin(why);
        if request.kind == TokenKind::Join
            && (request.label.is_some()
                || request.subject.is_some()
                || !request.dns.is_empty()
                || !request.ips.is_empty())
        {
            return Err(bad(
                "a join token names no label, subject, DNS name or IP address: the node's \
                 identity is spiffe://<trust domain>/agent/join_token/<token id>"
                    .into(),
            ));
        }
        let (label, profile) = self.profile(request.label.as_deref()).ok_or_else(|| {
            bad(format!(
                "unknown label {:?}; this issuer serves {}",
                request.label.clone().unwrap_or_default(),
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if let Some(subject) = &request.subject {
            if !valid_subject(subject) {
                return Err(bad(format!(
                    "subject {subject:?} must be 1-64 letters, digits, '.', '-', '_'"
                )));
            }
        }
        if let Some(dns) = request.dns.iter().find(|d| !valid_dns(d)) {
            return Err(bad(format!("{dns:?} is not a valid DNS name")));
        }
        if !request.dns.is_empty() && !profile.allows(SanKind::Dns) {
            return Err(bad(format!("profile {label} does not allow DNS names")));
        }
        if !request.ips.is_empty() && !profile.allows(SanKind::Ip) {
            return Err(bad(format!("profile {label} does not allow IP addresses")));
        }
        self.listener_names.refuse(&request.dns, &request.ips)?;
        let ttl = request
            .ttl_secs
            .map(Duration::from_secs)
            .unwrap_or(self.default_ttl);
        if ttl > self.max_ttl || ttl.is_zero() {
            return Err(bad(format!(
                "token lifetime must be between 1s and {} (tokens.max_ttl)",
                proto::duration::format(self.max_ttl)
            )));
        }
        let count = request.count.unwrap_or(1);
        if count == 0 || count > 100_000 {
            return Err(bad("count must be between 1 and 100000".into()));
        }
        let now = self.clock.now().unix_timestamp();
        let expires_at = now + ttl.as_secs() as i64;
        let mut created = Vec::with_capacity(count);
        for _ in 0..count {
            let secret = new_secret();
            let hash = hex::encode(crate::store::tokens_hash(&secret));
            let record = TokenRecord {
                // A join token's id names a node for as long as the node lives, so it gets
                // more of the hash than an enrollment token's: 128 bits, not 32. Either way it
                // is of the hash, never of the secret.
                id: match request.kind {
                    TokenKind::Enrollment => hash[..8].to_owned(),
                    TokenKind::Join => hash[..32].to_owned(),
                },
                kind: request.kind,
                hash,
                label: match request.kind {
                    TokenKind::Enrollment => label.to_owned(),
                    TokenKind::Join => String::new(),
                },
                subject: request.subject.clone(),
                dns: request.dns.clone(),
                ips: request.ips.clone(),
                created_at: now,
                expires_at,
                used_at: None,
                revoked_at: None,
            };
            self.store.tokens.insert(&record)?;
            self.store.audit_event(
                "token.created",
                serde_json::json!({
                    "token_id": record.id, "kind": record.kind, "label": record.label,
                    "subject": record.subject, "expires_at": expires_at,
                }),
                self.clock.now(),
            )?;
            created.push(CreatedToken {
                id: record.id,
                token: secret,
                kind: record.kind,
                label: record.label,
                subject: request.subject.clone(),
                expires_at,
            });
        }
        self.store.durability.commit().await?;
        Ok(created)
    }

    /// Every token with its state now, oldest first; secrets are never stored, so never
    /// listed.
    pub fn list(&self) -> Result<Vec<(TokenRecord, TokenState)>, Error> {
        let now = self.clock.now().unix_timestamp();
        Ok(self
            .store
            .tokens
            .list()?
            .into_iter()
            .map(|t| {
                let state = t.state(now);
                (t, state)
            })
            .collect())
    }

    /// Revokes the unused token(s) with public id `id`: they can no longer enroll or join.
    /// Recorded and audited before the answer. A spent token is not revoked (what it
    /// enrolled is revoked or evicted instead); the error says how.
    pub async fn revoke(&self, id: &str) -> Result<Vec<TokenRecord>, Error> {
        use crate::store::TokenRevocation;
        self.state_volume.check()?;
        let id = id.trim().to_ascii_lowercase();
        let found = self
            .store
            .tokens
            .revoke(&id, self.clock.now().unix_timestamp())?;
        let mut revoked = Vec::new();
        let mut refusal = None;
        for outcome in found {
            match outcome {
                TokenRevocation::Revoked(record) => revoked.push(record),
                TokenRevocation::AlreadyRevoked(_) => {
                    refusal = Some(format!("token {id} is already revoked; nothing to do"))
                }
                TokenRevocation::AlreadyUsed(record) => {
                    let used = record.used_at.map(proto::rfc3339_unix).unwrap_or_default();
                    refusal = Some(match record.kind {
                        TokenKind::Enrollment => format!(
                            "token {id} was already used ({used}); revoking it now changes \
                             nothing: revoke the certificate it enrolled instead (`issuer \
                             inventory --owner token:{id}` shows its serial, then `issuer \
                             revoke <serial>`)"
                        ),
                        TokenKind::Join => format!(
                            "token {id} was already used ({used}); revoking it now changes \
                             nothing: evict the agent it joined instead (`issuer agent evict \
                             spiffe://{}/agent/join_token/{id}`)",
                            self.trust_domain
                        ),
                    })
                }
            }
        }
        if revoked.is_empty() {
            return Err(match refusal {
                Some(message) => Error::Admin(message),
                None => Error::NotFound(format!(
                    "no token with id {id:?}; `issuer token list` shows the ids (a token's \
                     secret is not its id)"
                )),
            });
        }
        for record in &revoked {
            self.store.audit_event(
                "token.revoked",
                serde_json::json!({
                    "token_id": record.id, "kind": record.kind, "label": record.label,
                    "subject": record.subject,
                }),
                self.clock.now(),
            )?;
        }
        self.store.durability.commit().await?;
        Ok(revoked)
    }
}

/// 256 random bits, base64url: the one-time token an engineer types or pastes.
fn new_secret() -> String {
    // A token that starts with '-' reads as an option to command-line tools
    // (`agent enroll --token -x…`), so draw again: one in 64 times, costing 6 bits of 256.
    loop {
        let bytes: [u8; 32] = rand::random();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        if !secret.starts_with('-') {
            return secret;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::new_secret;

    #[test]
    fn token_secrets_never_start_with_a_hyphen() {
        // Without the redraw, one in 64 would: 2,000 draws would all but surely show one.
        for _ in 0..2000 {
            let secret = new_secret();
            assert!(!secret.starts_with('-'), "{secret}");
            assert_eq!(secret.len(), 43);
        }
    }
}
