//! The Plant PKI agent, in its two lives:
//!
//! - [`commissioning`]: an engineer enrolls devices with the plant's CA over EST (RFC 7030)
//!   and renews their certificates (`agent enroll`, `agent reenroll`).
//! - [`daemon`]: `agent run` attests its node to the issuer and serves workloads SPIFFE SVIDs
//!   over the Workload API; `agent status` reads what it holds.
//!
//! The two never import each other. What both need is here at the root: [`certificate`]
//! (names, serials, chains), [`pem_files`] (the credential files and how they are written),
//! `device_key` (keys held by a TPM or token, for TLS and requests) and the crate's one
//! [`Error`].
//!
//! The `agent` binary parses arguments and calls [`commissioning::enrollment::enroll`],
//! [`commissioning::batch::enroll_batch`], [`commissioning::reenrollment::reenroll`] or
//! [`daemon::run`].

pub mod certificate;
pub mod commissioning;
pub mod daemon;
mod device_key;
mod error;
pub mod pem_files;

pub use error::{BatchProblem, Error, EstCommand};
