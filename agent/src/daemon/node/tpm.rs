//! TPM 2.0 node attestation by credential activation (DESIGN §5 "Node identity"): the
//! evidence is the TPM's EK certificate (RSA 2048 or ECC P-256), its EK public area and a fresh attestation
//! key's public area; the issuer answers with a credential only this TPM can activate, and
//! the secret inside it is the answer.
//!
//! The TPM work (EK derivation, AK creation, ActivateCredential with the EK's policy) is
//! [`hsm::tpm::CredentialActivation`]'s, on the TPM's owner thread, so it shares the
//! connection with any TPM-held key of this process.

use std::time::Duration;

use proto::agent::{
    challenge, challenge_response, evidence, Challenge, ChallengeResponse, Evidence,
    TpmChallengeResponse, TpmEvidence,
};

use super::NodeAttestation;
use crate::Error;

/// How long one TPM call may take: deriving the RSA 2048 EK is a prime search, which a
/// discrete TPM may spend seconds on.
const TPM_DEADLINE: Duration = Duration::from_secs(30);

/// TPM credential activation, the agent's side of the `tpm` method.
#[derive(Debug)]
pub struct TpmAttestation {
    activation: hsm::tpm::CredentialActivation,
    tcti: hsm::Tcti,
    /// Where node keys made in the TPM keep their blobs; `None`: node keys in memory.
    node_keys: Option<std::path::PathBuf>,
}

impl TpmAttestation {
    /// Reaches the TPM at `tcti` (as in key references: `device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, `tabrmd`). Nothing is sent to it until
    /// [`NodeAttestation::evidence`].
    pub fn open(tcti: &str) -> Result<Self, Error> {
        Self::open_with(tcti, hsm::EndorsementKind::Auto)
    }

    /// As [`TpmAttestation::open`], attesting with the endorsement key `ek` names.
    pub fn open_with(tcti: &str, ek: hsm::EndorsementKind) -> Result<Self, Error> {
        let tcti: hsm::Tcti = tcti.parse()?;
        let options = hsm::TpmOptions {
            deadline: TPM_DEADLINE,
            ..hsm::TpmOptions::default()
        };
        Ok(Self {
            activation: hsm::tpm::CredentialActivation::open_with(&tcti, options, ek)?,
            tcti,
            node_keys: None,
        })
    }

    /// Makes each node SVID key in the TPM, its blob in `state_dir` (the daemon's way: the
    /// node key can't be copied off the machine).
    #[must_use]
    pub fn with_node_keys_in(mut self, state_dir: &std::path::Path) -> Self {
        self.node_keys = Some(state_dir.to_owned());
        self
    }
}

