//! `join_token` node attestation: a one-time token from `issuer token create --kind join`.
//! The token is the whole proof, so it works once: a node that loses its node SVID needs a
//! new token.

use std::fmt;

use proto::agent::{evidence, Challenge, ChallengeResponse, Evidence, JoinTokenEvidence};
use zeroize::Zeroizing;

use super::NodeAttestation;
use crate::Error;

/// Attestation with a join token.
pub struct JoinTokenAttestation {
    token: Zeroizing<String>,
}

impl JoinTokenAttestation {
    /// Attestation with `token`.
    pub fn new(token: Zeroizing<String>) -> Self {
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
        Ok(Evidence {
            csr: csr.to_vec(),
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence {
                token: self.token.as_str().to_owned(),
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

    #[test]
    fn evidence_carries_the_token_and_the_csr_but_debug_does_not() {
        let mut attestation = JoinTokenAttestation::new(Zeroizing::new("s3cret-join".into()));
        let evidence = attestation.evidence(b"csr").expect("evidence");
        assert_eq!(evidence.csr, b"csr");
        let Some(evidence::Method::JoinToken(token)) = evidence.method else {
            panic!("join token evidence");
        };
        assert_eq!(token.token, "s3cret-join");
        assert!(!format!("{attestation:?}").contains("s3cret"));
        assert!(!attestation.can_reattest());
    }
}
