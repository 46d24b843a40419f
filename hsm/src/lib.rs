//! Key custody for Plant PKI.
//!
//! Every private key the issuer or an agent uses is reached through one small trait,
//! [`Signer`], and addressed by a [`KeyRef`] string. The CA code never sees key bytes, so a
//! TPM 2.0 or PKCS#11 key signs exactly like a software one (DESIGN §3 "Key custody").
//!
//! # Backends and key references
//!
//! | key reference | backend | where the private key is |
//! |---|---|---|
//! | `soft:path=/var/lib/plant/ca.key` | [`SoftKey`] | a PKCS#8 PEM file, mode 0600 |
//! | `tpm:handle=0x81010001[;tcti=…]` | [`TpmKey`] | a TPM persistent object |
//! | `tpm:blob=/var/lib/plant/issuing.tpmkey[;tcti=…]` | [`TpmKey`] | a TPM; the file holds only its encrypted blob |
//! | `pkcs11:[module=/usr/lib/…/lib.so;]token=plant;object=issuing-ca[;pin-file=/etc/plant/pin]` | [`Pkcs11Key`] | a PKCS#11 token |
//!
//! The full grammar is in [`key_ref`]. `tcti` is `device:/dev/tpmrm0`,
//! `swtpm:host=127.0.0.1,port=2321` or `tabrmd`; without it `PLANT_TPM_TCTI` applies, else
//! `device:/dev/tpmrm0`. Without `module`, `PLANT_PKCS11_MODULE` applies, else
//! [`DEFAULT_PKCS11_MODULE`]. PINs come from `pin-file` or `PLANT_PKCS11_PIN`, never from a
//! key reference or a command line, and never appear in `Debug`, `Display` or errors.
//!
//! TPM and PKCS#11 keys are P-256, generated inside the device and not exportable: TPM keys
//! carry fixedTPM, fixedParent and sensitiveDataOrigin; PKCS#11 private keys are
//! CKA_SENSITIVE and not CKA_EXTRACTABLE. A TPM blob file is a `TSS2 PRIVATE KEY` PEM
//! ([`tpm::KeyBlob`]) whose private part only the TPM that made it can load.
//!
//! [`tpm::CredentialActivation`] is the TPM's half of node attestation (EK certificate, an
//! attestation key, TPM2_ActivateCredential); it runs on the same owner thread as the keys.
//!
//! Each TPM is served by one owner thread per process, with a bounded queue and per-key
//! deadlines ([`TpmOptions`]): overload answers [`Error::Busy`], a silent or unreachable TPM
//! [`Error::Unavailable`], both at once or within the deadline, and keys reconnect by
//! themselves when the TPM comes back. libtss2 also logs its failures to stderr; set
//! `TSS2_LOG=all+NONE` to silence it (the returned errors carry the same facts).

pub mod key_ref;

#[cfg(any(feature = "tpm", feature = "pkcs11"))]
mod ecdsa;
mod error;
mod key_file;
#[cfg(feature = "pkcs11")]
mod pkcs11;
mod public_key;
mod soft;
#[cfg(feature = "tpm")]
pub mod tpm;

pub use error::Error;
pub use key_ref::{
    EndorsementKind, KeyRef, Pkcs11KeyRef, Tcti, TpmKeyRef, TpmObject, DEFAULT_PKCS11_MODULE,
};
#[cfg(feature = "pkcs11")]
pub use pkcs11::Pkcs11Key;
pub use public_key::PublicKey;
pub use soft::SoftKey;
#[cfg(feature = "tpm")]
pub use tpm::TpmKey;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Something that holds a P-256 private key and signs with it.
///
/// Object-safe and synchronous: a software key signs in microseconds; hardware backends run
/// their own owner task and block the caller only up to their deadline.
pub trait Signer: Send + Sync + fmt::Debug {
    /// The public half, as SubjectPublicKeyInfo and as the raw EC point.
    fn public_key(&self) -> &PublicKey;

    /// ECDSA P-256 with SHA-256 over `message`; the signature is DER `ECDSA-Sig-Value`
    /// (RFC 3279 §2.2.3), as X.509 and PKCS#10 carry it.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error>;

    /// Where the key lives, for operators (`issuer status`); never key material.
    fn location(&self) -> String;

    /// How many signatures wait for the device now, for devices that queue them (a TPM runs
    /// one command at a time); `None` for keys that sign on the caller's thread.
    fn queue(&self) -> Option<Queue> {
        None
    }

