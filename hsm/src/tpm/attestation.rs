//! The TPM's half of credential activation (TPM 2.0 Part 1 §24, TCG EK Credential Profile):
//! the endorsement key (EK) and its certificate say which TPM this is; an attestation key
//! (AK) created under the EK is what the verifier's credential is bound to; and
//! `TPM2_ActivateCredential` recovers the verifier's secret only on the TPM that holds both.
//!
//! Nothing stays loaded between calls: each one derives the EK again from the endorsement
//! seed (the TCG default template re-derives the same key, the one the certificate names),
//! loads the AK from the blob kept in memory, and flushes both before it returns. The
//! commands run on the TPM's owner thread, so they share the connection with the process's
//! [`super::TpmKey`]s: swtpm and a TPM without a resource manager serve one connection.

use std::sync::Arc;
use std::time::Duration;

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{EncryptedSecret, IdObject, Private, Public, SymmetricDefinition};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;
use zeroize::Zeroizing;

use super::device::{classify, flush};
use super::{Tpm, TpmOptions};
use crate::key_ref::{EndorsementKind, Tcti};
use crate::Error;

/// How the evidence names an EK in messages.
fn ek_name(selection: AsymmetricAlgorithmSelection) -> &'static str {
    match selection {
        AsymmetricAlgorithmSelection::Rsa(_) => "RSA 2048 EK certificate (NV index 0x01c00002)",
        AsymmetricAlgorithmSelection::Ecc(_) => "ECC P-256 EK certificate (NV index 0x01c0000a)",
    }
}

/// What a verifier needs to send this TPM a credential.
#[derive(Clone, PartialEq, Eq)]
pub struct EndorsementEvidence {
    /// The EK certificate (DER) from NV: RSA 2048 at 0x01c00002 or ECC P-256 at 0x01c0000a.
    pub ek_certificate: Vec<u8>,
    /// The EK's TPM2B_PUBLIC, marshalled.
    pub ek_public: Vec<u8>,
    /// The AK's TPM2B_PUBLIC, marshalled: a restricted P-256 ECDSA signing key with
    /// fixedTPM, fixedParent, sensitiveDataOrigin and userWithAuth, nameAlg SHA-256.
    pub ak_public: Vec<u8>,
}

impl std::fmt::Debug for EndorsementEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndorsementEvidence")
            .field(
                "ek_certificate",
                &format_args!("{} bytes", self.ek_certificate.len()),
            )
            .field("ek_public", &format_args!("{} bytes", self.ek_public.len()))
            .field("ak_public", &format_args!("{} bytes", self.ak_public.len()))
            .finish()
    }
}

/// Credential activation with one TPM: [`CredentialActivation::evidence`] makes a new AK,
/// [`CredentialActivation::activate`] answers a credential made for it.
pub struct CredentialActivation {
    tpm: Arc<Tpm>,
    deadline: Duration,
    kind: EndorsementKind,
    /// The EK of the last evidence: activation derives the same one again.
    ek: Option<AsymmetricAlgorithmSelection>,
    /// The AK of the last evidence: its public area and its private area wrapped by the EK
    /// (only this TPM can load it).
    ak: Option<(Public, Private)>,
}

/// The TCG EK Credential Profile's low-range RSA 2048 EK (template L-1): the one whose
/// certificate sits at 0x01c00002 on nearly every TPM, and that `swtpm_setup
/// --create-ek-cert` certifies.
const RSA_EK: AsymmetricAlgorithmSelection = AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);
/// The low-range ECC NIST P-256 EK (template L-2), certificate at 0x01c0000a: many recent
/// TPMs carry it beside the RSA one, some only it.
const ECC_EK: AsymmetricAlgorithmSelection = AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256);

impl CredentialActivation {
    /// Reaches the TPM at `tcti`, sharing its owner thread with any key of it this process
    /// has open. `options.deadline` bounds each call: deriving an RSA EK takes a while on a
    /// slow chip, so give it seconds.
    pub fn open(tcti: &Tcti, options: TpmOptions) -> Result<Self, Error> {
        Self::open_with(tcti, options, EndorsementKind::Auto)
    }

    /// As [`CredentialActivation::open`], attesting with the EK `kind` names.
    pub fn open_with(
        tcti: &Tcti,
        options: TpmOptions,
        kind: EndorsementKind,
    ) -> Result<Self, Error> {
        Ok(Self {
            tpm: Tpm::shared(tcti, options)?,
            deadline: options.deadline,
            kind,
            ek: None,
            ak: None,
        })
    }

    /// The TPM this talks to, e.g. `TPM at swtpm:host=127.0.0.1,port=2321`.
    pub fn device(&self) -> &str {
        &self.tpm.name
    }

