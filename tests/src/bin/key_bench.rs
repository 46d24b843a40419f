//! `key_bench`: the key-custody figures of DESIGN §3 for `scripts/bench keys`.
//!
//! 1. Raw P-256 signatures per second, one caller signing sequentially: a software key, a
//!    key in swtpm, the same swtpm behind a link that holds each command 70 ms (a discrete
//!    chip's speed), and a key in SoftHSM2.
//! 2. EST issuance rate (keep-alive, `est_load`) of an issuer whose CA key is in swtpm: with
//!    certificates signed by the TPM key directly and through the short-lived signing key,
//!    each with and without the 70 ms link.
//!
//! Figures are printed, never judged. It runs the `issuer` and `est_load` binaries found as
//! the tests find them (`PLANT_BIN_DIR`; `scripts/bench keys` points it at release builds).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hsm::Signer;
use plant_tests::swtpm::{SlowLink, Swtpm};
use plant_tests::{bin, run_ok, Issuer};

/// A discrete TPM takes 42–74 ms per P-256 signature (DESIGN §3).
const CHIP_DELAY: Duration = Duration::from_millis(70);

#[derive(Debug, Parser)]
#[command(
    name = "key_bench",
    about = "Signature and EST issuance rates per key custody"
)]
struct Args {
    /// Seconds per EST run.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Concurrent EST clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let tpm = Swtpm::start();

    println!("raw P-256 signatures/s (one caller, sequential)");
    let soft = hsm::SoftKey::generate()?;
    print_rate("software key (in memory)", &soft, 5000)?;
    {
        let key = tpm_key(&tpm.tcti_string(), &scratch.path().join("raw.tpmkey"), true)?;
        print_rate("swtpm", key.as_ref(), 300)?;
    }
    {
        let link = SlowLink::start(&tpm, CHIP_DELAY);
        let key = tpm_key(
            &link.tcti_string(),
            &scratch.path().join("raw.tpmkey"),
            false,
        )?;
        print_rate("swtpm + 70 ms per command", key.as_ref(), 15)?;
    }
    {
        let dir = scratch.path().join("softhsm");
        std::fs::create_dir_all(&dir)?;
        let conf = plant_tests::softhsm_token(&dir, "bench", "1234")?;
        std::fs::write(dir.join("pin"), "1234\n")?;
        // Read by SoftHSM2 when this process loads it, just below.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let key_ref: hsm::KeyRef = format!(
            "pkcs11:module={};token=bench;object=bench;pin-file={}",
            hsm::DEFAULT_PKCS11_MODULE,
            dir.join("pin").display()
        )
        .parse()?;
        let key = hsm::create(&key_ref)?;
        print_rate("SoftHSM2 (PKCS#11)", key.as_ref(), 3000)?;
    }

    println!();
    println!(
        "EST simpleenroll ({} clients, keep-alive, {} s per run)",
        args.clients, args.seconds
    );
    let baseline = est_rate(&args, None, "device").context("EST run with a software CA key")?;
    println!("  {:<52} {baseline}", "software CA key (the baseline)");
    println!("  CA key in swtpm:");
    for (slow, label, what) in [
        (false, "direct", "signed by the TPM key"),
        (false, "device", "signed by the short-lived key"),
        (true, "direct", "signed by the TPM key, 70 ms per command"),
        (
            true,
            "device",
            "signed by the short-lived key, 70 ms per command",
        ),
    ] {
        let link = slow.then(|| SlowLink::start(&tpm, CHIP_DELAY));
        let tcti = link
            .as_ref()
            .map_or_else(|| tpm.tcti_string(), SlowLink::tcti_string);
        let result =
            est_rate(&args, Some(&tcti), label).with_context(|| format!("EST run {what}"))?;
        println!("    {what:<50} {result}");
    }
    Ok(())
}

fn print_rate(what: &str, key: &dyn Signer, count: u32) -> Result<()> {
    let rate = hsm::signature_rate(key, count)?;
    println!("  {what:<52} {rate:>9.0} signatures/s  ({count} signed)");
    Ok(())
}

/// A TPM key blob at `path` (created when `create`), through `tcti`.
fn tpm_key(tcti: &str, path: &Path, create: bool) -> Result<Arc<dyn Signer>> {
    let key_ref: hsm::KeyRef = format!("tpm:blob={};tcti={tcti}", path.display()).parse()?;
    let options = hsm::TpmOptions {
        deadline: Duration::from_secs(30),
        queue_capacity: 32,
    };
    let hsm::KeyRef::Tpm(tpm_ref) = &key_ref else {
        bail!("not a TPM key reference: {key_ref}");
    };
    Ok(if create {
        Arc::new(hsm::TpmKey::create_with(tpm_ref, options)?)
    } else {
        Arc::new(hsm::TpmKey::open_with(tpm_ref, options)?)
    })
}

/// One `est_load` run against a new issuer whose CA key is created in the TPM at `tcti` (a
/// software key without one); returns its summary: certificates/s and latency percentiles.
fn est_rate(args: &Args, tcti: Option<&str>, label: &str) -> Result<String> {
    let ca_key = tcti.map_or_else(
        || "soft:path=ca/issuing.key".to_owned(),
        |tcti| format!("tpm:blob=ca/issuing.tpmkey;tcti={tcti}"),
    );
    let issuer = Issuer::start_custom(&["--ca-key", &ca_key], plant_tests::add_direct_profile)?;
    // Enough tokens for software speed over the whole run; a slow TPM uses a few of them.
    let count = 4000 * args.seconds;
    let tokens = issuer.dir.path().join("tokens.txt");
    let text = run_ok(issuer.cli().args([
        "token",
        "create",
        "--label",
        label,
        "--count",
        &count.min(100_000).to_string(),
        "--format",
        "plain",
    ]))?;
    std::fs::write(&tokens, text)?;
    let out = run_ok(
        Command::new(bin("est_load"))
            .args(["--url", &issuer.url, "--ca"])
            .arg(issuer.root_pem())
            .arg("--tokens")
            .arg(&tokens)
            .args(["--mode", "keep-alive", "--label", label])
            .args(["--clients", &args.clients.to_string()])
            .args(["--seconds", &args.seconds.to_string()]),
    )?;
    let result = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("no RESULT line from est_load:\n{out}"))?;
    let field = |name: &str| {
        result
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or("?")
            .to_owned()
    };
    Ok(format!(
        "{:>6} certificates/s  p50 {} ms  p99 {} ms  ({} ok, {} failed)",
        field("certs_per_sec"),
        field("p50_ms"),
        field("p99_ms"),
        field("ok"),
        field("failed")
    ))
}