    /// Whether a signature takes microseconds (a key in this process's memory), so callers
    /// may sign on an async worker instead of handing the work to a blocking thread. A
    /// device (TPM, HSM) may take tens of milliseconds, or hang.
    fn in_memory(&self) -> bool {
        false
    }
}

/// A device queue's fill, for operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queue {
    /// Requests waiting now (the one being signed is not counted).
    pub waiting: usize,
    /// Requests that may wait at once; more are refused with [`Error::Busy`].
    pub capacity: usize,
}

/// How a TPM key queues and waits (the options exist without the `tpm` feature, so
/// configuration parses the same in every build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpmOptions {
    /// The longest a caller waits for a signature (and for opening or creating the key).
    pub deadline: Duration,
    /// Requests that may wait for the TPM at once; more are refused with [`Error::Busy`].
    /// Shared by all keys of one TPM and fixed by the first one opened.
    pub queue_capacity: usize,
}

impl Default for TpmOptions {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(5),
            queue_capacity: 32,
        }
    }
}

/// Creates a new key at `key_ref` and returns its signer. Fails if a key already exists there
/// (file, TPM persistent handle, PKCS#11 label), so `init` can never overwrite a CA key.
pub fn create(key_ref: &KeyRef) -> Result<Arc<dyn Signer>, Error> {
    match key_ref {
        KeyRef::Soft { path } => Ok(Arc::new(SoftKey::create(path)?)),
        #[cfg(feature = "tpm")]
        KeyRef::Tpm(tpm) => Ok(Arc::new(TpmKey::create(tpm)?)),
        #[cfg(feature = "pkcs11")]
        KeyRef::Pkcs11(p11) => Ok(Arc::new(Pkcs11Key::create(p11)?)),
        #[cfg(not(all(feature = "tpm", feature = "pkcs11")))]
        other => Err(Error::not_built_in(other)),
    }
}

/// Opens the existing key at `key_ref`.
pub fn open(key_ref: &KeyRef) -> Result<Arc<dyn Signer>, Error> {
    match key_ref {
        KeyRef::Soft { path } => Ok(Arc::new(SoftKey::open(path)?)),
        #[cfg(feature = "tpm")]
        KeyRef::Tpm(tpm) => Ok(Arc::new(TpmKey::open(tpm)?)),
        #[cfg(feature = "pkcs11")]
        KeyRef::Pkcs11(p11) => Ok(Arc::new(Pkcs11Key::open(p11)?)),
        #[cfg(not(all(feature = "tpm", feature = "pkcs11")))]
        other => Err(Error::not_built_in(other)),
    }
}

/// Opens the existing key at `key_ref`, a TPM key with `options` for its queue and deadline
/// (other backends have neither).
pub fn open_with(key_ref: &KeyRef, options: TpmOptions) -> Result<Arc<dyn Signer>, Error> {
    match key_ref {
        #[cfg(feature = "tpm")]
        KeyRef::Tpm(tpm) => Ok(Arc::new(TpmKey::open_with(tpm, options)?)),
        other => {
            let _ = options;
            open(other)
        }
    }
}

/// Signs `count` distinct messages one after another and returns the achieved rate in
/// signatures per second: a quick figure for `issuer status` and the benchmarks (a discrete
/// TPM manages ~14–24/s, DESIGN §8).
pub fn signature_rate(signer: &dyn Signer, count: u32) -> Result<f64, Error> {
    let count = count.max(1);
    let start = Instant::now();
    for i in 0..count {
        signer.sign(&i.to_be_bytes())?;
    }
    let elapsed = start.elapsed().max(Duration::from_nanos(1));
    Ok(f64::from(count) / elapsed.as_secs_f64())
}

/// Run with `cargo test -p hsm --no-default-features`: the default build has both backends.
#[cfg(all(test, not(feature = "tpm"), not(feature = "pkcs11")))]
mod without_hardware_backends {
    use super::*;

    #[test]
    fn a_key_reference_to_a_backend_left_out_is_refused_with_the_feature_to_build() {
        let tpm: KeyRef = "tpm:handle=0x81010001".parse().expect("tpm key reference");
        let error = open(&tpm).expect_err("no TPM in this build");
        assert_eq!(
            error.to_string(),
            "this build has no TPM support: rebuild with --features tpm"
        );
        let pkcs11: KeyRef = "pkcs11:token=plant;object=issuing-ca"
            .parse()
            .expect("pkcs11 key reference");
        let error = create(&pkcs11).expect_err("no PKCS#11 in this build");
        assert_eq!(
            error.to_string(),
            "this build has no PKCS#11 support: rebuild with --features pkcs11"
        );
    }
}
