//! `soak`: the long run of issue 7 (see `plant_tests::soak`). `scripts/soak [minutes]` runs
//! it; it prints a progress line every 30 s, then the report with a PASS/FAIL verdict, and
//! exits 1 on FAIL. Run as root: every workload is a process under its own uid.
//!
//! `soak workload --socket PATH` is one workload (the run starts them itself).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use plant_tests::soak::{self, Plan};

#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "An issuer, two agents, many workloads with short-lived SVIDs and PLC proxy traffic for a long time; then checks that nothing leaked and every rotation came on schedule"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole soak run.
    Run {
        /// How long the load runs, in minutes (after set-up).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Workload processes, split over the two agents.
        #[arg(long, default_value_t = 200)]
        workloads: usize,
        /// X509-SVID TTL in seconds.
        #[arg(long, default_value_t = 30)]
        ttl: u64,
        /// Seconds of warm-up before memory and descriptors are judged (default: two TTLs,
        /// at least a fifth of the run, at most half).
        #[arg(long)]
        warmup: Option<u64>,
        /// Seconds between samples of memory and descriptors.
        #[arg(long, default_value_t = 5)]
        sample: u64,
        /// Seconds between progress lines.
        #[arg(long, default_value_t = 30)]
        progress: u64,
        /// Seconds between two reads of the PLC poller.
        #[arg(long, default_value_t = 0.05)]
        poll_interval: f64,
        /// Copy the issuer's, agents' and workloads' logs here at the end.
        #[arg(long)]
        keep_logs: Option<PathBuf>,
        /// The issuer's store cache (`[store] cache_mb`) for the run; small, so it is full
        /// before the warm-up ends and memory growth after it means a leak.
        #[arg(long, default_value_t = soak::ISSUER_CACHE_MB)]
        issuer_cache_mb: u64,
        /// The Python with pymodbus (default: $PLANT_PYTHON).
        #[arg(long, env = "PLANT_PYTHON")]
        python: PathBuf,
    },
    /// One workload: a FetchX509SVID stream, one line per message.
    Workload {
        /// The agent's Workload API socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Workload { socket } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(soak::workload(&socket)),
        Command::Run {
            minutes,
            workloads,
            ttl,
            warmup,
            sample,
            progress,
            poll_interval,
            keep_logs,
            issuer_cache_mb,
            python,
        } => {
            anyhow::ensure!(
                minutes > 0.0 && minutes.is_finite(),
                "--minutes must be above 0"
            );
            let duration = Duration::from_secs_f64(minutes * 60.0);
            let ttl = Duration::from_secs(ttl);
            let plan = Plan {
                duration,
                workloads,
                ttl,
                warmup: warmup
                    .map_or_else(|| Plan::default_warmup(duration, ttl), Duration::from_secs),
                sample_every: Duration::from_secs(sample.max(1)),
                progress_every: Some(Duration::from_secs(progress.max(1))),
                workload_exe: std::env::current_exe().context("the soak binary's path")?,
                python,
                poll_interval,
                keep_logs,
                issuer_cache_mb,
            };
            let report = soak::run(&plan)?;
            println!("{report}");
            if !report.passed() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
