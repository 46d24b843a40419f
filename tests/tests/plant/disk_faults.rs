//! Disk faults during issuance (issue 7): the issuer's state folder sits on a small tmpfs
//! mounted by the test (root, as CI runs), which the test fills up and then remounts
//! read-only. Requests are answered 503 with a message that says what is wrong, nothing is
//! spent or recorded for them, and issuance resumes by itself, without a restart, once space
//! is back or the folder is writable again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use est::client::{Auth, EstClient};
use est::server::Secret;
use plant_tests::{
    enroll_bearer, enroll_with_curl, inventory_serial, openssl_csr, own_uid, p256_csr, root_der,
    run, run_ok, tokens, Issuer,
};

/// A tmpfs mounted over a folder for the test; lazily unmounted when dropped, so a still
/// running issuer doesn't keep it busy.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        run_ok(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(path),
        )
        .context("mounting a tmpfs for the state folder")?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Bytes free to an unprivileged writer, as `df` says.
    fn available(&self) -> Result<u64> {
        let out = run_ok(
            Command::new("df")
                .args(["-B1", "--output=avail"])
                .arg(&self.path),
        )?;
        out.lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .context("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Twice: the read-only bind mount, if a step left it, then the tmpfs.
        for _ in 0..2 {
            let _ = run(Command::new("umount").arg("-l").arg(&self.path));
        }
    }
}

/// An enrollment by curl with a token, returning the answer whatever its status.
fn enroll(issuer: &Issuer, dir: &Path, name: &str, token: &str) -> Result<plant_tests::CurlAnswer> {
    let (_key, csr) = openssl_csr(dir, name, name, &[])?;
    enroll_bearer(issuer, &csr, "device", token)
}

