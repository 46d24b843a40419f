use std::process::ExitCode;

use clap::Parser;

// The issuance path allocates many small buffers (DER, JSON, base64); mimalloc measured
// ~10% of issuer CPU spent in glibc malloc/free under keep-alive load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLANT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for people; a journal or log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = issuer::cli::Cli::parse();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("issuer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(issuer::cli::run(cli));
    // Shut the runtime down before `main` returns and libc's exit handlers run. A task may
    // still hold a CA key; dropping the runtime drops every task and joins its workers, so
    // the last TPM key goes here and the hsm crate joins the TPM's owner thread before
    // libcrypto's `OPENSSL_cleanup` runs at exit (see `hsm::tpm`'s `Drop for Tpm`). Blocking
    // threads get a bound: a store flush stuck on a hung disk must not keep a stopping
    // issuer alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match outcome {
        Ok(()) => match issuer::cli::output_failure() {
            None => ExitCode::SUCCESS,
            Some(e) => {
                eprintln!("issuer: writing the output failed: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("issuer: {e}");
            if e.is_usage() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The async runtime: one worker more than there are cores. A request that leads a group
/// commit waits for the disk on its own worker (`store::sled::journal`); the spare keeps
/// every core busy meanwhile (keep-alive at 8 clients on 2 cores: about 15 % more
/// certificates/s than one worker per core). `TOKIO_WORKER_THREADS` still decides when set.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        builder.worker_threads(cores + 1);
    }
    builder.build()
}
