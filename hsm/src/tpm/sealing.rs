//! Secrets sealed to one TPM (TPM 2.0 Part 1 §25.3 "sealed data objects"): a keyed-hash
//! object holding the secret, created under the owner storage primary with fixedTPM and
//! fixedParent, so its blob (public and wrapped private area) opens only in the TPM that
//! made it, and only with that TPM's owner seed. A copy of the blob on another machine, or
//! after the TPM was cleared, does not unseal.
//!
//! The agent seals one key this way and encrypts what it saves with it: one TPM command at
//! start and one per new key, not one per secret.

use std::sync::Arc;
use std::time::Duration;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::structures::{
    Digest, KeyedHashScheme, Private, Public, PublicBuilder, PublicKeyedHashParameters,
    SensitiveData,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use super::device::{classify, flush, storage_primary};
use super::{Tpm, TpmOptions};
use crate::key_ref::Tcti;
use crate::Error;

/// Seals and unseals secrets with one TPM.
pub struct Sealer {
    tpm: Arc<Tpm>,
    deadline: Duration,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("device", &self.tpm.name)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Reaches the TPM at `tcti`, sharing its owner thread with this process's other uses.
    pub fn open(tcti: &Tcti, options: TpmOptions) -> Result<Self, Error> {
        Ok(Self {
            tpm: Tpm::shared(tcti, options)?,
            deadline: options.deadline,
        })
    }

    /// Seals `secret` (at most 128 bytes) to this TPM: the blob, TPM2B_PUBLIC then
    /// TPM2B_PRIVATE, each with its size.
    pub fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, Error> {
        let secret = Zeroizing::new(secret.to_vec());
        self.tpm.session(self.deadline, move |context, device| {
            let sensitive = SensitiveData::try_from(secret.to_vec())
                .map_err(|e| classify(device, "take the secret to seal", e))?;
            let template =
                sealed_template().map_err(|e| classify(device, "build the template", e))?;
            let primary = storage_primary(context, device)?;
            let created = context
                .create(primary, template, None, Some(sensitive), None, None)
                .map_err(|e| classify(device, "seal the secret", e));
            flush(context, primary);
            let created = created?;
            let public = created
                .out_public
                .marshall()
                .map_err(|e| classify(device, "marshal the sealed object", e))?;
            let private = created.out_private.value().to_vec();
            let mut blob = Vec::with_capacity(public.len() + private.len() + 4);
            for part in [&public, &private] {
                let size = u16::try_from(part.len()).map_err(|_| Error::Tpm {
                    device: device.to_owned(),
                    action: "seal the secret".into(),
                    reason: "the sealed object is larger than a TPM2B".into(),
                })?;
                blob.extend_from_slice(&size.to_be_bytes());
                blob.extend_from_slice(part);
            }
            Ok(blob)
        })
    }

    /// The secret in `blob`, if this TPM sealed it; a TPM error otherwise (an integrity
    /// failure for another TPM's blob).
    pub fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let device = self.tpm.name.clone();
        let bad = |reason: &str| Error::Tpm {
            device: device.clone(),
            action: "unseal".into(),
            reason: format!("not a sealed blob: {reason}"),
        };
        let (public, rest) = split_sized(blob).ok_or_else(|| bad("truncated public area"))?;
        let (private, rest) = split_sized(rest).ok_or_else(|| bad("truncated private area"))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let public = Public::unmarshall(public).map_err(|_| bad("public area does not decode"))?;
        let private =
            Private::try_from(private.to_vec()).map_err(|_| bad("private area too long"))?;
        self.tpm.session(self.deadline, move |context, device| {
            let primary = storage_primary(context, device)?;
            let loaded = context
                .load(primary, private, public)
                .map_err(|e| classify(device, "load the sealed object", e));
            flush(context, primary);
            let object = loaded?;
            let unsealed = context
                .unseal(object.into())
                .map(|data| Zeroizing::new(data.value().to_vec()))
                .map_err(|e| classify(device, "unseal", e));
            flush(context, object);
            unsealed
        })
    }
}

/// A sealed data object: keyed-hash, no scheme, fixedTPM, fixedParent, userWithAuth (empty
/// auth: the protection is that only this TPM loads it), not sign, not decrypt.
fn sealed_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// The contents of a TPM2B at the start of `bytes`, and what follows it.
fn split_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (size, rest) = bytes.split_first_chunk::<2>()?;
    let size = usize::from(u16::from_be_bytes(*size));
    (rest.len() >= size).then(|| rest.split_at(size))
}
