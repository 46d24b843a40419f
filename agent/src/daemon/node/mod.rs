//! Node attestation, the agent's side (DESIGN §5 "Node identity"): each method produces the
//! evidence the issuer's attestor checks and answers its challenge. The agent API client
//! (`issuer_client`) drives a [`NodeAttestation`] over the `Attest` stream.
//!
//! The calls may block (a TPM command takes tens of milliseconds on a real chip); the caller
//! runs them on a blocking thread.

#[cfg(feature = "tpm")]
pub mod tpm;

use proto::agent::{Challenge, ChallengeResponse, Evidence};

use crate::Error;

/// One attestation method on the agent's side.
pub trait NodeAttestation: Send + std::fmt::Debug {
    /// The method name, e.g. `tpm`.
    fn method(&self) -> &'static str;

    /// The evidence for a new attestation, with `csr` (DER PKCS#10 of the node SVID key).
    fn evidence(&mut self, csr: &[u8]) -> Result<Evidence, Error>;

    /// The answer to the issuer's challenge for the evidence last produced.
    fn answer(&mut self, challenge: &Challenge, csr: &[u8]) -> Result<ChallengeResponse, Error>;

    /// Whether this method can attest again after a success (false for a join token).
    fn can_reattest(&self) -> bool;

    /// A new key for the node SVID the next attestation asks for. In memory by default; a
    /// TPM node makes it in its TPM.
    fn node_key(&mut self) -> Result<crate::daemon::svid::NodeKey, Error> {
        Ok(crate::daemon::svid::KeyPair::generate()?.into())
    }

    /// Opens a node key this method made earlier (its reference from the state directory),
    /// in this node's hardware. Methods whose keys are files have none to reopen.
    fn reopen_node_key(
        &mut self,
        key_ref: hsm::KeyRef,
    ) -> Result<crate::daemon::svid::NodeKey, Error> {
        Err(Error::Attestation(format!(
            "{key_ref}: a {} node keeps its node key in a file, not in a device",
            self.method()
        )))
    }

    /// Whether the node SVID is renewed by attesting again instead of over mTLS (TPM
    /// nodes: the issuer refuses their mTLS renewal, so a copy of the state directory dies
    /// with the SVID it holds).
    fn renews_by_attesting(&self) -> bool {
        false
    }
}

pub mod join_token;
pub mod x509pop;

pub use join_token::JoinTokenAttestation;
pub use x509pop::X509PopAttestation;

/// What keeps the saved cache's keys on this machine: the TPM a `tpm` node attests with;
/// `None` for other methods (their cache files are owner-only, not sealed).
pub fn cache_key_protector(
    config: &crate::daemon::config::AttestationConfig,
) -> Result<Option<Box<dyn crate::daemon::cache::KeyProtector>>, Error> {
    #[cfg(feature = "tpm")]
    if let crate::daemon::config::AttestationConfig::Tpm { tcti, .. } = config {
        let tcti = match tcti {
            Some(tcti) => tcti.clone(),
            None => hsm::Tcti::from_env()?.to_string(),
        };
        return Ok(Some(Box::new(tpm::TpmKeyProtector::open(&tcti)?)));
    }
    // Without the TPM backend a tpm node does not start at all (`from_config` says why).
    #[cfg(not(feature = "tpm"))]
    let _ = config;
    Ok(None)
}

/// The attestation `config` names. Without `tcti`, the TPM is `PLANT_TPM_TCTI`'s, else the
/// kernel's resource manager (the same default as a `tpm:` key reference).
pub fn from_config(
    config: &crate::daemon::config::AttestationConfig,
    state_dir: &std::path::Path,
) -> Result<Box<dyn NodeAttestation>, Error> {
    use crate::daemon::config::AttestationConfig;
    match config {
        AttestationConfig::JoinToken { token } => {
            Ok(Box::new(JoinTokenAttestation::new(token.clone())))
        }
        AttestationConfig::X509Pop { certificate, key } => Ok(Box::new(X509PopAttestation::open(
            certificate,
            key.open()?,
        )?)),
        #[cfg(feature = "tpm")]
        AttestationConfig::Tpm { tcti, ek } => {
            let tcti = match tcti {
                Some(tcti) => tcti.clone(),
                None => hsm::Tcti::from_env()?.to_string(),
            };
            Ok(Box::new(
                tpm::TpmAttestation::open_with(&tcti, *ek)?.with_node_keys_in(state_dir),
            ))
        }
        // The configuration parses the same in every build; only running it needs the TPM.
        #[cfg(not(feature = "tpm"))]
        AttestationConfig::Tpm { .. } => {
            let _ = state_dir;
            Err(hsm::Error::NO_TPM.into())
        }
    }
}
