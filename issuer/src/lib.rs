//! Plant PKI issuer: an EST (RFC 7030) issuing CA with one-time enrollment tokens, an
//! inventory of every certificate, and a hash-chained audit log.

pub mod admin;
pub mod agent_api;
pub mod attestation;
pub mod authority;
pub mod ca;
pub mod ca_key;
mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connections;
pub mod crl;
pub mod dashboard;
mod error;
pub mod est_backend;
pub mod eviction;
pub mod grant;
mod header_case;
pub mod init;
pub mod issuance;
pub mod lockout;
pub mod metrics;
pub mod operator_api;
pub mod profile;
pub mod refusal;
pub mod registration;
pub mod revocation;
pub mod serial;
pub mod serve;
pub mod signing_key;
pub mod state_volume;
pub mod store;
pub mod tls;
pub mod tokens;

pub use error::Error;
