//! The issuing CA key in a TPM (a real swtpm started here, behind a slow link where a real
//! chip's speed matters). `issuer init --ca-key tpm:…` creates the key inside the TPM; the TPM
//! key certifies short-lived in-memory signing keys that sign leaves at software speed and
//! rotate with overlap; a profile set to `sign_with = "issuing-key"` signs with the TPM key
//! itself, held to the TPM's queue. Certificates are checked with `openssl verify` against
//! the `cacerts` a client fetched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use plant_tests::swtpm::{SlowLink, Swtpm};
use plant_tests::{
    authority_key_id as signed_by, certs_from_pkcs7, curl, enroll_bearer as enroll, openssl_csr,
    subject_key_id, tokens, verify_against, verify_chain, CurlAnswer, Issuer,
};

/// A real discrete TPM takes 42–74 ms per P-256 signature (DESIGN §3).
const CHIP_DELAY: Duration = Duration::from_millis(70);

/// issuer.toml edits: a `direct` profile signed by the TPM key itself, the TPM queue bound,
/// and the short-lived key's lifetime and overlap.
fn configure(toml: &Path, key_queue: usize, signing_key: Option<(&str, &str)>) -> Result<()> {
    let mut text = std::fs::read_to_string(toml)?;
    ensure!(
        text.contains("\n[ca.signing_key]\n"),
        "init did not turn on short-lived keys for a TPM key:\n{text}"
    );
    text = text.replace("key_queue = 32\n", &format!("key_queue = {key_queue}\n"));
    if let Some((lifetime, overlap)) = signing_key {
        text = text.replace(
            "lifetime = \"24h\"\noverlap = \"1h\"",
            &format!("lifetime = \"{lifetime}\"\noverlap = \"{overlap}\""),
        );
    }
    std::fs::write(toml, text)?;
    plant_tests::add_direct_profile(toml)?;
    // These tests enroll one CSR many times to measure signing, not device identity.
    plant_tests::share_subjects(toml, "device")?;
    plant_tests::share_subjects(toml, "direct")
}

fn start_issuer(tcti: &str, key_queue: usize, signing_key: Option<(&str, &str)>) -> Result<Issuer> {
    let ca_key = format!("tpm:blob=ca/issuing.tpmkey;tcti={tcti}");
    Issuer::start_custom(&["--ca-key", &ca_key], |toml| {
        configure(toml, key_queue, signing_key)
    })
}

fn issued(answer: &CurlAnswer, dir: &Path, name: &str) -> Result<PathBuf> {
    ensure!(
        answer.status == 200,
        "{name}: {} {}",
        answer.status,
        answer.text()
    );
    certs_from_pkcs7(&answer.body, dir, name)
}

