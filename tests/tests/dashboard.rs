//! The operator dashboard at `/ui` in a real headless browser (Debian's chromium): the
//! inventory rows and the expiry timeline render, the label filter narrows the table, and a
//! screenshot lands in `target/test-artifacts/dashboard.png`.
//!
//! `/ui` wants an operator client certificate, like the operator API. Headless chromium
//! cannot pick a client certificate without a machine-wide policy, so `socat` (a third-party
//! TLS client) holds the operator's certificate and key and relays the browser's requests
//! over mutual TLS, as an operator's browser with the certificate installed would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plant_tests::{enroll_with_token, Issuer};

/// A socat relay from a loopback port to the issuer, presenting the operator certificate.
struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(issuer: &Issuer, cert: &Path, key: &Path) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let target = issuer.url.trim_start_matches("https://");
        let child = Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!(
                "OPENSSL:{target},cert={},key={},cafile={},commonname=localhost",
                cert.display(),
                key.display(),
                issuer.root_pem().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("socat is not installed; run scripts/setup (apt package socat)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("socat did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, port })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headless chromium with the flags this machine's closed network needs and a fresh profile.
fn chromium(profile: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("chromium is not installed; run scripts/setup (apt package chromium)")?;
    ensure!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("test-artifacts")
}

#[test]
fn the_dashboard_renders_rows_and_the_timeline_filters_and_is_screenshotted() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let enroll =
        |subject: &str, label: &str| enroll_with_token(&issuer, dir.path(), subject, label);
    let (operator, operator_key) = enroll("alice-ops", "operator")?;
    for (subject, label) in [
        ("plc-1", "plc"),
        ("plc-2", "plc"),
        ("gw-1", "device"),
        ("gw-2", "device"),
    ] {
        enroll(subject, label)?;
    }
    let relay = Relay::start(&issuer, &operator, &operator_key)?;
    let profile = tempfile::tempdir()?;
    let url = format!("http://127.0.0.1:{}/ui", relay.port);

    let dom = chromium(profile.path(), &["--dump-dom", &url])?;
    ensure!(
        dom.contains(r#"data-rendered="true""#),
        "the timeline script did not run:\n{dom}"
    );
    let bars = dom.matches(r#"class="bar""#).count();
    ensure!(
        bars == 4,
        "{bars} bars in the timeline (device, operator, plc, server expected):\n{dom}"
    );
    // Four devices, the operator and the EST listener's own certificate.
    let rows = dom.matches("<tr class=").count();
    ensure!(rows == 6, "{rows} rows:\n{dom}");
    let filtered = chromium(profile.path(), &["--dump-dom", &format!("{url}?label=plc")])?;
    let rows: Vec<&str> = filtered
        .lines()
        .filter(|l| l.contains("<tr class="))
        .collect();
    ensure!(rows.len() == 2, "{rows:?}");
    ensure!(
        rows.iter().all(|r| r.contains(r#"data-label="plc""#)),
        "{rows:?}"
    );
    ensure!(
        filtered.contains(r#"<option value="plc" selected"#),
        "the filter is not shown as chosen"
    );

    let shots = artifacts();
    std::fs::create_dir_all(&shots)?;
    let png = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,900",
            &url,
        ],
    )?;
    let bytes =
        std::fs::read(&png).with_context(|| format!("no screenshot at {}", png.display()))?;
    ensure!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    Ok(())
}
