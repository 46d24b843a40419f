//! Commissioning: enrolling devices with the plant's CA over EST (RFC 7030) and renewing
//! their certificates, run once per device by an engineer (`agent enroll`, `agent reenroll`).
//!
//! - [`enrollment`]: one device, with a local key, a TPM or PKCS#11 key (`key.ref`), or a
//!   server-generated one ([`pkcs12`]).
//! - [`batch`]: a cabinet of devices from a CSV file.
//! - [`reenrollment`]: renewal with the current certificate as the TLS client certificate,
//!   its key signing the handshake wherever it lives ([`client_identity`]).
//! - [`trust`]: the RFC 7030 §4.1.1 bootstrap that pins the CA by its fingerprint.
//! - [`csr`], [`credentials`]: the request and the secrets those share.
//!
//! Nothing here imports [`crate::daemon`], nor the other way round.

pub mod batch;
mod client_identity;
pub mod credentials;
pub mod csr;
pub mod enrollment;
pub mod pkcs12;
pub mod reenrollment;
pub mod trust;