#[test]
fn a_full_or_read_only_state_disk_answers_503_and_issuance_resumes_by_itself() -> Result<()> {
    ensure!(
        own_uid()? == 0,
        "this test mounts a tmpfs for the issuer's state folder and must run as root (as CI does)"
    );
    let mut tmpfs = None;
    let issuer = Issuer::start_with(|toml| {
        let state = toml.parent().context("issuer folder")?.join("state");
        tmpfs = Some(Tmpfs::mount(&state, "48m")?);
        let text = std::fs::read_to_string(toml)?;
        ensure!(
            text.contains("min_free_mb = 64"),
            "issuer.toml has no min_free_mb"
        );
        std::fs::write(toml, text.replace("min_free_mb = 64", "min_free_mb = 8"))?;
        Ok(())
    })?;
    let tmpfs = tmpfs.context("tmpfs")?;
    let dir = tempfile::tempdir()?;
    let tokens = tokens(&issuer, "device", 3)?;
    let auth = |token: &str| format!("Authorization: Bearer {token}");
    enroll_with_curl(
        &issuer,
        dir.path(),
        "before",
        "device",
        &["-H", &auth(&tokens[0])],
    )?;
    let rows_before = issuer.inventory(&[])?.len();

    // Disk full: leave 2 MiB, under the 8 MiB reserve.
    let filler = tmpfs.path.join("filler");
    let fill = tmpfs.available()?.saturating_sub(2 << 20);
    run_ok(
        Command::new("fallocate")
            .args(["-l", &fill.to_string()])
            .arg(&filler),
    )?;
    let answer = enroll(&issuer, dir.path(), "while-full", &tokens[1])?;
    ensure!(
        answer.status == 503,
        "disk full: {} {}",
        answer.status,
        answer.text()
    );
    ensure!(
        answer.text().contains("is full") && answer.text().contains("resumes by itself"),
        "the refusal should say the disk is full: {}",
        answer.text()
    );
    ensure!(answer.header("Retry-After").is_some(), "no Retry-After");
    // Operators get the same answer from the admin socket instead of a half-made token.
    let create = run(issuer.cli().args(["token", "create", "--label", "device"]))?;
    ensure!(
        !create.status.success(),
        "a token was created on a full disk"
    );
    ensure!(
        String::from_utf8_lossy(&create.stderr).contains("is full"),
        "token create on a full disk: {}",
        String::from_utf8_lossy(&create.stderr)
    );
    ensure!(
        issuer.inventory(&[])?.len() == rows_before,
        "a refused request left a record"
    );

    // Space back: the same token works (it was not spent), with no restart.
    std::fs::remove_file(&filler)?;
    enroll_with_curl(
        &issuer,
        dir.path(),
        "after-full",
        "device",
        &["-H", &auth(&tokens[1])],
    )
    .context("enrolling once space is back")?;

    // Read-only: the folder is remounted read-only under the running issuer.
    run_ok(
        Command::new("mount")
            .arg("--bind")
            .arg(&tmpfs.path)
            .arg(&tmpfs.path),
    )?;
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&tmpfs.path),
    )?;
    let answer = enroll(&issuer, dir.path(), "while-ro", &tokens[2])?;
    ensure!(
        answer.status == 503,
        "read-only: {} {}",
        answer.status,
        answer.text()
    );
    ensure!(
        answer.text().contains("read-only"),
        "the refusal should say the folder is read-only: {}",
        answer.text()
    );
    run_ok(Command::new("umount").arg(&tmpfs.path))?;
    enroll_with_curl(
        &issuer,
        dir.path(),
        "after-ro",
        "device",
        &["-H", &auth(&tokens[2])],
    )
    .context("enrolling once the folder is writable again")?;

    let rows = issuer.inventory(&[])?;
    ensure!(
        rows.len() == rows_before + 2,
        "{} inventory rows, expected {}",
        rows.len(),
        rows_before + 2
    );
    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    drop(issuer);
    drop(tmpfs);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failure_past_the_reserve_answers_503_and_stops_the_issuer_to_restart_on_disk_state(
) -> Result<()> {
    ensure!(
        own_uid()? == 0,
        "this test mounts a tmpfs for the issuer's state folder and must run as root (as CI does)"
    );
    let mut tmpfs = None;
    // No reserve: the disk fills up to the last byte, as when another program fills it
    // between two requests, and the store's own write fails.
    let mut issuer = Issuer::start_with(|toml| {
        let state = toml.parent().context("issuer folder")?.join("state");
        tmpfs = Some(Tmpfs::mount(&state, "48m")?);
        let text = std::fs::read_to_string(toml)?;
        std::fs::write(toml, text.replace("min_free_mb = 64", "min_free_mb = 0"))?;
        // One CSR fills the disk, enrolled thousands of times: the subject is not the point.
        plant_tests::share_subjects(toml, "device")
    })?;
    let tmpfs = tmpfs.context("tmpfs")?;
    let tokens = run_ok(issuer.cli().args([
        "token", "create", "--label", "device", "--count", "5000", "--format", "plain",
    ]))?;
    let root = root_der(&issuer)?;
    let client = EstClient::new(&issuer.url, std::slice::from_ref(&root), None)?;
    let csr = p256_csr("disk-filler")?;

    let filler = tmpfs.path.join("filler");
    run_ok(
        Command::new("fallocate")
            .args(["-l", &tmpfs.available()?.to_string()])
            .arg(&filler),
    )?;
    // The store writes into space it already holds until that runs out; enroll until the
    // first refusal.
    let mut received = Vec::new();
    let mut refusal = None;
    for token in tokens.lines() {
        match client
            .simple_enroll(&csr, &Auth::Bearer(Secret(token.to_owned())))
            .await
        {
            Ok(der) => received.push(inventory_serial(&der)?),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    match refusal {
        // The request in flight is answered, never cut off by the stopping issuer.
        Some(est::Error::Server {
            status: 503,
            retry_after: Some(_),
            ..
        }) => {}
        other => anyhow::bail!(
            "after {} enrollments on a full disk: {other:?}",
            received.len()
        ),
    }
    // The store reports the kept error within a health probe and the issuer stops after
    // answering what was in flight; a minute bounds a hang on a busy machine.
    let status = issuer.wait_for_exit(std::time::Duration::from_secs(60))?;
    ensure!(!status.success(), "the issuer exited with {status}");
    ensure!(
        issuer.log().contains("restarts on what is on disk"),
        "the issuer should say why it stopped:\n{}",
        issuer.log()
    );

    // Space back, restarted (as systemd's Restart=on-failure would): every certificate a
    // client received is in the inventory, the audit chain is whole, and it issues again.
    std::fs::remove_file(&filler)?;
    issuer.serve()?;
    let inventory: std::collections::HashSet<String> = issuer
        .inventory(&[])?
        .iter()
        .filter_map(|r| r["serial"].as_str().map(str::to_owned))
        .collect();
    for serial in &received {
        ensure!(
            inventory.contains(serial),
            "{serial} was handed out but is not recorded"
        );
    }
    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("after-restart"))?;
    let auth = format!("Authorization: Bearer {token}");
    enroll_with_curl(
        &issuer,
        dir.path(),
        "after-restart",
        "device",
        &["-H", &auth],
    )?;
    eprintln!(
        "disk filled under the store after {} enrollments: 503, the issuer stopped, restarted \
         with all {} in the inventory",
        received.len(),
        received.len()
    );
    drop(issuer);
    drop(tmpfs);
    Ok(())
}