    /// Reads the EK certificate, derives the EK and creates a fresh AK under it. The AK
    /// replaces the previous one: only the last evidence can be answered.
    pub fn evidence(&mut self) -> Result<EndorsementEvidence, Error> {
        let kind = self.kind;
        let (evidence, ak, selection) =
            self.tpm.session(self.deadline, move |context, device| {
                let read = |context: &mut Context, selection| {
                    context.execute_without_session(|ctx| ek::retrieve_ek_pubcert(ctx, selection))
                };
                let (selection, ek_certificate) = match kind {
                    EndorsementKind::Rsa => (RSA_EK, read(context, RSA_EK)),
                    EndorsementKind::Ecc => (ECC_EK, read(context, ECC_EK)),
                    EndorsementKind::Auto => match read(context, RSA_EK) {
                        Ok(certificate) => (RSA_EK, Ok(certificate)),
                        Err(_) => (ECC_EK, read(context, ECC_EK)),
                    },
                };
                let ek_certificate = ek_certificate.map_err(|e| {
                    let mut error = classify(device, "read the EK certificate", e);
                    if let Error::Tpm { reason, .. } = &mut error {
                        let wanted = match kind {
                            EndorsementKind::Auto => {
                                format!("{} nor an {}", ek_name(RSA_EK), ek_name(ECC_EK))
                            }
                            _ => ek_name(selection).to_owned(),
                        };
                        reason.push_str(&format!(
                            "; the TPM has no {wanted} (provision one, e.g. swtpm_setup \
                         --create-ek-cert)"
                        ));
                    }
                    error
                })?;
                // Some TPMs pad the NV index after the certificate; send the certificate alone.
                let length = der_length(&ek_certificate).unwrap_or(ek_certificate.len());
                let ek_certificate = ek_certificate[..length].to_vec();
                let ek = endorsement_key(context, device, selection)?;
                let result = (|| {
                    let (ek_public, _, _) = context
                        .execute_without_session(|ctx| ctx.read_public(ek))
                        .map_err(|e| classify(device, "read the EK's public area", e))?;
                    let created = context
                        .execute_without_session(|ctx| {
                            ak::create_ak_2(
                                ctx,
                                ek,
                                HashingAlgorithm::Sha256,
                                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                                SignatureSchemeAlgorithm::EcDsa,
                                None,
                                None,
                            )
                        })
                        .map_err(|e| {
                            classify(device, "create an attestation key under the EK", e)
                        })?;
                    let evidence = EndorsementEvidence {
                        ek_certificate,
                        ek_public: public_area(&ek_public, device)?,
                        ak_public: public_area(&created.out_public, device)?,
                    };
                    Ok((
                        evidence,
                        (created.out_public, created.out_private),
                        selection,
                    ))
                })();
                flush(context, ek);
                result
            })?;
        self.ak = Some(ak);
        self.ek = Some(selection);
        Ok(evidence)
    }

    /// `TPM2_ActivateCredential` for the AK of the last evidence: the secret the verifier
    /// sealed in `credential_blob` (TPM2B_ID_OBJECT) and `encrypted_secret`
    /// (TPM2B_ENCRYPTED_SECRET), both marshalled with their size prefix. The TPM refuses
    /// (an integrity failure) a credential not made for this EK and this AK.
    pub fn activate(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let device = self.tpm.name.clone();
        let bad = |what: &str, reason: &str| Error::Tpm {
            device: device.clone(),
            action: "activate the credential".into(),
            reason: format!("the {what} from the verifier is unusable: {reason}"),
        };
        let credential = IdObject::try_from(sized(credential_blob).ok_or_else(|| {
            bad(
                "credential blob",
                "not a TPM2B_ID_OBJECT (size prefix mismatch)",
            )
        })?)
        .map_err(|e| bad("credential blob", &e.to_string()))?;
        let secret = EncryptedSecret::try_from(sized(encrypted_secret).ok_or_else(|| {
            bad(
                "encrypted secret",
                "not a TPM2B_ENCRYPTED_SECRET (size prefix mismatch)",
            )
        })?)
        .map_err(|e| bad("encrypted secret", &e.to_string()))?;
        let (Some((ak_public, ak_private)), Some(selection)) = (self.ak.clone(), self.ek) else {
            return Err(Error::Tpm {
                device: device.clone(),
                action: "activate the credential".into(),
                reason: "no attestation key: produce the evidence first".into(),
            });
        };
        self.tpm.session(self.deadline, move |context, device| {
            let ek = endorsement_key(context, device, selection)?;
            let result = (|| {
                let ak = context
                    .execute_without_session(|ctx| {
                        ak::load_ak(ctx, ek, None, ak_private, ak_public)
                    })
                    .map_err(|e| classify(device, "load the attestation key", e))?;
                let activated = activate(context, ak, ek, credential, secret, device);
                flush(context, ak);
                activated
            })();
            flush(context, ek);
            result
        })
    }
}

impl std::fmt::Debug for CredentialActivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialActivation")
            .field("device", &self.tpm.name)
            .field("deadline", &self.deadline)
            .field("kind", &self.kind)
            .field("has_ak", &self.ak.is_some())
            .finish()
    }
}

