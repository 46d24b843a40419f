//! The TPM commands the backend needs, over tss-esapi, and how their failures read.
//!
//! Only the owner thread in [`super`] calls these: a TPM runs one command at a time, and an
//! ESAPI context must not be shared. Each function takes the owner's context and returns
//! ESAPI handles that stay valid for as long as that context lives.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCode;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::Tss2ResponseCodeKind;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

use super::blob::KeyBlob;
use crate::key_ref::{Tcti, TpmObject};
use crate::{ecdsa, Error, PublicKey};

/// Names the TPM in messages: `TPM at swtpm:host=127.0.0.1,port=2321`.
pub(super) fn device_name(tcti: &Tcti) -> String {
    format!("TPM at {tcti}")
}

/// A failure of the TPM stack, classified for messages and for the owner thread's
/// reconnect decision.
pub(super) fn classify(device: &str, action: &str, err: tss_esapi::Error) -> Error {
    let rc = match err {
        tss_esapi::Error::Tss2Error(rc) => rc,
        tss_esapi::Error::WrapperError(kind) => {
            return Error::Tpm {
                device: device.to_owned(),
                action: action.to_owned(),
                reason: format!("tss-esapi: {kind}"),
            }
        }
    };
    let raw = raw_code(rc);
    let layer = raw >> 16;
    if layer != 0 {
        // TCTI (10), SYS (8), ESYS (7), resource manager (11/12): the command did not get a
        // TPM answer. Connection refused, reset, or a broken session all land here.
        return Error::Unavailable {
            device: device.to_owned(),
            reason: format!(
                "cannot be reached ({action}: {} error {raw:#010x}); check that the TPM or \
                 swtpm is running",
                layer_name(layer)
            ),
        };
    }
    let kind = rc.kind();
    let transient = matches!(
        kind,
        Some(
            Tss2ResponseCodeKind::Retry
                | Tss2ResponseCodeKind::Yielded
                | Tss2ResponseCodeKind::Testing
                | Tss2ResponseCodeKind::NvRate
                | Tss2ResponseCodeKind::NvUnavailable
                | Tss2ResponseCodeKind::Canceled
                | Tss2ResponseCodeKind::Lockout
                | Tss2ResponseCodeKind::ObjectMemory
                | Tss2ResponseCodeKind::SessionMemory
                | Tss2ResponseCodeKind::Memory
        )
    );
    if transient {
        return Error::Unavailable {
            device: device.to_owned(),
            reason: format!("is temporarily unable to {action}: {rc} ({raw:#x})"),
        };
    }
    let advice = match kind {
        Some(Tss2ResponseCodeKind::Integrity) => {
            "; the blob was made by another TPM, or this TPM's owner hierarchy was cleared \
             since: a TPM key blob only loads on the TPM that created it"
        }
        Some(Tss2ResponseCodeKind::Initialize) => "; the TPM needs TPM2_Startup",
        _ => "",
    };
    Error::Tpm {
        device: device.to_owned(),
        action: action.to_owned(),
        reason: format!("{rc} ({raw:#x}){advice}"),
    }
}

fn raw_code(rc: Tss2ResponseCode) -> u32 {
    match rc {
        Tss2ResponseCode::Success => 0,
        Tss2ResponseCode::FormatZero(code) => code.0,
        Tss2ResponseCode::FormatOne(code) => code.0,
    }
}

fn layer_name(layer: u32) -> &'static str {
    match layer {
        7 => "ESAPI",
        8 => "SAPI",
        9 => "marshalling",
        10 => "TCTI",
        11 | 12 => "resource manager",
        _ => "TSS",
    }
}

fn is_kind(err: &tss_esapi::Error, kind: Tss2ResponseCodeKind) -> bool {
    matches!(err, tss_esapi::Error::Tss2Error(rc) if raw_code(*rc) >> 16 == 0 && rc.kind() == Some(kind))
}

