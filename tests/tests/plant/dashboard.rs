//! The operator dashboard at `/ui` in a real headless browser (Debian's chromium): the
//! inventory rows and the expiry timeline render, the label filter narrows the table, and a
//! screenshot lands in `target/test-artifacts/dashboard.png`. What an operator reads off it:
//! the chart's y axis and per-bar totals, windows labelled by their true dates, days left per
//! row with the last week red and the last month amber, every profile (the SVID ones too) in
//! the label filter, and a default view of valid certificates only.
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
use plant_tests::{enroll_with_token, Agent, Issuer};

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
        dom.contains(r#"<svg class="chart""#),
        "no timeline chart:\n{dom}"
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

/// An issuer.toml edit: profiles whose certificates expire within a week (`badge`, 3 days)
/// and within a month (`sensor`, 20 days), so the table has rows to colour.
fn add_short_profiles(toml: &Path) -> Result<()> {
    let mut text = std::fs::read_to_string(toml)?;
    for (name, lifetime) in [("badge", "3d"), ("sensor", "20d")] {
        text.push_str(&format!(
            "\n[profiles.{name}]\ndescription = \"expires in {lifetime}\"\nlifetime = \"{lifetime}\"\n\
             key_usage = [\"digitalSignature\"]\nextended_key_usage = [\"clientAuth\"]\nsan = []\n"
        ));
    }
    std::fs::write(toml, text)?;
    Ok(())
}

/// The value of attribute `name` in `tag` (the text from an element's `<` on).
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let marker = format!(" {name}=\"");
    let start = tag.find(&marker)? + marker.len();
    let end = tag[start..].find('"')? + start;
    Some(&tag[start..end])
}

/// The text of each element in `html` whose class is exactly `class`, in document order.
fn texts<'a>(html: &'a str, class: &str) -> Vec<&'a str> {
    let marker = format!(" class=\"{class}\"");
    html.match_indices(&marker)
        .filter_map(|(at, _)| {
            let rest = &html[at..];
            let open = rest.find('>')? + 1;
            let close = rest[open..].find('<')? + open;
            Some(&rest[open..close])
        })
        .collect()
}

/// The table's rows (`<tr class=…` lines) of a dumped page.
fn rows(dom: &str) -> Vec<&str> {
    dom.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("<tr class="))
        .collect()
}

/// The one row whose subject cell is `subject`.
fn row<'a>(dom: &'a str, subject: &str) -> Result<&'a str> {
    let cell = format!("<td>{subject}</td>");
    let found: Vec<&str> = rows(dom)
        .into_iter()
        .filter(|r| r.contains(&cell))
        .collect();
    ensure!(
        found.len() == 1,
        "{} rows for {subject}:\n{dom}",
        found.len()
    );
    Ok(found[0])
}

fn date(text: &str) -> Result<time::Date> {
    time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .with_context(|| format!("{text:?} is not a YYYY-MM-DD date"))
}

/// "7 Dec", spelled independently of the issuer's code.
fn day_and_month(d: time::Date) -> String {
    format!("{} {}", d.day(), &format!("{:?}", d.month())[..3])
}

