//! `join_token`: a one-time token from `issuer token create --kind join`. The evidence alone
//! proves the node: the token is consumed atomically (of two agents racing with one token,
//! one wins) and the node is named by the token's public id, never by its secret.

use std::sync::Arc;

use proto::agent::{evidence, Evidence};

use super::{AttestedNode, NodeAttestor, Refusal, Step};
use crate::clock::Clock;
use crate::store::{Consumed, TokenKind, TokenStore};

/// The method name, as in `spiffe://<td>/agent/join_token/<token id>`.
pub const METHOD: &str = "join_token";

/// Attests nodes by one-time join tokens.
#[derive(Debug)]
pub struct JoinTokenAttestor {
    tokens: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
}

impl JoinTokenAttestor {
    /// An attestor consuming tokens from `tokens`.
    pub fn new(tokens: Arc<dyn TokenStore>, clock: Arc<dyn Clock>) -> Self {
        Self { tokens, clock }
    }
}

impl NodeAttestor for JoinTokenAttestor {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn begin(&self, evidence: &Evidence) -> Result<Step, Refusal> {
        let Some(evidence::Method::JoinToken(join)) = &evidence.method else {
            return Err(Refusal::new(
                "wrong_method",
                "the evidence is not a join token",
            ));
        };
        let secret = join.token.trim();
        if secret.is_empty() {
            return Err(Refusal::new("token_missing", "the join token is empty"));
        }
        let digest = crate::store::tokens_hash(secret);
        // Look before consuming: an enrollment token must stay usable for EST when someone
        // mistakenly offers it here.
        let kind = self
            .tokens
            .find(secret)
            .map_err(|e| store_failure(&e))?
            .map(|r| r.kind);
        if kind == Some(TokenKind::Enrollment) {
            return Err(Refusal::new(
                "token_kind",
                "this is an EST enrollment token, not a join token; create one with \
                 `issuer token create --kind join`",
            ));
        }
        let now = self.clock.now().unix_timestamp();
        match self
            .tokens
            .consume_hash(&digest, now)
            .map_err(|e| store_failure(&e))?
        {
            Consumed::Ok(record) => Ok(Step::Attested(AttestedNode {
                method: METHOD,
                attested_with: crate::store::AttestedWith {
                    lineage: format!("join_token:{}", record.id),
                    certificate_serial: None,
                    key_sha256: None,
                },
                id: record.id,
                can_reattest: false,
            })),
            Consumed::AlreadyUsed(_) => Err(Refusal::new(
                "join_token_used",
                "this join token was already used; join tokens work once, ask the PKI \
                 operator for a new one",
            )),
            Consumed::Revoked(_) => Err(Refusal::new(
                "join_token_revoked",
                "this join token was revoked by the PKI operator; ask them for a new one",
            )),
            Consumed::Expired(_) => Err(Refusal::new(
                "join_token_expired",
                "this join token expired; ask the PKI operator for a new one",
            )),
            Consumed::Unknown => Err(Refusal::new(
                "join_token_unknown",
                "unknown join token; check it was copied completely",
            )),
        }
    }
}

fn store_failure(error: &crate::Error) -> Refusal {
    tracing::error!(%error, "join token lookup failed");
    Refusal::new(
        "store",
        "the issuer could not read its token store; try again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, TokenRecord};
    use proto::agent::JoinTokenEvidence;

    #[derive(Debug)]
    struct FixedClock(i64);
    impl Clock for FixedClock {
        fn now(&self) -> time::OffsetDateTime {
            time::OffsetDateTime::from_unix_timestamp(self.0).expect("time")
        }
    }

    fn evidence(token: &str) -> Evidence {
        Evidence {
            csr: vec![],
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence {
                token: token.into(),
            })),
        }
    }

    fn add(store: &Store, secret: &str, kind: TokenKind, expires_at: i64) -> String {
        let hash = hex::encode(crate::store::tokens_hash(secret));
        let record = TokenRecord {
            id: hash[..32].to_owned(),
            kind,
            hash,
            label: String::new(),
            subject: None,
            dns: vec![],
            ips: vec![],
            created_at: 0,
            expires_at,
            used_at: None,
            revoked_at: None,
        };
        store.tokens.insert(&record).expect("insert");
        record.id
    }

    #[tokio::test]
    async fn a_join_token_attests_once_and_names_the_node_by_its_public_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let id = add(&store, "join-secret", TokenKind::Join, 100);
        let attestor = JoinTokenAttestor::new(store.tokens.clone(), Arc::new(FixedClock(10)));
        match attestor.begin(&evidence("join-secret")).expect("first use") {
            Step::Attested(node) => {
                assert_eq!(node.id, id);
                assert!(!node.id.contains("join-secret"));
                assert!(!node.can_reattest);
            }
            Step::Challenge { .. } => panic!("a join token needs no challenge"),
        }
        let again = attestor.begin(&evidence("join-secret")).expect_err("reuse");
        assert_eq!(again.reason, "join_token_used");
    }

    #[tokio::test]
    async fn expired_unknown_and_enrollment_tokens_are_refused_and_enrollment_tokens_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        add(&store, "old", TokenKind::Join, 5);
        add(&store, "est", TokenKind::Enrollment, 100);
        let attestor = JoinTokenAttestor::new(store.tokens.clone(), Arc::new(FixedClock(10)));
        let reason = |t: &str| attestor.begin(&evidence(t)).expect_err(t).reason;
        assert_eq!(reason("old"), "join_token_expired");
        assert_eq!(reason("nope"), "join_token_unknown");
        assert_eq!(reason("est"), "token_kind");
        let kept = store.tokens.find("est").expect("find").expect("present");
        assert_eq!(
            kept.used_at, None,
            "a refused EST token stays usable for EST"
        );
    }

    #[tokio::test]
    async fn a_revoked_join_token_attests_no_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let id = add(&store, "join-secret", TokenKind::Join, 100);
        let revoked = store.tokens.revoke(&id, 5).expect("revoke");
        assert!(
            matches!(revoked.as_slice(), [crate::store::TokenRevocation::Revoked(r)] if r.revoked_at == Some(5)),
            "{revoked:?}"
        );
        let attestor = JoinTokenAttestor::new(store.tokens.clone(), Arc::new(FixedClock(10)));
        let refused = attestor
            .begin(&evidence("join-secret"))
            .expect_err("revoked");
        assert_eq!(refused.reason, "join_token_revoked");
    }
}