/// Opens an ESAPI context; authorizes with the (empty) password of the owner hierarchy and
/// of the key by default.
pub(super) fn connect(tcti: &Tcti, device: &str) -> Result<Context, Error> {
    let conf = TctiNameConf::from_str(&tcti.to_string()).map_err(|e| Error::Unavailable {
        device: device.to_owned(),
        reason: format!("has an unusable TCTI configuration: {e}"),
    })?;
    let mut context = Context::new(conf).map_err(|e| classify(device, "open a session", e))?;
    // Listing and flushing take no authorization: no session may be set for them.
    context.execute_without_session(|context| flush_stale_objects(context, device))?;
    context.set_sessions((Some(AuthSession::Password), None, None));
    Ok(context)
}

/// Flushes transient objects a previous connection left loaded. Without a resource manager
/// (swtpm's socket, `/dev/tpm0`) a TPM keeps a killed process's objects until it resets, and
/// its three or so object slots are full after a couple of crashes ("out of memory for
/// object contexts"), so a restarted issuer could not load its key. Nobody else can be using
/// them: such a TPM serves one connection at a time, and behind a resource manager
/// (`/dev/tpmrm0`, tabrmd) a new connection sees no transient objects but its own.
fn flush_stale_objects(context: &mut Context, device: &str) -> Result<(), Error> {
    use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    let (data, _) = context
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        .map_err(|e| classify(device, "list loaded objects", e))?;
    let CapabilityData::Handles(handles) = data else {
        return Ok(());
    };
    for handle in handles.iter() {
        if let TpmHandle::Transient(_) = handle {
            let object = context
                .tr_from_tpm_public(*handle)
                .map_err(|e| classify(device, "flush a stale object", e))?;
            context
                .flush_context(object)
                .map_err(|e| classify(device, "flush a stale object", e))?;
        }
    }
    Ok(())
}

/// The storage primary of the owner hierarchy, from the TCG provisioning guidance's ECC
/// P-256 SRK template (restricted decryption key, AES-128-CFB, empty unique): the same
/// template re-derives the same key for as long as the owner seed lives.
pub(super) fn storage_primary(context: &mut Context, device: &str) -> Result<KeyHandle, Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| classify(device, "build the storage key template", e))?;
    let template = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| classify(device, "build the storage key template", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| classify(device, "build the storage key template", e))?;
    context
        .create_primary(Hierarchy::Owner, template, None, None, None, None)
        .map(|primary| primary.key_handle)
        .map_err(|e| classify(device, "derive the owner storage key", e))
}

/// The signing key's template: P-256 ECDSA/SHA-256, fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth, sign; not decrypt, not restricted.
fn signing_key_template() -> tss_esapi::Result<Public> {
    tss_esapi::utils::create_unrestricted_signing_ecc_public(
        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
        EccCurve::NistP256,
    )
}

fn persistent_handle(handle: u32, device: &str) -> Result<PersistentTpmHandle, Error> {
    PersistentTpmHandle::new(handle).map_err(|e| classify(device, "use the persistent handle", e))
}

fn handle_name(handle: u32, device: &str) -> String {
    format!("persistent handle {handle:#010x} of the {device}")
}

/// Looks the persistent handle up; `Ok(None)` when it is empty.
fn find_persistent(
    context: &mut Context,
    handle: u32,
    device: &str,
) -> Result<Option<ObjectHandle>, Error> {
    let tpm_handle = TpmHandle::Persistent(persistent_handle(handle, device)?);
    match context.execute_without_session(|ctx| ctx.tr_from_tpm_public(tpm_handle)) {
        Ok(object) => Ok(Some(object)),
        Err(e) if is_kind(&e, Tss2ResponseCodeKind::Handle) => Ok(None),
        Err(e) => Err(classify(
            device,
            &format!("look up {}", handle_name(handle, device)),
            e,
        )),
    }
}

