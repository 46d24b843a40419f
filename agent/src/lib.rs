//! The Plant PKI agent: today its commissioning side, which enrolls devices with the plant's
//! CA over EST (RFC 7030) and renews their certificates.
//!
//! - [`enrollment`]: one device, with a local key, a TPM or PKCS#11 key (`key.ref`), or a
//!   server-generated one ([`pkcs12`]).
//! - [`batch`]: a cabinet of devices from a CSV file.
//! - [`reenrollment`]: renewal with the current certificate as the TLS client certificate,
//!   its key signing the handshake wherever it lives.
//! - [`trust`]: the RFC 7030 §4.1.1 bootstrap that pins the CA by its fingerprint.
//! - [`csr`], [`certificate`], [`pem_files`], [`credentials`]: the pieces those share.
//!
//! The `agent` binary parses arguments and calls [`enrollment::enroll`],
//! [`batch::enroll_batch`] or [`reenrollment::reenroll`].

pub mod batch;
pub mod certificate;
mod client_identity;
pub mod credentials;
pub mod csr;
pub mod enrollment;
mod error;
pub mod node;
pub mod pem_files;
pub mod pkcs12;
pub mod reenrollment;
pub mod trust;

pub use error::Error;
