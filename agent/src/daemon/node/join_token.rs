//! `join_token` node attestation: a one-time token from `issuer token create --kind join`.
//! The token is the whole proof, so it works once: a node that loses its node SVID needs a
//! new token. A token file is read only here, when the node attests, so a node with a cached
//! identity restarts without it.

use std::fmt;

use super::NodeAttestation;
use crate::daemon::config::JoinToken;
use crate::Error;
use proto::agent::{evidence, Challenge, ChallengeResponse, Evidence, JoinTokenEvidence};

/// Attestation with a join token.
pub struct JoinTokenAttestation {
    token: JoinToken,
}

impl JoinTokenAttestation {
    /// Attestation with `token`.
    pub fn new(token: JoinToken) -> Self {
        Self { token }
    }
}

impl fmt::Debug for JoinTokenAttestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinTokenAttestation(<redacted>)")
    }
}

impl NodeAttestation for JoinTokenAttestation {
    fn method(&self) -> &'static str {
        "join_token"
    }

    fn evidence(&mut self, csr: &[u8]) -> Result<Evidence, Error> {
        let token = self.token.read()?;
        Ok(Evidence {
            csr: csr.to_vec(),
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence {
                token: token.as_str().to_owned(),
            })),
        })
    }

    fn answer(&mut self, _challenge: &Challenge, _csr: &[u8]) -> Result<ChallengeResponse, Error> {
        Err(Error::Attestation(
            "the issuer sent a challenge for a join token, which has none; is the server a Plant PKI issuer?".into(),
        ))
    }

    fn can_reattest(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    #[test]
    fn evidence_carries_the_token_and_the_csr_but_debug_does_not() {
        let mut attestation =
            JoinTokenAttestation::new(JoinToken::Inline(Zeroizing::new("s3cret-join".into())));
        let evidence = attestation.evidence(b"csr").expect("evidence");
        assert_eq!(evidence.csr, b"csr");
        let Some(evidence::Method::JoinToken(token)) = evidence.method else {
            panic!("join token evidence");
        };
        assert_eq!(token.token, "s3cret-join");
        assert!(!format!("{attestation:?}").contains("s3cret"));
        assert!(!attestation.can_reattest());
    }

    #[test]
    fn a_missing_token_file_is_read_only_when_attesting_and_says_how_to_get_a_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("join.token");
        let mut attestation = JoinTokenAttestation::new(JoinToken::File {
            path: path.clone(),
            config: dir.path().join("agent.toml"),
        });
        let error = attestation.evidence(b"csr").expect_err("no file");
        assert!(error.is_usage(), "{error}");
        let text = error.to_string();
        assert!(
            text.contains(&format!(
                "attestation.join_token_file: no cached node identity and join_token_file {} does not exist: create a token with `issuer token create --kind join`",
                path.display()
            )),
            "{text}"
        );
        std::fs::write(&path, "tok-1\n").expect("write");
        let evidence = attestation.evidence(b"csr").expect("evidence");
        let Some(evidence::Method::JoinToken(token)) = evidence.method else {
            panic!("join token evidence");
        };
        assert_eq!(token.token, "tok-1");
    }
}