/// The public key of a loaded object, refusing anything but an unrestricted P-256 signing
/// key that cannot leave the TPM.
fn signing_public_key(
    context: &mut Context,
    key: KeyHandle,
    device: &str,
) -> Result<PublicKey, Error> {
    let (public, _, _) = context
        .execute_without_session(|ctx| ctx.read_public(key))
        .map_err(|e| classify(device, "read the key's public area", e))?;
    public_key_of(&public).ok_or_else(|| Error::Tpm {
        device: device.to_owned(),
        action: "use the key".into(),
        reason: "the object is not a non-duplicable, unrestricted P-256 signing key".into(),
    })
}

/// The P-256 point of an unrestricted, non-duplicable ECC signing key's public area.
pub(super) fn public_key_of(public: &Public) -> Option<PublicKey> {
    let Public::Ecc {
        object_attributes,
        parameters,
        unique,
        ..
    } = public
    else {
        return None;
    };
    let usable = object_attributes.sign_encrypt()
        && !object_attributes.restricted()
        && object_attributes.fixed_tpm()
        && object_attributes.fixed_parent()
        && parameters.ecc_curve() == EccCurve::NistP256;
    if !usable {
        return None;
    }
    let (x, y) = (unique.x().value(), unique.y().value());
    if x.len() > 32 || y.len() > 32 {
        return None;
    }
    let mut point = vec![0x04];
    point.extend(std::iter::repeat_n(0, 32 - x.len()));
    point.extend_from_slice(x);
    point.extend(std::iter::repeat_n(0, 32 - y.len()));
    point.extend_from_slice(y);
    PublicKey::from_uncompressed_point(&point)
}

pub(super) fn flush(context: &mut Context, handle: KeyHandle) {
    // Best effort: a transient object left behind is flushed when the context drops.
    let _ = context.flush_context(handle.into());
}