#[test]
fn short_lived_keys_keep_issuing_while_the_tpm_is_down_and_direct_issuance_recovers_with_it(
) -> Result<()> {
    let mut tpm = Swtpm::start();
    let issuer = start_issuer(&tpm.tcti_string(), 32, None)?;
    let dir = tempfile::tempdir()?;
    // The key file is a TPM blob: useless without this TPM, and no PKCS#8 key exists.
    let blob = std::fs::read_to_string(issuer.dir.path().join("ca/issuing.tpmkey"))?;
    ensure!(blob.contains("TSS2 PRIVATE KEY"), "{blob}");
    ensure!(!issuer.dir.path().join("ca/issuing.key").exists());
    let status = plant_tests::run_ok(issuer.cli().arg("status"))?;
    for expected in [
        "TPM key blob",
        "root key            software key file",
        "queue",
        "signing key         signing",
        "in memory",
        "direct",
    ] {
        ensure!(
            status.contains(expected),
            "status lacks {expected:?}:\n{status}"
        );
    }

    let (_, csr) = openssl_csr(dir.path(), "dev", "tpm-device", &[])?;
    let issuing_ski = subject_key_id(&issuer.issuing_pem())?;
    // The default profile: signed by the short-lived key, which the TPM key certified.
    let leaf = issued(
        &enroll(&issuer, &csr, "device", &issuer.token("device", None)?)?,
        dir.path(),
        "short-lived-1",
    )?;
    verify_chain(&issuer, &leaf)?;
    ensure!(
        signed_by(&leaf)? != issuing_ski,
        "the default profile was signed by the TPM key itself"
    );
    // The direct profile: signed by the TPM key.
    let direct = issued(
        &enroll(&issuer, &csr, "direct", &issuer.token("direct", None)?)?,
        dir.path(),
        "direct-1",
    )?;
    verify_chain(&issuer, &direct)?;
    ensure!(
        signed_by(&direct)? == issuing_ski,
        "the direct profile was not signed by the TPM key"
    );

    tpm.kill();
    // The short-lived key lives in memory: issuance goes on without the TPM.
    let leaf = issued(
        &enroll(&issuer, &csr, "device", &issuer.token("device", None)?)?,
        dir.path(),
        "while-down",
    )?;
    verify_chain(&issuer, &leaf)?;
    // Direct issuance needs the TPM: 503, Retry-After, and the token is kept.
    let kept = issuer.token("direct", None)?;
    let answer = enroll(&issuer, &csr, "direct", &kept)?;
    ensure!(answer.status == 503, "{} {}", answer.status, answer.text());
    ensure!(answer.header("Retry-After").is_some(), "{}", answer.headers);
    ensure!(answer.text().contains("retry later"), "{}", answer.text());

    tpm.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let recovered = loop {
        let answer = enroll(&issuer, &csr, "direct", &kept)?;
        if answer.status == 200 || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let direct = issued(&recovered, dir.path(), "direct-after").map_err(|e| {
        anyhow!(
            "{e}; no recovery (or the token was lost):\n{}",
            issuer.log()
        )
    })?;
    verify_chain(&issuer, &direct)?;
    Ok(())
}

#[test]
fn a_slow_tpm_holds_direct_issuance_to_its_queue_while_short_lived_keys_sign_freely() -> Result<()>
{
    let tpm = Swtpm::start();
    let link = SlowLink::start(&tpm, CHIP_DELAY);
    let issuer = Arc::new(start_issuer(&link.tcti_string(), 4, None)?);
    let dir = Arc::new(tempfile::tempdir()?);
    let (_, csr) = openssl_csr(dir.path(), "dev", "burst", &[])?;
    let csr = Arc::new(csr);

    // 32 devices at once against each profile; a TPM signs ~14 a second and 4 may wait.
    let burst = |label: &'static str| -> Result<Vec<(String, CurlAnswer)>> {
        let tokens = tokens(&issuer, label, 32)?;
        let start = Arc::new(Barrier::new(tokens.len()));
        let threads: Vec<_> = tokens
            .into_iter()
            .map(|token| {
                let (issuer, csr, start) = (issuer.clone(), csr.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    enroll(&issuer, &csr, label, &token).map(|a| (token, a))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| anyhow!("client thread panicked"))?)
            .collect()
    };

    let direct = burst("direct")?;
    let refused: Vec<&(String, CurlAnswer)> =
        direct.iter().filter(|(_, a)| a.status == 503).collect();
    for (_, answer) in &direct {
        ensure!(
            [200, 503].contains(&answer.status),
            "{} {}",
            answer.status,
            answer.text()
        );
    }
    ensure!(
        !refused.is_empty(),
        "32 requests at once never filled a 4-deep TPM queue: {:?}\n{}",
        direct.iter().map(|(_, a)| a.status).collect::<Vec<_>>(),
        issuer.log()
    );
    for (_, answer) in &refused {
        ensure!(
            answer.header("Retry-After").as_deref() == Some("1"),
            "{}",
            answer.headers
        );
        ensure!(answer.text().contains("busy"), "{}", answer.text());
    }
    let (token, _) = refused[0];
    let retried = enroll(&issuer, &csr, "direct", token)?;
    verify_chain(&issuer, &issued(&retried, dir.path(), "retried")?)?;

    // The same burst through the short-lived key: the slow TPM is not in the way.
    for (i, (_, answer)) in burst("device")?.iter().enumerate() {
        let cert = issued(answer, dir.path(), &format!("free-{i}"))?;
        if i % 8 == 0 {
            verify_chain(&issuer, &cert)?;
        }
    }
    Ok(())
}

#[test]
fn signing_keys_rotate_under_load_without_a_failed_request() -> Result<()> {
    let tpm = Swtpm::start();
    let link = SlowLink::start(&tpm, CHIP_DELAY);
    let issuer = Arc::new(start_issuer(&link.tcti_string(), 32, Some(("4s", "2s")))?);
    let tokens = Arc::new(Mutex::new(tokens(&issuer, "device", 600)?));
    let keys = Arc::new(Mutex::new(BTreeSet::new()));
    let until = Instant::now() + Duration::from_secs(14);
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let (issuer, tokens, keys) = (issuer.clone(), tokens.clone(), keys.clone());
            std::thread::spawn(move || -> Result<usize> {
                let dir = tempfile::tempdir()?;
                let (_, csr) = openssl_csr(dir.path(), "dev", &format!("rotating-{c}"), &[])?;
                let mut done = 0;
                while Instant::now() < until {
                    let Some(token) = tokens.lock().map_err(|_| anyhow!("lock"))?.pop() else {
                        break;
                    };
                    // What a device does: fetch cacerts, enroll, check what it got against them.
                    let cacerts = curl(&issuer, &["/.well-known/est/cacerts"])?;
                    ensure!(cacerts.status == 200, "cacerts: {}", cacerts.text());
                    let name = format!("n{done}");
                    let chain = certs_from_pkcs7(&cacerts.body, dir.path(), &format!("{name}-ca"))?;
                    let answer = enroll(&issuer, &csr, "device", &token)?;
                    let cert = issued(&answer, dir.path(), &name)?;
                    verify_against(&issuer, &cert, &chain)
                        .map_err(|e| anyhow!("certificate {done} of client {c}: {e}"))?;
                    keys.lock()
                        .map_err(|_| anyhow!("lock"))?
                        .insert(signed_by(&cert)?);
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for client in clients {
        total += client.join().map_err(|_| anyhow!("client panicked"))??;
    }
    let keys = keys.lock().map_err(|_| anyhow!("lock"))?.len();
    ensure!(total > 30, "only {total} enrollments ran");
    ensure!(keys >= 3, "{total} certificates came from {keys} signing keys: no rotation happened in 14 s of 4 s keys\n{}", issuer.log());
    let audit = plant_tests::run_ok(issuer.cli().args(["audit", "tail", "--count", "2000"]))?;
    ensure!(
        audit.matches("signing_key.certified").count() >= keys,
        "{audit}"
    );
    Ok(())
}

#[test]
fn an_issuer_killed_again_and_again_restarts_on_the_same_tpm() -> Result<()> {
    // swtpm has no resource manager: a killed issuer's loaded objects stay in the TPM's few
    // slots until something flushes them.
    let tpm = Swtpm::start();
    let mut issuer = start_issuer(&tpm.tcti_string(), 32, None)?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "dev", "restarted", &[])?;
    for round in 0..5 {
        issuer.kill()?;
        issuer.serve()?;
        let answer = enroll(&issuer, &csr, "direct", &issuer.token("direct", None)?)?;
        verify_chain(
            &issuer,
            &issued(&answer, dir.path(), &format!("round-{round}"))?,
        )?;
    }
    Ok(())
}