#[test]
fn the_dashboard_shows_days_left_true_date_ranges_a_y_axis_and_svid_labels_but_no_expired_certificates_by_default(
) -> Result<()> {
    let mut issuer = Issuer::start_with(add_short_profiles)?;
    let dir = tempfile::tempdir()?;
    let enroll =
        |subject: &str, label: &str| enroll_with_token(&issuer, dir.path(), subject, label);
    let (operator, operator_key) = enroll("alice-ops", "operator")?;
    for (subject, label) in [
        ("plc-1", "plc"),
        ("plc-2", "plc"),
        ("plc-3", "plc"),
        ("gw-1", "device"),
        ("gw-2", "device"),
        ("badge-1", "badge"),
        ("sensor-1", "sensor"),
    ] {
        enroll(subject, label)?;
    }
    // An agent attests and gets a node SVID (label node-svid, 1 hour), then goes away.
    let mut agent = Agent::start_with_join_token(&issuer, &issuer.join_token()?)?;
    agent.node_id()?;
    ensure!(
        agent.stop()?,
        "the agent did not stop cleanly:\n{}",
        agent.log()
    );
    let node_svids = issuer.inventory(&["--label", "node-svid"])?;
    ensure!(node_svids.len() == 1, "{node_svids:?}");
    // Two hours on, the issuer's clock says the node SVID has expired; nothing else has.
    issuer.serve_shifted("+2h")?;
    let issuer_today = (time::OffsetDateTime::now_utc() + time::Duration::hours(2)).date();

    let relay = Relay::start(&issuer, &operator, &operator_key)?;
    let profile = tempfile::tempdir()?;
    let url = format!("http://127.0.0.1:{}/ui", relay.port);
    let dom = chromium(profile.path(), &["--dump-dom", &url])?;

    // The default view: valid certificates only, so the expired node SVID is not in it...
    ensure!(
        !rows(&dom)
            .iter()
            .any(|r| r.contains(r#"data-label="node-svid""#)),
        "the expired node SVID is in the default view:\n{dom}"
    );
    ensure!(
        rows(&dom)
            .iter()
            .all(|r| r.starts_with(r#"<tr class="valid"#)),
        "the default view shows more than valid certificates:\n{dom}"
    );
    ensure!(
        dom.contains(r#"<option value="valid" selected"#),
        "the status filter does not show the default (valid) as chosen"
    );
    // ...but it is in the inventory, and status "any" (empty) shows it as expired.
    let any = chromium(
        profile.path(),
        &["--dump-dom", &format!("{url}?label=node-svid&status=")],
    )?;
    let expired: Vec<&str> = rows(&any);
    ensure!(
        expired.len() == 1
            && expired[0].starts_with(r#"<tr class="expired""#)
            && texts(expired[0], "days-left") == ["expired"],
        "the node SVID with status any: {expired:?}"
    );

    // The label filter offers every profile, the SVID ones too.
    for label in [
        "svid",
        "node-svid",
        "plc",
        "device",
        "badge",
        "sensor",
        "operator",
    ] {
        ensure!(
            dom.contains(&format!(r#"<option value="{label}">{label}</option>"#)),
            "the label filter has no {label}:\n{dom}"
        );
    }

    // Days left: a column, red under 7 days, amber under 30, the rest plain, soonest first.
    ensure!(
        dom.contains(r#"<th class="days-left">Days left</th>"#),
        "no days-left column"
    );
    let badge = row(&dom, "badge-1")?;
    ensure!(
        badge.contains("expires-red") && texts(badge, "days-left") == ["2"],
        "badge-1 (3 days, 2 hours gone): {badge}"
    );
    let sensor = row(&dom, "sensor-1")?;
    ensure!(
        sensor.contains("expires-amber") && texts(sensor, "days-left") == ["19"],
        "sensor-1 (20 days, 2 hours gone): {sensor}"
    );
    let plc = row(&dom, "plc-1")?;
    ensure!(
        !plc.contains("expires-") && texts(plc, "days-left") == ["729"],
        "plc-1 (730 days, 2 hours gone): {plc}"
    );
    let days: Vec<i64> = rows(&dom)
        .iter()
        .map(|r| texts(r, "days-left").concat().parse::<i64>())
        .collect::<Result<_, _>>()
        .context("a valid row's days left is not a number")?;
    ensure!(
        days.windows(2).all(|w| w[0] <= w[1]),
        "rows not sorted by expiry: {days:?}"
    );
    ensure!(
        dom.contains(r#"<b id="within-red">1</b>"#)
            && dom.contains(r#"<b id="within-amber">2</b>"#),
        "the summary does not count badge-1 under 7 days and sensor-1 under 30:\n{dom}"
    );

    // The chart: 30-day windows back to back from the issuer's today, each labelled by its
    // true first and last day, its total written above it.
    let buckets: Vec<&str> = dom.split(r#"<g class="bucket""#).skip(1).collect();
    ensure!(buckets.len() == 25, "{} windows:\n{dom}", buckets.len());
    let mut previous: Option<time::Date> = None;
    let mut max = 0;
    for bucket in &buckets {
        let bucket = &bucket[..bucket.find("</g>").context("unclosed window")?];
        let first = date(attribute(bucket, "data-first").context("data-first")?)?;
        let last = date(attribute(bucket, "data-last").context("data-last")?)?;
        ensure!(last - first == time::Duration::days(29), "{bucket}");
        match previous {
            Some(p) => ensure!(
                first == p + time::Duration::days(1),
                "a gap before {bucket}"
            ),
            None => ensure!(
                (first - issuer_today).whole_days().abs() <= 1,
                "the first window starts {first}, not the issuer's today ({issuer_today})"
            ),
        }
        previous = Some(last);
        let range = texts(bucket, "range").concat();
        let expected = format!("{} – {}", day_and_month(first), day_and_month(last));
        ensure!(
            range.starts_with(&expected),
            "window {first}..{last} is labelled {range:?}, not {expected:?}"
        );
        let count: usize = attribute(bucket, "data-count")
            .context("data-count")?
            .parse()?;
        let bars: usize = bucket
            .split(r#"<rect class="bar""#)
            .skip(1)
            .map(|bar| attribute(bar, "data-count").unwrap_or("0").parse::<usize>())
            .sum::<Result<_, _>>()?;
        ensure!(bars == count, "{bucket}");
        let written: Vec<&str> = texts(bucket, "count");
        let want: Vec<String> = (count > 0).then(|| count.to_string()).into_iter().collect();
        ensure!(
            written == want,
            "window {first}: total {count}, written {written:?}"
        );
        max = max.max(count);
    }
    let first_year = date(attribute(buckets[0], "data-last").context("data-last")?)?.year();
    ensure!(
        texts(buckets[0], "range")
            .concat()
            .ends_with(&format!(" {first_year}")),
        "the first window's label does not give its year"
    );
    // badge-1 and sensor-1 expire in the first window.
    ensure!(
        buckets[0].contains(r#"data-label="badge""#)
            && buckets[0].contains(r#"data-label="sensor""#),
        "the first window: {}",
        buckets[0]
    );

    // The y axis: round ticks from 0, evenly spaced, up to at least the tallest bar.
    let ticks: Vec<usize> = texts(&dom, "tick")
        .iter()
        .map(|t| t.parse::<usize>())
        .collect::<Result<_, _>>()
        .context("a y-axis tick is not a number")?;
    ensure!(
        ticks.len() >= 2
            && ticks[0] == 0
            && ticks.windows(2).all(|w| w[1] - w[0] == ticks[1])
            && ticks.last().is_some_and(|top| *top >= max),
        "y-axis ticks {ticks:?} for a tallest bar of {max}"
    );

    // What an operator sees with soon-expiring rows: a screenshot for a person to look at.
    let shots = artifacts();
    std::fs::create_dir_all(&shots)?;
    let png = shots.join("dashboard-expiries.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1100",
            &url,
        ],
    )?;
    ensure!(png.exists(), "no screenshot at {}", png.display());
    Ok(())
}
