//! The end-to-end suite: one test binary with a module per journey or fault.
//!
//! One binary rather than one per file: cargo runs test binaries one after another, so
//! suites of a single slow test (soak, crash safety) used to leave a core idle, and each
//! binary was compiled and linked on its own. Here the harness runs tests from every module
//! side by side. They share this process, so a test never changes process-wide state
//! (environment, resource limits, working directory): it gives what it needs to the children
//! it starts instead.
//!
//! One module: `cargo test -p plant-tests --test plant crash_safety::`.

mod agent_api;
mod agent_messages;
mod agent_metrics_listener;
mod agent_tpm_attestation;
mod agent_tpm_key;
mod clock_faults;
mod commissioning_journey;
mod crash_safety;
mod dashboard;
mod disk_faults;
mod est_bad_input;
mod est_interop;
mod fuzz_regressions;
mod hostile_clients;
mod node_identity;
mod operator_api;
mod operator_cli;
mod pkcs11_ca;
mod plc_proxy;
mod refusal_flooding;
mod renewal_lineage;
mod resource_exhaustion;
mod revocation;
mod setup_toolchain;
mod soak;
mod tpm_attestation;
mod tpm_ca;
mod workload_api;
mod workload_api_python;