/// Creates the key where `object` says and returns it loaded.
pub(super) fn create(
    context: &mut Context,
    object: &TpmObject,
    device: &str,
) -> Result<(KeyHandle, PublicKey), Error> {
    match object {
        TpmObject::Persistent(handle) => {
            if let Some(mut existing) = find_persistent(context, *handle, device)? {
                let _ = context.tr_close(&mut existing);
                return Err(Error::KeyPresent(handle_name(*handle, device)));
            }
            let loaded = create_and_load(context, device)?.0;
            let persistent = context
                .evict_control(
                    Provision::Owner,
                    loaded.into(),
                    Persistent::Persistent(persistent_handle(*handle, device)?),
                )
                .map_err(|e| {
                    if is_kind(&e, Tss2ResponseCodeKind::NvDefined) {
                        Error::KeyPresent(handle_name(*handle, device))
                    } else {
                        classify(
                            device,
                            &format!("persist the key at {}", handle_name(*handle, device)),
                            e,
                        )
                    }
                });
            flush(context, loaded);
            let key = KeyHandle::from(persistent?);
            let public = signing_public_key(context, key, device)?;
            Ok((key, public))
        }
        TpmObject::Blob(path) => {
            // Claim the file first, so an existing key is never overwritten and no TPM work
            // is wasted on a path that cannot be written.
            let mut file = crate::key_file::create(path)?;
            let result = (|| {
                let (key, private, public) = create_and_load(context, device)?;
                let pem = KeyBlob {
                    public: public
                        .marshall()
                        .map_err(|e| classify(device, "encode the key", e))?,
                    private: private.value().to_vec(),
                }
                .to_pem()
                .map_err(|reason| Error::BadKeyBlob {
                    path: path.clone(),
                    reason,
                })?;
                let io = |source| Error::Io {
                    path: path.clone(),
                    source,
                };
                file.write_all(pem.as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                let public = signing_public_key(context, key, device)?;
                Ok((key, public))
            })();
            match result {
                Ok(loaded) => Ok(loaded),
                Err(e) => {
                    drop(file);
                    let _ = fs::remove_file(path);
                    Err(e)
                }
            }
        }
    }
}

/// TPM2_Create of a new signing key under the storage primary, then TPM2_Load; the
/// primary is flushed again to keep the TPM's few object slots free.
fn create_and_load(
    context: &mut Context,
    device: &str,
) -> Result<(KeyHandle, Private, Public), Error> {
    let template = signing_key_template()
        .map_err(|e| classify(device, "build the signing key template", e))?;
    let primary = storage_primary(context, device)?;
    let result = context
        .create(primary, template, None, None, None, None)
        .map_err(|e| classify(device, "create the signing key", e))
        .and_then(|created| {
            let (private, public) = (created.out_private, created.out_public);
            context
                .load(primary, private.clone(), public.clone())
                .map(|key| (key, private, public))
                .map_err(|e| classify(device, "load the new key", e))
        });
    flush(context, primary);
    result
}

/// Opens the existing key where `object` says and returns it loaded.
pub(super) fn open(
    context: &mut Context,
    object: &TpmObject,
    device: &str,
) -> Result<(KeyHandle, PublicKey), Error> {
    let key = match object {
        TpmObject::Persistent(handle) => find_persistent(context, *handle, device)?
            .map(KeyHandle::from)
            .ok_or_else(|| Error::KeyNotFound(handle_name(*handle, device)))?,
        TpmObject::Blob(path) => {
            let (public, private) = read_blob(path)?;
            let primary = storage_primary(context, device)?;
            let loaded = context
                .load(primary, private, public)
                .map_err(|e| classify(device, &format!("load the key blob {}", path.display()), e));
            flush(context, primary);
            loaded?
        }
    };
    match signing_public_key(context, key, device) {
        Ok(public) => Ok((key, public)),
        Err(e) => {
            release(context, object, key);
            Err(e)
        }
    }
}

fn read_blob(path: &Path) -> Result<(Public, Private), Error> {
    let pem = fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::KeyNotFound(format!("TPM key blob {}", path.display()))
        } else {
            Error::Io {
                path: path.to_owned(),
                source: e,
            }
        }
    })?;
    let bad = |reason: String| Error::BadKeyBlob {
        path: path.to_owned(),
        reason,
    };
    let blob = KeyBlob::from_pem(&pem).map_err(bad)?;
    let public = Public::unmarshall(&blob.public)
        .map_err(|e| bad(format!("public area does not decode: {e}")))?;
    let private = Private::try_from(blob.private).map_err(|e| bad(format!("private area: {e}")))?;
    Ok((public, private))
}

/// TPM2_Sign of a SHA-256 digest with ECDSA; the signature as DER ECDSA-Sig-Value.
pub(super) fn sign(
    context: &mut Context,
    key: KeyHandle,
    digest: &[u8; 32],
    device: &str,
) -> Result<Vec<u8>, Error> {
    let digest = Digest::try_from(digest.to_vec()).map_err(|e| classify(device, "sign", e))?;
    // An unrestricted key may sign any digest: the null hashcheck ticket is enough.
    let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .map_err(|e| classify(device, "sign", e))?;
    let scheme = SignatureScheme::EcDsa {
        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
    };
    let signature = context
        .sign(key, digest, scheme, ticket)
        .map_err(|e| classify(device, "sign", e))?;
    let Signature::EcDsa(sig) = signature else {
        return Err(Error::Sign("the TPM returned a non-ECDSA signature".into()));
    };
    ecdsa::der_from_scalars(sig.signature_r().value(), sig.signature_s().value())
}

/// Releases a key's ESAPI handle: flushes a loaded blob key, closes a persistent one (which
/// stays in the TPM).
pub(super) fn release(context: &mut Context, object: &TpmObject, key: KeyHandle) {
    match object {
        TpmObject::Persistent(_) => {
            let mut handle = ObjectHandle::from(key);
            let _ = context.tr_close(&mut handle);
        }
        TpmObject::Blob(_) => flush(context, key),
    }
}
