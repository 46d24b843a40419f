//! The wire definitions both binaries share, and the SPIFFE types they exchange.
//!
//! - [`workload`]: the SPIFFE Workload API, exactly as the SPIFFE specification defines it
//!   (no protobuf package; method paths `/SpiffeWorkloadAPI/…`).
//! - [`agent`]: the agent API the issuer serves to agents (`plant.agent.v1`).
//! - [`admin`]: the issuer's admin socket (`plant.admin.v1`): tokens, certificates, audit log,
//!   status, registration entries and agents.
//! - [`SpiffeId`], [`TrustDomain`], [`Selector`]: parsed once from untrusted text.
//! - [`duration`]: the duration grammar of both binaries' config files and flags.
//! - [`rfc3339()`], [`rfc3339_unix`]: times as people read them.
//!
//! The code is generated at build time with the `protoc` from `protoc-bin-vendored`.

pub mod duration;
mod rfc3339;
mod selector;
mod spiffe_id;

pub use rfc3339::{rfc3339, rfc3339_unix};
pub use selector::{is_container_id, is_unit_name, Selector, SelectorError};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Longest legacy device name (it appears in selectors, owners and log lines).
pub const MAX_DEVICE_NAME: usize = 64;

/// Checks a legacy device name (`press-7`): 1 to 64 letters, digits, `.`, `-` or `_`, so it
/// reads the same in agent.toml, a selector, the inventory and a log line.
pub fn check_device_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_DEVICE_NAME {
        return Err(format!(
            "a device name is 1 to {MAX_DEVICE_NAME} characters, not {}",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(format!(
            "a device name takes letters, digits, '.', '-' and '_', not {c:?}"
        )),
        None => Ok(()),
    }
}

/// The SPIFFE Workload API (no package).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));

    /// The metadata key every Workload API request must carry with the value `true`.
    pub const SECURITY_HEADER: &str = "workload.spiffe.io";
}

/// The agent API (`plant.agent.v1`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/plant.agent.v1.rs"));
}

/// The issuer's admin API (`plant.admin.v1`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/plant.admin.v1.rs"));

    // Generated without Debug (build.rs): the secret must not reach a log line.
    impl std::fmt::Debug for CreatedToken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CreatedToken")
                .field("id", &self.id)
                .field("kind", &self.kind())
                .field("label", &self.label)
                .field("subject", &self.subject)
                .field("expires_at", &self.expires_at)
                .finish_non_exhaustive()
        }
    }
}