impl NodeAttestation for TpmAttestation {
    fn method(&self) -> &'static str {
        "tpm"
    }

    fn evidence(&mut self, csr: &[u8]) -> Result<Evidence, Error> {
        let endorsement = self.activation.evidence()?;
        Ok(Evidence {
            csr: csr.to_vec(),
            method: Some(evidence::Method::Tpm(TpmEvidence {
                ek_certificate: endorsement.ek_certificate,
                ek_public: endorsement.ek_public,
                ak_public: endorsement.ak_public,
            })),
        })
    }

    fn answer(&mut self, challenge: &Challenge, _csr: &[u8]) -> Result<ChallengeResponse, Error> {
        let Some(challenge::Method::Tpm(challenge)) = &challenge.method else {
            return Err(Error::Attestation(
                "the issuer sent a challenge for another method than tpm".into(),
            ));
        };
        let secret = self
            .activation
            .activate(&challenge.credential_blob, &challenge.encrypted_secret)?;
        Ok(ChallengeResponse {
            method: Some(challenge_response::Method::Tpm(TpmChallengeResponse {
                secret: secret.to_vec(),
            })),
        })
    }

    fn can_reattest(&self) -> bool {
        true
    }

    fn renews_by_attesting(&self) -> bool {
        true
    }

    fn node_key(&mut self) -> Result<crate::daemon::svid::NodeKey, Error> {
        let Some(dir) = &self.node_keys else {
            return Ok(crate::daemon::svid::KeyPair::generate()?.into());
        };
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        // A new blob per key: the current one stays usable until the new SVID arrives.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "{}{stamp}{}",
            crate::daemon::cache::NODE_KEY_BLOB_PREFIX,
            crate::daemon::cache::NODE_KEY_BLOB_SUFFIX
        );
        let signer = hsm::create(&hsm::KeyRef::Tpm(hsm::TpmKeyRef {
            object: hsm::TpmObject::Blob(dir.join(&name)),
            tcti: Some(self.tcti.clone()),
        }))?;
        // Recorded relative to the state directory and without the TPM's address: the key
        // is reopened in whatever TPM this node attests with, and only its own loads it.
        Ok(crate::daemon::svid::NodeKey::Held {
            signer,
            key_ref: hsm::KeyRef::Tpm(hsm::TpmKeyRef {
                object: hsm::TpmObject::Blob(name.into()),
                tcti: None,
            }),
        })
    }

    fn reopen_node_key(
        &mut self,
        key_ref: hsm::KeyRef,
    ) -> Result<crate::daemon::svid::NodeKey, Error> {
        let hsm::KeyRef::Tpm(hsm::TpmKeyRef { object, .. }) = &key_ref else {
            return Err(Error::Attestation(format!(
                "{key_ref}: a TPM node's key reference names a TPM key"
            )));
        };
        let signer = hsm::open(&hsm::KeyRef::Tpm(hsm::TpmKeyRef {
            object: object.clone(),
            tcti: Some(self.tcti.clone()),
        }))?;
        let relative = match object {
            hsm::TpmObject::Blob(path) => hsm::TpmObject::Blob(
                path.file_name()
                    .map_or_else(|| path.clone(), std::path::PathBuf::from),
            ),
            other => other.clone(),
        };
        Ok(crate::daemon::svid::NodeKey::Held {
            signer,
            key_ref: hsm::KeyRef::Tpm(hsm::TpmKeyRef {
                object: relative,
                tcti: None,
            }),
        })
    }
}

/// The saved cache's key sealed to this node's TPM (see [`crate::daemon::cache::KeyProtector`]).
#[derive(Debug)]
pub struct TpmKeyProtector(hsm::tpm::Sealer);

impl TpmKeyProtector {
    /// Seals with the TPM at `tcti`; nothing is sent to it until the cache is loaded or saved.
    pub fn open(tcti: &str) -> Result<Self, Error> {
        let tcti: hsm::Tcti = tcti.parse()?;
        let options = hsm::TpmOptions {
            deadline: TPM_DEADLINE,
            ..hsm::TpmOptions::default()
        };
        Ok(Self(hsm::tpm::Sealer::open(&tcti, options)?))
    }
}

impl crate::daemon::cache::KeyProtector for TpmKeyProtector {
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, Error> {
        Ok(self.0.seal(secret)?)
    }

    fn unseal(&self, sealed: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        Ok(self.0.unseal(sealed)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::X509PopChallenge;

    #[test]
    fn an_unusable_tcti_is_refused_at_open() {
        assert!(TpmAttestation::open("carrier-pigeon:loft=3").is_err());
    }

    #[test]
    fn a_challenge_for_another_method_is_refused_before_the_tpm_is_asked() {
        // Opening does not connect, so no TPM needs to listen on this port.
        let mut tpm = TpmAttestation::open("swtpm:host=127.0.0.1,port=9").expect("open");
        let x509pop = Challenge {
            method: Some(challenge::Method::X509pop(X509PopChallenge {
                nonce: vec![1],
            })),
        };
        let error = tpm.answer(&x509pop, b"csr").expect_err("refused");
        assert!(matches!(error, Error::Attestation(_)), "{error}");
        let empty = Challenge { method: None };
        assert!(matches!(
            tpm.answer(&empty, b"csr"),
            Err(Error::Attestation(_))
        ));
    }
}
