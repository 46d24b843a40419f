//! The soak run of issue 7, short enough for CI: the same orchestration and the same checks
//! as `scripts/soak` (plant_tests::soak), with 20 workload processes, 10 s X509-SVIDs (so each
//! rotates about six times) and PLC proxy traffic for 30 s. It fails on an SVID served
//! expired, a stream silent past expiry, a rotation outside the schedule, a failed proxied
//! read, or memory or descriptors growing after warm-up (thresholds in the module).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use plant_tests::soak::{self, Plan};

#[test]
fn a_short_soak_keeps_every_svid_fresh_on_schedule_and_memory_and_descriptors_flat() -> Result<()> {
    let python = std::env::var("PLANT_PYTHON")
        .context("PLANT_PYTHON must point at the Python with pymodbus (scripts/test sets it up)")?;
    let plan = Plan {
        duration: Duration::from_secs(30),
        workloads: 20,
        ttl: Duration::from_secs(10),
        warmup: Duration::from_secs(12),
        sample_every: Duration::from_secs(2),
        progress_every: None,
        workload_exe: PathBuf::from(env!("CARGO_BIN_EXE_soak")),
        python: PathBuf::from(python),
        poll_interval: 0.05,
        keep_logs: None,
        issuer_cache_mb: soak::ISSUER_CACHE_MB,
    };
    let report = soak::run(&plan)?;
    println!("{report}");
    assert!(report.passed(), "{report}");
    // The checks had something to judge: every workload rotated, the proxy carried traffic,
    // and each process was sampled after warm-up.
    assert!(report.rotations_min >= 2, "{report}");
    assert!(report.proxy.ok > 100, "{report}");
    assert_eq!(report.processes.len(), 3, "{report}");
    Ok(())
}
