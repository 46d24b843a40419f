//! PKCS#11 keys (cryptoki): a P-256 key pair generated inside a token, private half
//! sensitive and not extractable, found again by its label.
//!
//! A module is loaded and `C_Initialize`d once per process and path (PKCS#11 allows one
//! initialization per application). Each key holds one logged-in session behind a mutex:
//! a session may not be used from two threads at once, and tokens such as SoftHSM2 sign in
//! well under a millisecond. The PIN comes from the key reference's `pin-file` or from
//! `PLANT_PKCS11_PIN`, lives in memory only while logging in, and is never shown.
//!
//! PKCS#11 login state belongs to the application, not the session: once one key of a token
//! is open in this process, opening another key of that token succeeds without checking the
//! PIN again (`CKR_USER_ALREADY_LOGGED_IN`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::key_ref::{Pkcs11KeyRef, DEFAULT_PKCS11_MODULE};
use crate::{ecdsa, Error, PublicKey, Signer};

/// DER of the namedCurve OID secp256r1 (1.2.840.10045.3.1.7), the CKA_EC_PARAMS of P-256.
const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A P-256 key pair in a PKCS#11 token.
pub struct Pkcs11Key {
    session: Mutex<Session>,
    private_key: ObjectHandle,
    public: PublicKey,
    token: String,
    location: String,
}

impl Pkcs11Key {
    /// Generates a new key pair labelled `key_ref.object` in the token; refuses when an object
    /// with that label exists.
    pub fn create(key_ref: &Pkcs11KeyRef) -> Result<Self, Error> {
        let opened = Opened::login(key_ref, true)?;
        let label = key_ref.object.as_bytes().to_vec();
        let existing = opened
            .session
            .find_objects(&[Attribute::Label(label.clone())])
            .map_err(|e| opened.error("search the token", e))?;
        if !existing.is_empty() {
            return Err(Error::KeyPresent(opened.object_name(&key_ref.object)));
        }
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(id.to_vec()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Decrypt(false),
            Attribute::Label(label),
            Attribute::Id(id.to_vec()),
        ];
        let (public_key, private_key) = opened
            .session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(|e| opened.error("generate a P-256 key pair", e))?;
        let public = opened.public_key(public_key)?;
        Ok(opened.into_key(private_key, public, &key_ref.object))
    }

    /// Opens the key pair labelled `key_ref.object` in the token.
    pub fn open(key_ref: &Pkcs11KeyRef) -> Result<Self, Error> {
        let opened = Opened::login(key_ref, false)?;
        let private_key = opened.find_one(ObjectClass::PRIVATE_KEY, &key_ref.object)?;
        let public_key = opened.find_one(ObjectClass::PUBLIC_KEY, &key_ref.object)?;
        let public = opened.public_key(public_key)?;
        Ok(opened.into_key(private_key, public, &key_ref.object))
    }

    fn error(&self, action: &str, e: CkError) -> Error {
        ck_error(&format!("token '{}'", self.token), action, e)
    }
}

impl Signer for Pkcs11Key {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        // CKM_ECDSA signs a digest; hash in software (CKM_ECDSA_SHA256 is optional in tokens).
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
        let session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let rs = session
            .sign(&Mechanism::Ecdsa, self.private_key, digest.as_ref())
            .map_err(|e| self.error("sign", e))?;
        ecdsa::der_from_concatenated(&rs)
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("location", &self.location)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A logged-in session on the named token, during open or create.
struct Opened {
    session: Session,
    token: String,
    module: PathBuf,
}

impl Opened {
    fn login(key_ref: &Pkcs11KeyRef, read_write: bool) -> Result<Self, Error> {
        let module = module_path(key_ref);
        let pkcs11 = module_context(&module)?;
        let context = format!("token '{}' in {}", key_ref.token, module.display());
        let slot = find_token(&pkcs11, &key_ref.token, &module)?;
        let pin = read_pin(key_ref)?;
        let session = if read_write {
            pkcs11.open_rw_session(slot)
        } else {
            pkcs11.open_ro_session(slot)
        }
        .map_err(|e| ck_error(&context, "open a session", e))?;
        let auth = AuthPin::new(pin.as_str().into());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(rv, _)) => {
                return Err(Error::Login {
                    token: key_ref.token.clone(),
                    reason: match rv {
                        RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange => {
                            "wrong PIN".into()
                        }
                        RvError::PinLocked => {
                            "the user PIN is locked; the token's security officer must reset it"
                                .into()
                        }
                        RvError::UserPinNotInitialized => {
                            "the token has no user PIN yet; initialise it first".into()
                        }
                        other => format!("{other:?}"),
                    },
                })
            }
            Err(other) => {
                return Err(Error::Login {
                    token: key_ref.token.clone(),
                    reason: other.to_string(),
                })
            }
        }
        Ok(Self {
            session,
            token: key_ref.token.clone(),
            module,
        })
    }

    fn object_name(&self, label: &str) -> String {
        format!(
            "PKCS#11 object '{label}' in token '{}' ({})",
            self.token,
            self.module.display()
        )
    }

    fn error(&self, action: &str, e: CkError) -> Error {
        ck_error(&format!("token '{}'", self.token), action, e)
    }

    fn find_one(&self, class: ObjectClass, label: &str) -> Result<ObjectHandle, Error> {
        let found = self
            .session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::KeyType(KeyType::EC),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| self.error("search the token", e))?;
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::KeyNotFound(format!(
                "{} ({} EC key)",
                self.object_name(label),
                if class == ObjectClass::PRIVATE_KEY {
                    "private"
                } else {
                    "public"
                }
            ))),
            _ => Err(Error::Pkcs11 {
                context: format!("token '{}'", self.token),
                reason: format!(
                    "{} EC keys are labelled '{label}'; labels must be unique",
                    found.len()
                ),
            }),
        }
    }

    /// The P-256 point of a public key object (CKA_EC_POINT is a DER OCTET STRING around
    /// the SEC1 point; some tokens return the bare point).
    fn public_key(&self, object: ObjectHandle) -> Result<PublicKey, Error> {
        let attributes = self
            .session
            .get_attributes(object, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(|e| self.error("read the public key", e))?;
        let mut params = None;
        let mut point = None;
        for attribute in attributes {
            match attribute {
                Attribute::EcParams(v) => params = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                _ => {}
            }
        }
        let bad = |reason: &str| Error::Pkcs11 {
            context: format!("token '{}'", self.token),
            reason: reason.to_owned(),
        };
        if params.as_deref() != Some(&P256_EC_PARAMS[..]) {
            return Err(bad("the key is not a P-256 key"));
        }
        let point = point.ok_or_else(|| bad("the public key has no CKA_EC_POINT"))?;
        let raw = match point.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
            other => other,
        };
        PublicKey::from_uncompressed_point(raw)
            .ok_or_else(|| bad("CKA_EC_POINT is not an uncompressed P-256 point"))
    }

    fn into_key(self, private_key: ObjectHandle, public: PublicKey, label: &str) -> Pkcs11Key {
        let location = self.object_name(label);
        Pkcs11Key {
            session: Mutex::new(self.session),
            private_key,
            public,
            token: self.token,
            location,
        }
    }
}

