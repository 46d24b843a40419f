//! The Plant PKI agent: the commissioning side, which enrolls devices with the plant's CA over
//! EST (RFC 7030) and renews their certificates, and the daemon (`agent run`), which attests
//! its node to the issuer and serves workloads SPIFFE SVIDs over the Workload API.
//!
//! Daemon:
//! - [`config`]: `agent.toml`; [`daemon::run`] runs it.
//! - [`node`]: node attestation (join token, x509pop; tpm) and [`issuer_client`], the agent
//!   API client that drives it over TLS, then mTLS with the node SVID.
//! - [`cache`]: entry sync, X509-SVID minting and [`rotation`] at half life ± 10 %.
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket; callers attested by [`peer`].
//! - [`status`]: `<state_dir>/status.json` and `agent status`.
//! - [`metrics`]: Prometheus `/metrics` on `metrics_listen`.
//! - [`proxy`]: the legacy PLC proxy, inbound (mTLS in front of a PLC) and outbound (a legacy
//!   client's plain TCP out as mTLS); refused Modbus requests reach the issuer's audit log
//!   through [`proxy_audit`].
//!
//! Commissioning:
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

pub mod authority;
pub mod batch;
pub mod cache;
pub mod certificate;
mod client_identity;
pub mod config;
pub mod connections;
pub mod credentials;
pub mod csr;
pub mod daemon;
pub mod enrollment;
pub mod entry;
mod error;
pub mod issuer_client;
pub mod jwt;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod pem_files;
pub mod pkcs12;
pub mod proxy;
pub mod proxy_audit;
pub mod reenrollment;
pub mod rotation;
pub mod socket_address;
pub mod status;
pub mod svid;
pub mod trust;
pub mod workload_api;

pub use error::{BatchProblem, Error, EstCommand};
