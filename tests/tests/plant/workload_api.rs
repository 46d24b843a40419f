//! The Workload API journey: an issuer, an agent that attests with a join token, and
//! workloads using clients nobody here wrote (the `spiffe` crate's `X509Source` and
//! `JwtSource`, openssl) against the agent's socket.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use der::{Decode, Encode};
use plant_tests::{openssl, run_ok, Agent, Issuer};
use spiffe::{JwtSource, JwtSvid, WorkloadApiClient, X509Source};

const HISTORIAN: &str = "spiffe://plant.example/historian";

/// An attested agent with one entry, for this test process's uid, with a 20 s X509-SVID.
fn agent_with_entry(issuer: &Issuer) -> Result<Agent> {
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(issuer, &token)?;
    let node = agent.node_id()?;
    ensure!(
        node.starts_with("spiffe://plant.example/agent/join_token/"),
        "node {node}"
    );
    issuer.create_entry(
        HISTORIAN,
        &node,
        &[&format!("unix:uid:{}", plant_tests::own_uid()?)],
        &["--ttl", "20s"],
    )?;
    agent.wait_for_svid(HISTORIAN)?;
    Ok(agent)
}

fn leaf_serial(svid: &spiffe::X509Svid) -> Result<Vec<u8>> {
    let leaf = x509_cert::Certificate::from_der(svid.leaf().as_ref())?;
    Ok(leaf.tbs_certificate.serial_number.as_bytes().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_gets_a_chaining_svid_with_its_key_and_sees_it_rotate() -> Result<()> {
    let issuer = Issuer::start()?;
    let mut agent = agent_with_entry(&issuer)?;
    let endpoint = format!("unix://{}", agent.socket.display());
    let source = X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .with_context(|| format!("X509Source against the agent:\n{}", agent.log()))?;
    let svid = source.svid()?;
    assert_eq!(svid.spiffe_id().to_string(), HISTORIAN);

    // The key is the leaf's.
    let leaf = x509_cert::Certificate::from_der(svid.leaf().as_ref())?;
    let leaf_spki = leaf.tbs_certificate.subject_public_key_info.to_der()?;
    let key = rcgen::KeyPair::try_from(svid.private_key().as_ref())?;
    assert_eq!(
        leaf_spki,
        rcgen::PublicKeyData::subject_public_key_info(&key),
        "x509_svid_key does not match the leaf"
    );

    // The leaf chains to the bundle, by openssl.
    let td = spiffe::TrustDomain::new("plant.example")?;
    let bundle = source
        .try_bundle_for_trust_domain(&td)
        .context("no bundle for plant.example")?;
    let dir = tempfile::tempdir()?;
    let pem = |ders: &[&[u8]]| {
        ders.iter()
            .map(|der| {
                let b64 = base64_lines(der);
                format!("-----BEGIN CERTIFICATE-----\n{b64}-----END CERTIFICATE-----\n")
            })
            .collect::<String>()
    };
    let roots: Vec<&[u8]> = bundle.authorities().iter().map(AsRef::as_ref).collect();
    std::fs::write(dir.path().join("bundle.pem"), pem(&roots))?;
    std::fs::write(dir.path().join("leaf.pem"), pem(&[svid.leaf().as_ref()]))?;
    let intermediates: Vec<&[u8]> = svid.cert_chain()[1..].iter().map(AsRef::as_ref).collect();
    std::fs::write(dir.path().join("chain.pem"), pem(&intermediates))?;
    let mut verify = vec!["verify", "-CAfile"];
    let bundle_path = dir.path().join("bundle.pem").display().to_string();
    let chain_path = dir.path().join("chain.pem").display().to_string();
    let leaf_path = dir.path().join("leaf.pem").display().to_string();
    verify.push(&bundle_path);
    if !intermediates.is_empty() {
        verify.extend(["-untrusted", &chain_path]);
    }
    verify.push(&leaf_path);
    let out = openssl(&verify)?;
    assert!(out.contains("OK"), "openssl verify: {out}");

    // A rotation (20 s TTL: due at about 10 s) reaches the source by itself.
    let first = leaf_serial(&svid)?;
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(45), updates.changed())
        .await
        .with_context(|| format!("no rotation within 45 s:\n{}", agent.log()))??;
    let rotated = source.svid()?;
    assert_eq!(rotated.spiffe_id().to_string(), HISTORIAN);
    assert_ne!(
        leaf_serial(&rotated)?,
        first,
        "a new certificate after rotation"
    );
    // Rotation happens at half life, not in a loop: right after the first rotation the
    // issuer has minted two or three of them, not dozens.
    let minted = issuer
        .inventory(&[])?
        .iter()
        .filter(|row| row.to_string().contains(HISTORIAN))
        .count();
    assert!(
        (2..=3).contains(&minted),
        "{minted} SVIDs minted for {HISTORIAN}"
    );

    // /metrics counts the rotation and shows the cache and the node SVID's expiry.
    let text = agent.metrics()?;
    let value = |series: &str| {
        plant_tests::metric(&text, series).with_context(|| format!("{series} missing:\n{text}"))
    };
    assert!(value("plant_agent_svid_rotations_total")? >= 1.0, "{text}");
    assert!(
        value("plant_agent_svids_minted_total{kind=\"x509\"}")? >= 2.0,
        "{text}"
    );
    assert_eq!(value("plant_agent_svids")?, 1.0, "{text}");
    assert_eq!(value("plant_agent_entries")?, 1.0, "{text}");
    assert_eq!(
        value("plant_agent_node_attestations_total{outcome=\"ok\"}")?,
        1.0,
        "{text}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let expiry = value("plant_agent_node_svid_expiry_timestamp_seconds")?;
    assert!(
        expiry > now && expiry < now + 400.0 * 86_400.0,
        "node expiry {expiry} vs now {now}"
    );

    // `agent status` shows the node, the entry and its schedule.
    let status = agent.status()?;
    assert!(status.contains(HISTORIAN), "{status}");
    assert!(status.contains("next rotation"), "{status}");

    source.shutdown().await;
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    assert!(!agent.socket.exists(), "socket removed on shutdown");

    // A restart needs no new join token (the one in agent.toml is spent): the node SVID and
    // its key were kept in the state directory.
    let node = agent.node_id()?;
    std::fs::remove_file(agent.dir.path().join("state/status.json"))?;
    agent.run()?;
    assert_eq!(agent.node_id()?, node);
    agent.wait_for_svid(HISTORIAN)?;
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:
{}",
        agent.log()
    );
    Ok(())
}

/// The join token is spent by the first attestation, and the node identity is then cached
/// in the state directory: a restart must need neither the token nor its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_agent_restarts_from_its_cached_identity_after_the_token_file_is_deleted(
) -> Result<()> {
    let issuer = Issuer::start()?;
    let mut agent = agent_with_entry(&issuer)?;
    let node = agent.node_id()?;
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    std::fs::remove_file(agent.dir.path().join("join.token"))?;

    // `agent status` reads the config, which names the deleted file: not running, exit 3.
    let stopped = plant_tests::run(
        Command::new(plant_tests::bin("agent"))
            .args(["status", "--config"])
            .arg(agent.config()),
    )?;
    let text = String::from_utf8_lossy(&stopped.stdout);
    ensure!(stopped.status.code() == Some(3), "{stopped:?}");
    ensure!(
        text.contains("NOT RUNNING") && text.contains(&node),
        "{text}"
    );

    std::fs::remove_file(agent.dir.path().join("state/status.json"))?;
    agent.run()?;
    assert_eq!(agent.node_id()?, node);
    agent.wait_for_svid(HISTORIAN)?;
    let client =
        WorkloadApiClient::connect_to(&format!("unix://{}", agent.socket.display())).await?;
    let svid = client
        .fetch_x509_svid()
        .await
        .with_context(|| format!("FetchX509SVID after the restart:\n{}", agent.log()))?;
    assert_eq!(svid.spiffe_id().to_string(), HISTORIAN);
    let status = agent.status()?;
    ensure!(
        status.contains(&node) && status.contains(HISTORIAN),
        "{status}"
    );
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    Ok(())
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    text.as_bytes()
        .chunks(64)
        .map(|line| format!("{}\n", String::from_utf8_lossy(line)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_source_gets_a_jwt_svid_that_validates() -> Result<()> {
    let issuer = Issuer::start()?;
    let agent = agent_with_entry(&issuer)?;
    let endpoint = format!("unix://{}", agent.socket.display());
    let source = JwtSource::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .with_context(|| format!("JwtSource against the agent:\n{}", agent.log()))?;
    let jwt = source.fetch_jwt_svid(["scada"]).await?;
    assert_eq!(jwt.spiffe_id().to_string(), HISTORIAN);
    // Checked locally against the JWT bundle by the spiffe crate (signature, aud, exp)…
    let validated = JwtSvid::parse_and_validate(jwt.token(), &source, &["scada"])?;
    assert_eq!(validated.spiffe_id().to_string(), HISTORIAN);
    assert!(JwtSvid::parse_and_validate(jwt.token(), &source, &["other"]).is_err());
    // …and by the agent's ValidateJWTSVID.
    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    let checked = client.validate_jwt_token("scada", jwt.token()).await?;
    assert_eq!(checked.spiffe_id().to_string(), HISTORIAN);
    assert!(client
        .validate_jwt_token("other", jwt.token())
        .await
        .is_err());
    // The agent caches a JWT-SVID per identity and audience until half its life: asking
    // again at once gives the same token, another audience a new one.
    let again = client.fetch_jwt_token(["scada"], None).await?;
    let other = client.fetch_jwt_token(["historian-ui"], None).await?;
    assert_eq!(client.fetch_jwt_token(["scada"], None).await?, again);
    assert_ne!(other, again);
    let other = client.validate_jwt_token("historian-ui", &other).await?;
    assert_eq!(other.spiffe_id().to_string(), HISTORIAN);
    source.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_header_is_invalid_and_an_unknown_uid_is_denied() -> Result<()> {
    let issuer = Issuer::start()?;
    let agent = agent_with_entry(&issuer)?;

    let mut client = plant_tests::workload_client(&agent.socket).await?;
    let status = client
        .fetch_x509svid(plant_tests::x509_request(false))
        .await
        .expect_err("no header");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // The same call as another user, who has no entry.
    let probe = env!("CARGO_BIN_EXE_workload_probe");
    let out = run_ok(Command::new(probe).arg(&agent.socket).uid(65534).gid(65534))?;
    assert_eq!(out.trim(), "status PermissionDenied", "{}", agent.log());
    // And as this test's own user, who has one.
    let out = run_ok(Command::new(probe).arg(&agent.socket))?;
    assert_eq!(out.trim(), format!("ok {HISTORIAN}"));

    // /metrics counts each answer by method and gRPC code.
    let text = agent.metrics()?;
    let requests = |code: &str| {
        plant_tests::metric(
            &text,
            &format!("plant_agent_workload_api_requests_total{{method=\"FetchX509SVID\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(requests("InvalidArgument"), Some(1.0), "{text}");
    assert_eq!(requests("PermissionDenied"), Some(1.0), "{text}");
    assert_eq!(requests("OK"), Some(1.0), "{text}");
    Ok(())
}

/// Waits until status.json reports an error (e.g. a failed rotation while the issuer is down).
fn wait_for_error(agent: &Agent) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        let text = std::fs::read_to_string(agent.dir.path().join("state/status.json"))?;
        let status: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(error) = status["last_error"].as_str() {
            return Ok(error.to_owned());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no error reported with the issuer down:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_agent_keeps_serving_through_an_issuer_outage() -> Result<()> {
    let mut issuer = Issuer::start()?;
    // A gateway enrolled over EST, as at commissioning, by the real `agent enroll`.
    let device = tempfile::tempdir()?;
    let token = issuer.token("plc", Some("gw-1"))?;
    let fingerprint = issuer.fingerprint()?;
    run_ok(
        Command::new(plant_tests::bin("agent"))
            .args(["enroll", "--server", &issuer.url, "--ca-fingerprint"])
            .arg(&fingerprint)
            .args([
                "--token",
                &token,
                "--subject",
                "gw-1",
                "--label",
                "plc",
                "--out",
            ])
            .arg(device.path()),
    )?;
    let attestation = format!(
        "method = \"x509pop\"\ncertificate = \"{}\"\n",
        device.path().join("cert.pem").display()
    );
    let mut agent = Agent::start(&issuer, &attestation, &[])?;
    assert_eq!(
        agent.node_id()?,
        "spiffe://plant.example/agent/x509pop/gw-1"
    );
    issuer.create_entry(
        HISTORIAN,
        "spiffe://plant.example/agent/x509pop/gw-1",
        &[&format!("unix:uid:{}", plant_tests::own_uid()?)],
        &["--ttl", "20s"],
    )?;
    agent.wait_for_svid(HISTORIAN)?;
    let endpoint = format!("unix://{}", agent.socket.display());
    let source = X509Source::builder().endpoint(&endpoint).build().await?;
    let first = leaf_serial(source.svid()?.as_ref())?;
    let mut updates = source.updated();

    // The issuer goes away; the agent's next sync or rotation fails…
    issuer.kill()?;
    let error = wait_for_error(&agent)?;
    assert!(!error.is_empty());
    // …and it keeps serving the SVID it holds, to running and new clients alike.
    assert_eq!(leaf_serial(source.svid()?.as_ref())?, first);
    let probe = env!("CARGO_BIN_EXE_workload_probe");
    let out = run_ok(Command::new(probe).arg(&agent.socket))?;
    assert_eq!(out.trim(), format!("ok {HISTORIAN}"), "{}", agent.log());

    // The issuer comes back on the same address; the agent's retries get a new SVID.
    issuer.serve_on_the_same_agent_api()?;
    tokio::time::timeout(Duration::from_secs(45), updates.changed())
        .await
        .with_context(|| format!("no new SVID after the issuer returned:\n{}", agent.log()))??;
    assert_ne!(leaf_serial(source.svid()?.as_ref())?, first);
    source.shutdown().await;
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_node_renews_and_attests_again_after_its_svid_lapsed() -> Result<()> {
    // 15 s node SVIDs: renewed at about 7.5 s, lapsed 15 s after an outage begins.
    let mut issuer = Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?;
        let text = text.replacen("node_svid_ttl = \"1h\"", "node_svid_ttl = \"15s\"", 1);
        std::fs::write(toml, text)?;
        Ok(())
    })?;
    let device = tempfile::tempdir()?;
    let token = issuer.token("plc", Some("gw-2"))?;
    let fingerprint = issuer.fingerprint()?;
    run_ok(
        Command::new(plant_tests::bin("agent"))
            .args(["enroll", "--server", &issuer.url, "--ca-fingerprint"])
            .arg(&fingerprint)
            .args([
                "--token",
                &token,
                "--subject",
                "gw-2",
                "--label",
                "plc",
                "--out",
            ])
            .arg(device.path()),
    )?;
    let attestation = format!(
        "method = \"x509pop\"\ncertificate = \"{}\"\n",
        device.path().join("cert.pem").display()
    );
    let mut agent = Agent::start(&issuer, &attestation, &[])?;
    assert_eq!(
        agent.node_id()?,
        "spiffe://plant.example/agent/x509pop/gw-2"
    );
    let (first, _) = agent.node_status()?;

    // Renewal over mTLS with the current node SVID.
    agent.wait_status("node SVID renewed", |(expires, _)| expires != &first)?;
    let (renewed, _) = agent.node_status()?;

    // The issuer goes away long enough for the node SVID to lapse; the agent then tries to
    // attest again by itself, and succeeds once the issuer is back on the same address.
    issuer.kill()?;
    agent.wait_status("attestation retried after the lapse", |(_, error)| {
        error.as_deref().is_some_and(|e| e.contains("attesting"))
    })?;
    issuer.serve_on_the_same_agent_api()?;
    agent.wait_status("attested again", |(expires, error)| {
        expires.is_some() && expires != &renewed && error.is_none()
    })?;
    assert_eq!(
        agent.node_id()?,
        "spiffe://plant.example/agent/x509pop/gw-2"
    );
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    Ok(())
}

/// Open descriptors and resident memory (KiB) of a process.
fn descriptors_and_rss(pid: u32) -> Result<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok((fds, rss))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_leave_the_agent_as_it_was() -> Result<()> {
    let issuer = Issuer::start()?;
    let agent = agent_with_entry(&issuer)?;
    let pid = agent.pid().context("agent pid")?;
    // Warm up (first-time allocations, the executable's digest), then measure.
    for _ in 0..20 {
        let mut client = plant_tests::workload_client(&agent.socket).await?;
        let mut stream = client
            .fetch_x509svid(plant_tests::x509_request(true))
            .await?
            .into_inner();
        stream.message().await?.context("first message")?;
    }
    let (fds_before, rss_before) = descriptors_and_rss(pid)?;
    for _ in 0..1000 {
        let mut client = plant_tests::workload_client(&agent.socket).await?;
        let mut stream = client
            .fetch_x509svid(plant_tests::x509_request(true))
            .await?
            .into_inner();
        let message = stream.message().await?.context("first message")?;
        ensure!(message.svids.len() == 1);
    }
    // The agent closes its side once it sees each client go; give it a moment to.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (fds_after, rss_after) = loop {
        let (fds, rss) = descriptors_and_rss(pid)?;
        if fds <= fds_before || std::time::Instant::now() > deadline {
            break (fds, rss);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        fds_after <= fds_before,
        "open descriptors {fds_before} → {fds_after} after 1,000 connections"
    );
    // Flat within allocator noise: a leak of even 8 KiB a connection would show as 8 MiB.
    assert!(
        rss_after <= rss_before + 4096,
        "resident memory {rss_before} KiB → {rss_after} KiB after 1,000 connections"
    );
    Ok(())
}

fn python() -> Result<std::path::PathBuf> {
    let python = std::env::var("PLANT_PYTHON")
        .context("PLANT_PYTHON must point at a Python 3 (scripts/test sets it up)")?;
    Ok(python.into())
}

/// The executable the kernel reports for a process running `program` (symlinks resolved
/// as /proc/<pid>/exe resolves them), which is what `unix:path` selects.
fn executable_of(program: &std::path::Path, args: &[&str]) -> Result<String> {
    let mut child = Command::new(program).args(args).spawn()?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", child.id()));
    child.kill()?;
    child.wait()?;
    Ok(exe?.display().to_string())
}

/// An attested agent with entries `(spiffe_id, selectors)`, each SVID minted.
fn agent_with_entries(issuer: &Issuer, entries: &[(&str, Vec<String>)]) -> Result<Agent> {
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(issuer, &token)?;
    let node = agent.node_id()?;
    for (id, selectors) in entries {
        let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
        issuer.create_entry(id, &node, &selectors, &[])?;
        agent.wait_for_svid(id)?;
    }
    Ok(agent)
}

/// The first X509-SVID's SPIFFE ID the caller gets, or the gRPC code it is refused with.
async fn fetch_once(
    client: &mut proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    >,
) -> Result<std::result::Result<String, tonic::Status>> {
    let response = match client.fetch_x509svid(plant_tests::x509_request(true)).await {
        Ok(response) => response,
        Err(status) => return Ok(Err(status)),
    };
    let mut stream = response.into_inner();
    Ok(match stream.message().await {
        Ok(Some(message)) => Ok(message
            .svids
            .first()
            .map(|s| s.spiffe_id.clone())
            .unwrap_or_default()),
        Ok(None) => Err(tonic::Status::unknown("the stream ended without a message")),
        Err(status) => Err(status),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_another_binary_after_connecting_is_not_attested_as_it() -> Result<()>
{
    let issuer = Issuer::start()?;
    let uid = plant_tests::own_uid()?;
    let python = python()?;
    let python_exe = executable_of(&python, &["-c", "import time; time.sleep(30)"])?;
    let sleep_exe = executable_of(std::path::Path::new("sleep"), &["30"])?;
    // The victim: whatever runs `sleep` as this uid. The attacker: Python as this uid.
    let victim = "spiffe://plant.example/victim";
    let python_id = "spiffe://plant.example/python-workload";
    let agent = agent_with_entries(
        &issuer,
        &[
            (
                victim,
                vec![format!("unix:uid:{uid}"), format!("unix:path:{sleep_exe}")],
            ),
            (
                python_id,
                vec![format!("unix:uid:{uid}"), format!("unix:path:{python_exe}")],
            ),
        ],
    )?;
    let dir = tempfile::tempdir()?;
    let relay = dir.path().join("relay.sock");
    let mut attacker = Command::new(&python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/exec_after_connect.py"))
        .arg(&agent.socket)
        .arg(&relay)
        .arg(&sleep_exe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let result = async {
        use std::io::{BufRead, Write};
        let mut line = String::new();
        std::io::BufReader::new(attacker.stdout.take().context("stdout")?)
            .read_line(&mut line)?;
        let pid: u32 = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("exec_after_connect.py printed {line:?}"))?;
        // The connecting process, as itself: Python's identity. This also shows the agent
        // has accepted the connection before anything is exec'd.
        let mut client = plant_tests::workload_client(&relay).await?;
        let first = fetch_once(&mut client).await?;
        assert_eq!(
            first.as_deref().map_err(tonic::Status::code),
            Ok(python_id),
            "{}",
            agent.log()
        );
        // Now the process that connected execs `sleep`: same pid, same connection.
        let mut stdin = attacker.stdin.take().context("stdin")?;
        writeln!(stdin, "exec")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::fs::read_link(format!("/proc/{pid}/exe"))?.display().to_string() != sleep_exe
        {
            ensure!(std::time::Instant::now() < deadline, "the child never exec'd");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let second = fetch_once(&mut client).await?;
        assert_ne!(
            second.as_deref().ok(),
            Some(victim),
            "the victim's SVID went to a connection made by Python, which then exec'd the victim's binary"
        );
        assert_eq!(
            second.as_ref().map_err(tonic::Status::code),
            Err(tonic::Code::PermissionDenied),
            "{second:?}"
        );
        let log = agent.log();
        assert!(log.contains("exec after connect"), "{log}");
        drop(stdin);
        anyhow::Ok(())
    }
    .await;
    let _ = attacker.kill();
    let _ = attacker.wait();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_in_its_own_user_and_mount_namespace_is_not_attested_by_path() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // An unprivileged user (nobody) may make a user namespace and, in it, a mount namespace
    // where it mounts a program of its own over any path. Check that this machine allows it.
    let allowed = Command::new("unshare")
        .args(["-Urm", "true"])
        .uid(65534)
        .gid(65534)
        .status()?;
    ensure!(
        allowed.success(),
        "unshare -Urm as nobody failed here: unprivileged user namespaces are off"
    );
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    // The victim program (a copy of the probe, so that it can talk to the agent) and the
    // attacker's own program (another copy: any program of theirs would do).
    let probe = env!("CARGO_BIN_EXE_workload_probe");
    let victim_exe = dir.path().join("victim");
    let evil_exe = dir.path().join("evil");
    for copy in [&victim_exe, &evil_exe] {
        std::fs::copy(probe, copy)?;
        std::fs::set_permissions(copy, std::fs::Permissions::from_mode(0o755))?;
    }
    let victim_exe = victim_exe.display().to_string();
    let victim = "spiffe://plant.example/victim";
    let issuer = Issuer::start()?;
    let agent = agent_with_entries(
        &issuer,
        &[(
            victim,
            vec![
                "unix:uid:65534".to_owned(),
                format!("unix:path:{victim_exe}"),
            ],
        )],
    )?;
    // The victim itself, as nobody, gets its identity.
    let out = run_ok(
        Command::new(&victim_exe)
            .arg(&agent.socket)
            .uid(65534)
            .gid(65534),
    )?;
    assert_eq!(out.trim(), format!("ok {victim}"), "{}", agent.log());
    // The attacker, also nobody, mounts its program over the victim's path in a namespace of
    // its own and runs it from there: /proc/<pid>/exe names the victim's path.
    let script = format!(
        "mount --bind {evil} {victim_exe} && exec {victim_exe} {socket}",
        evil = evil_exe.display(),
        socket = agent.socket.display()
    );
    let out = run_ok(
        Command::new("unshare")
            .args(["-Urm", "sh", "-c", &script])
            .uid(65534)
            .gid(65534),
    )?;
    assert_eq!(
        out.trim(),
        "status PermissionDenied",
        "a program mounted over the victim's path in another mount namespace got: {out}\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("another mount or user namespace"), "{log}");
    Ok(())
}

#[test]
fn an_entry_that_names_no_user_is_refused_with_the_reason() -> Result<()> {
    let issuer = Issuer::start()?;
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(&issuer, &token)?;
    let node = agent.node_id()?;
    for selectors in [
        &["unix:path:/usr/bin/historian"][..],
        &[
            "unix:path:/usr/bin/historian",
            "unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
    ] {
        let mut command = issuer.cli();
        command.args([
            "entry",
            "create",
            "--spiffe-id",
            HISTORIAN,
            "--parent",
            &node,
        ]);
        for selector in selectors {
            command.args(["--selector", selector]);
        }
        let out = plant_tests::run(&mut command)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "an entry with {selectors:?} was created: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains("name no user") && stderr.contains("unix:uid"),
            "{stderr}"
        );
    }
    // With a user it is fine, and so is a legacy device's entry, which no process matches.
    issuer.create_entry(
        HISTORIAN,
        &node,
        &["unix:user:root", "unix:path:/usr/bin/historian"],
        &[],
    )?;
    issuer.create_entry(
        "spiffe://plant.example/plc/press-9",
        &node,
        &["legacy:device:press-9"],
        &[],
    )?;
    Ok(())
}

/// The SPIFFE IDs and leaf serials a workload gets from one FetchX509SVID (the `spiffe`
/// crate's client), sorted by ID.
async fn fetched(agent: &Agent) -> Result<Vec<(String, Vec<u8>)>> {
    let client =
        WorkloadApiClient::connect_to(&format!("unix://{}", agent.socket.display())).await?;
    let context = tokio::time::timeout(Duration::from_secs(10), client.fetch_x509_context())
        .await
        .with_context(|| format!("FetchX509SVID unanswered after 10 s:\n{}", agent.log()))?
        .with_context(|| format!("FetchX509SVID:\n{}", agent.log()))?;
    let mut svids = context
        .svids()
        .iter()
        .map(|svid| Ok((svid.spiffe_id().to_string(), leaf_serial(svid)?)))
        .collect::<Result<Vec<_>>>()?;
    svids.sort();
    Ok(svids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_during_an_issuer_outage_serves_its_saved_cache_then_reconciles(
) -> Result<()> {
    const SCADA: &str = "spiffe://plant.example/scada";
    let mut issuer = Issuer::start()?;
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(&issuer, &token)?;
    let node = agent.node_id()?;
    let uid = format!("unix:uid:{}", plant_tests::own_uid()?);
    issuer.create_entry(HISTORIAN, &node, &[&uid], &["--ttl", "10m"])?;
    let scada = issuer.create_entry(SCADA, &node, &[&uid], &["--ttl", "10m"])?;
    agent.wait_for_svid(HISTORIAN)?;
    agent.wait_for_svid(SCADA)?;
    let before = fetched(&agent).await?;
    assert_eq!(before.len(), 2, "{before:?}");
    // Saved as it changes: both SVID files are there (owner-only) before the power cut.
    let svids = agent.dir.path().join("state/cache/svids");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while plant_tests::saved_svid_files(&svids).len() < 2 {
        ensure!(
            std::time::Instant::now() < deadline,
            "no saved SVIDs in {}:\n{}",
            svids.display(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for file in plant_tests::saved_svid_files(&svids) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    // A power cut takes the gateway down; while it is down the operator deletes the scada
    // entry, then the network to the issuer goes too.
    agent.kill()?;
    run_ok(issuer.cli().args(["entry", "delete", &scada]))?;
    issuer.kill()?;

    // The gateway comes back with no issuer to reach: its workloads get what it held.
    let started = std::time::Instant::now();
    agent.run()?;
    let served = fetched(&agent).await?;
    let took = started.elapsed();
    assert_eq!(served, before, "the saved SVIDs, the same certificates");
    println!("SVIDs served from the saved cache {took:?} after `agent run` started");
    let status = agent.status()?;
    ensure!(status.contains("SERVING THE SAVED CACHE"), "{status}");
    let text = agent.metrics()?;
    assert_eq!(
        plant_tests::metric(&text, "plant_agent_serving_from_cache"),
        Some(1.0),
        "{text}"
    );

    // The issuer is back: the agent syncs, drops the deleted entry's SVID and says it no
    // longer serves the cache.
    issuer.serve_on_the_same_agent_api()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        let now = fetched(&agent).await?;
        if now.len() == 1 {
            assert_eq!(now[0], before[0], "the historian SVID stays");
            assert_eq!(now[0].0, HISTORIAN);
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the deleted entry is still served: {now:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = agent.status()?;
    ensure!(!status.contains("SAVED CACHE"), "{status}");
    let text = agent.metrics()?;
    assert_eq!(
        plant_tests::metric(&text, "plant_agent_serving_from_cache"),
        Some(0.0),
        "{text}"
    );
    ensure!(
        !svids.join(format!("{scada}.json")).exists(),
        "the deleted entry's SVID file is removed"
    );
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    Ok(())
}

/// Where this machine mounts the cgroup hierarchy systemd keeps its units in: `name=systemd`
/// (cgroup v1, hybrid), else the unified one. `None` with the reason when there is none.
fn systemd_cgroup_mount() -> std::result::Result<std::path::PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mut unified = None;
    for line in mountinfo.lines() {
        // "… mount-point options - fstype source super-options"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let options = right.nth(1).unwrap_or_default();
        if fstype == "cgroup" && options.split(',').any(|o| o == "name=systemd") {
            return Ok(point.into());
        }
        if fstype == "cgroup2" {
            unified = Some(point.into());
        }
    }
    unified.ok_or_else(|| "no cgroup hierarchy is mounted".to_owned())
}

#[test]
fn systemd_unit_and_docker_id_select_processes_by_their_cgroup() -> Result<()> {
    // The test puts the probe into cgroups it creates, named as systemd names a service and
    // as docker's systemd driver names a container: that needs root and a writable hierarchy.
    let mount = match systemd_cgroup_mount() {
        Ok(mount) => mount,
        Err(why) => {
            println!("SKIPPED: cgroup selectors can't be tried here: {why}");
            return Ok(());
        }
    };
    let slice = mount.join(format!("plant-test-{}.slice", std::process::id()));
    if let Err(e) = std::fs::create_dir(&slice) {
        println!(
            "SKIPPED: cgroup selectors can't be tried here: creating {} failed ({e}); the test needs root",
            slice.display()
        );
        return Ok(());
    }
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for dir in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(dir.path());
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cleanup = Cleanup(slice.clone());
    let service = format!("historian-{}.service", std::process::id());
    let container_id = hex::encode(rand::random::<[u8; 32]>());
    let scope = format!("docker-{container_id}.scope");
    for unit in [&service, &scope] {
        std::fs::create_dir(slice.join(unit))?;
    }

    let uid = format!("unix:uid:{}", plant_tests::own_uid()?);
    let issuer = Issuer::start()?;
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(&issuer, &token)?;
    let node = agent.node_id()?;
    let by_unit = "spiffe://plant.example/by-unit";
    let by_container = "spiffe://plant.example/by-container";
    issuer.create_entry(
        by_unit,
        &node,
        &[&uid, &format!("systemd:unit:{service}")],
        &[],
    )?;
    issuer.create_entry(
        by_container,
        &node,
        &[&uid, &format!("docker:id:{container_id}")],
        &[],
    )?;
    agent.wait_for_svid(by_unit)?;
    agent.wait_for_svid(by_container)?;

    // The probe, moved into `cgroup` (or left where the test runs) before it calls.
    let probe = |cgroup: Option<&str>| -> Result<String> {
        let socket = agent.socket.display().to_string();
        let probe = env!("CARGO_BIN_EXE_workload_probe");
        let out = match cgroup {
            Some(name) => {
                let procs = slice.join(name).join("cgroup.procs");
                run_ok(Command::new("sh").args([
                    "-c",
                    &format!("echo $$ > {} && exec {probe} {socket}", procs.display()),
                ]))?
            }
            None => run_ok(Command::new(probe).arg(&socket))?,
        };
        Ok(out.trim().to_owned())
    };
    assert_eq!(
        probe(Some(&service))?,
        format!("ok {by_unit}"),
        "{}",
        agent.log()
    );
    assert_eq!(
        probe(Some(&scope))?,
        format!("ok {by_container}"),
        "{}",
        agent.log()
    );
    // Outside both: same user, same executable, neither entry.
    assert_eq!(probe(None)?, "status PermissionDenied", "{}", agent.log());

    // An entry no agent could ever match is refused when it is created.
    let refused = plant_tests::run(issuer.cli().args([
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://plant.example/never",
        "--parent",
        &node,
        "--selector",
        &uid,
        "--selector",
        "systemd:unit:mosquitto",
    ]))?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "created: {stderr}");
    ensure!(
        stderr.contains("\"mosquitto\" is not a unit a process runs in")
            && stderr.contains("systemd:unit:mosquitto.service"),
        "{stderr}"
    );
    Ok(())
}