fn module_path(key_ref: &Pkcs11KeyRef) -> PathBuf {
    key_ref
        .module
        .clone()
        .or_else(|| {
            std::env::var_os("PLANT_PKCS11_MODULE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PKCS11_MODULE))
}

/// Loads and initializes each module once per process.
fn module_context(module: &Path) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<Vec<(PathBuf, Pkcs11)>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((_, pkcs11)) = modules.iter().find(|(path, _)| path == module) {
        return Ok(pkcs11.clone());
    }
    let context = format!("module {}", module.display());
    let pkcs11 = Pkcs11::new(module).map_err(|e| Error::Pkcs11 {
        context: context.clone(),
        reason: format!(
            "cannot be loaded ({e}); install it (e.g. apt package softhsm2, see scripts/setup) \
             or set module= / PLANT_PKCS11_MODULE"
        ),
    })?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(ck_error(&context, "initialise", e)),
    }
    modules.push((module.to_owned(), pkcs11.clone()));
    Ok(pkcs11)
}

fn find_token(pkcs11: &Pkcs11, token: &str, module: &Path) -> Result<Slot, Error> {
    let context = format!("module {}", module.display());
    let slots = pkcs11
        .get_slots_with_initialized_token()
        .map_err(|e| ck_error(&context, "list slots", e))?;
    let mut labels = Vec::new();
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(|e| ck_error(&context, "read token info", e))?;
        let label = info.label().trim_end();
        if label == token {
            return Ok(slot);
        }
        labels.push(format!("'{label}'"));
    }
    Err(Error::Pkcs11 {
        context,
        reason: format!(
            "no token labelled '{token}' (tokens: {}); create one with \
             `softhsm2-util --init-token --free --label {token}` or the HSM's tool",
            if labels.is_empty() {
                "none".to_owned()
            } else {
                labels.join(", ")
            }
        ),
    })
}

/// The user PIN from `pin-file` (first line) or `PLANT_PKCS11_PIN`.
fn read_pin(key_ref: &Pkcs11KeyRef) -> Result<Zeroizing<String>, Error> {
    if let Some(path) = &key_ref.pin_file {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?);
        let pin = text.lines().next().unwrap_or_default();
        if pin.is_empty() {
            return Err(Error::PinMissing {
                token: key_ref.token.clone(),
            });
        }
        return Ok(Zeroizing::new(pin.to_owned()));
    }
    match std::env::var("PLANT_PKCS11_PIN") {
        Ok(pin) if !pin.is_empty() => Ok(Zeroizing::new(pin)),
        _ => Err(Error::PinMissing {
            token: key_ref.token.clone(),
        }),
    }
}

/// A PKCS#11 failure: device-level codes read as [`Error::Unavailable`] (retry may help),
/// the rest as [`Error::Pkcs11`].
fn ck_error(context: &str, action: &str, e: CkError) -> Error {
    match e {
        CkError::Pkcs11(
            rv @ (RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid),
            _,
        ) => Error::Unavailable {
            device: format!("PKCS#11 {context}"),
            reason: format!("failed to {action}: {rv:?}"),
        },
        CkError::Pkcs11(rv, function) => Error::Pkcs11 {
            context: context.to_owned(),
            reason: format!("{action} failed: {function}: {rv:?}"),
        },
        other => Error::Pkcs11 {
            context: context.to_owned(),
            reason: format!("{action} failed: {other}"),
        },
    }
}