/// Derives the EK from its default template; the caller flushes it.
fn endorsement_key(
    context: &mut Context,
    device: &str,
    selection: AsymmetricAlgorithmSelection,
) -> Result<KeyHandle, Error> {
    context
        .execute_without_session(|ctx| ek::create_ek_object_2(ctx, selection, None))
        .map_err(|e| classify(device, "derive the endorsement key", e))
}

/// ActivateCredential: the AK authorizes with its (empty) password, the EK with its policy
/// (PolicySecret of the endorsement hierarchy, TCG EK Credential Profile policy A).
fn activate(
    context: &mut Context,
    ak: KeyHandle,
    ek: KeyHandle,
    credential: IdObject,
    secret: EncryptedSecret,
    device: &str,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let policy = context
        .execute_without_session(|ctx| {
            ctx.start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
        })
        .map_err(|e| classify(device, "start the EK policy session", e))?
        .ok_or_else(|| Error::Tpm {
            device: device.to_owned(),
            action: "start the EK policy session".into(),
            reason: "the TPM returned no session".into(),
        })?;
    let result = (|| {
        let (attributes, mask) = SessionAttributesBuilder::new().build();
        context
            .tr_sess_set_attributes(policy, attributes, mask)
            .map_err(|e| classify(device, "set up the EK policy session", e))?;
        let policy_session = PolicySession::try_from(policy)
            .map_err(|e| classify(device, "set up the EK policy session", e))?;
        context
            .execute_with_sessions((Some(AuthSession::Password), None, None), |ctx| {
                ctx.policy_secret(
                    policy_session,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(|e| classify(device, "satisfy the EK policy", e))?;
        context
            .execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |ctx| {
                ctx.activate_credential(ak, ek, credential, secret)
            })
            .map(|digest| Zeroizing::new(digest.value().to_vec()))
            .map_err(|e| classify(device, "activate the credential", e))
    })();
    // The session ends with the command that used it unless continueSession was set;
    // flushing a session that is already gone fails harmlessly.
    let _ = context.flush_context(SessionHandle::from(policy).into());
    result
}

/// A public area as a marshalled TPM2B_PUBLIC: its size, then the TPMT_PUBLIC.
fn public_area(public: &Public, device: &str) -> Result<Vec<u8>, Error> {
    let area = public
        .marshall()
        .map_err(|e| classify(device, "marshal a public area", e))?;
    let size = u16::try_from(area.len()).map_err(|_| Error::Tpm {
        device: device.to_owned(),
        action: "marshal a public area".into(),
        reason: "longer than a TPM2B allows".into(),
    })?;
    let mut out = Vec::with_capacity(area.len() + 2);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&area);
    Ok(out)
}

/// The contents of a TPM2B (a big-endian 16-bit size, then that many bytes, nothing after).
fn sized(bytes: &[u8]) -> Option<Vec<u8>> {
    let (size, rest) = bytes.split_first_chunk::<2>()?;
    (usize::from(u16::from_be_bytes(*size)) == rest.len()).then(|| rest.to_vec())
}

/// The length of the DER TLV at the start of `bytes` (definite lengths up to 3 bytes),
/// if it fits.
fn der_length(bytes: &[u8]) -> Option<usize> {
    let (&first, rest) = bytes.get(1..).and_then(|rest| rest.split_first())?;
    let (header, length) = match first {
        0..=0x7f => (2, usize::from(first)),
        0x81..=0x83 => {
            let count = usize::from(first & 0x7f);
            let digits = rest.get(..count)?;
            let length = digits
                .iter()
                .fold(0usize, |acc, byte| (acc << 8) | usize::from(*byte));
            (2 + count, length)
        }
        _ => return None,
    };
    let total = header + length;
    (total <= bytes.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::{der_length, sized};

    #[test]
    fn padding_after_a_der_certificate_is_measured_off() {
        assert_eq!(der_length(&[0x30, 0x02, 1, 2, 0, 0, 0]), Some(4));
        assert_eq!(der_length(&[0x30, 0x82, 0x00, 0x01, 9, 0xff]), Some(5));
        assert_eq!(der_length(&[0x30, 0x82, 0x01, 0x00, 9]), None);
        assert_eq!(der_length(&[0x30, 0x80, 0, 0]), None);
        assert_eq!(der_length(&[0x30]), None);
        assert_eq!(der_length(&[]), None);
    }

    #[test]
    fn tpm2b_contents_need_an_exact_size_prefix() {
        assert_eq!(sized(&[0, 2, 7, 8]), Some(vec![7, 8]));
        assert_eq!(sized(&[0, 0]), Some(vec![]));
        assert_eq!(sized(&[0, 3, 7, 8]), None);
        assert_eq!(sized(&[0, 1, 7, 8]), None);
        assert_eq!(sized(&[0]), None);
    }
}
