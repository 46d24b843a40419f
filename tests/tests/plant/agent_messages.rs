//! What `agent` tells the engineer when something is wrong or missing: its help, its config
//! errors, refusals of a renewal, and a `--server` that is the wrong port. Each message must
//! name only things that exist.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plant_tests::{bin, run, run_ok, Issuer};

fn agent() -> Command {
    Command::new(bin("agent"))
}

/// The `--options` a text names.
fn options_named(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(|word| word.trim_end_matches('-').to_owned())
        .collect()
}

/// An agent.toml in `dir` for a join-token node of an issuer at `server` (trusting a
/// throwaway CA: these agents never get as far as a handshake).
fn agent_toml(dir: &Path, server: &str, attestation: &str) -> Result<std::path::PathBuf> {
    let ca = rcgen::CertificateParams::default().self_signed(&rcgen::KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"{server}\"\ntrust_bundle = \"ca.pem\"\ntrust_domain = \"plant.example\"\nstate_dir = \"state\"\nsocket = \"{socket}\"\n\n[attestation]\n{attestation}\n",
            socket = dir.join("workload.sock").display(),
        ),
    )?;
    Ok(config)
}

/// Runs `command` to its end, killing it after 60 s (a daemon that should have exited).
fn run_to_exit(command: &mut Command) -> Result<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            let output = child.wait_with_output()?;
            bail!(
                "{command:?} still ran after 60 s:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

#[test]
fn a_join_token_node_with_no_cached_identity_and_no_token_file_says_how_to_get_a_token(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = agent_toml(
        dir.path(),
        // Nothing listens: the token is needed before the issuer is asked anything.
        "https://127.0.0.1:1",
        "method = \"join_token\"\njoin_token_file = \"join.token\"",
    )?;
    let output = run_to_exit(agent().args(["run", "--config"]).arg(&config))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.code() == Some(64), "{output:?}");
    let expected = format!(
        "{}: attestation.join_token_file: no cached node identity and join_token_file {} does not exist: create a token with `issuer token create --kind join`",
        config.display(),
        dir.path().join("join.token").display()
    );
    ensure!(stderr.contains(&expected), "{stderr}");
    // Said before anything was started.
    ensure!(!dir.path().join("state").exists(), "{stderr}");
    Ok(())
}

#[test]
fn a_bad_agent_toml_exits_64_naming_the_file_and_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = agent_toml(
        dir.path(),
        "https://127.0.0.1:1",
        "method = \"join_token\"\njoin_token = \"tok\"\ntokn_file = \"x\"",
    )?;
    for command in ["run", "status"] {
        let output = run(agent().args([command, "--config"]).arg(&config))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(output.status.code() == Some(64), "{command}: {output:?}");
        ensure!(
            stderr.contains(&format!(
                "{}: attestation.tokn_file: unknown field `tokn_file`",
                config.display()
            )),
            "{command}: {stderr}"
        );
        ensure!(stderr.contains("line 10"), "{command}: {stderr}");
    }
    Ok(())
}

#[test]
fn agent_enroll_help_names_only_labels_a_default_issuer_has() -> Result<()> {
    let dir = tempfile::tempdir()?;
    run_ok(Command::new(bin("issuer")).args([
        "init",
        "--dir",
        &dir.path().to_string_lossy(),
        "--trust-domain",
        "plant.example",
    ]))?;
    let issuer = issuer::config::Config::load(&dir.path().join("issuer.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let labels: BTreeSet<&str> = issuer.profiles.keys().map(String::as_str).collect();

    let help = run_ok(agent().args(["enroll", "--help"]))?;
    // The --label paragraph: from `--label` to the next option.
    let (_, label_help) = help
        .split_once("--label <LABEL>")
        .context("no --label in agent enroll --help")?;
    let label_help = label_help
        .split("\n  -")
        .next()
        .unwrap_or_default()
        .replace('\n', " ");
    let (_, examples) = label_help
        .split_once("e.g. ")
        .with_context(|| format!("no examples in {label_help:?}"))?;
    let examples: Vec<&str> = examples
        .split(['(', '[', ';'])
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|label| !label.is_empty())
        .collect();
    ensure!(!examples.is_empty(), "{label_help}");
    for label in &examples {
        ensure!(
            labels.contains(label),
            "agent enroll --help suggests label {label:?}, which a default issuer does not have ({labels:?}):\n{label_help}"
        );
    }
    ensure!(
        label_help.contains("default_profile") && labels.contains(issuer.default_profile.as_str()),
        "{label_help}"
    );
    Ok(())
}

#[test]
fn a_refused_reenroll_names_only_options_agent_reenroll_has() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let device = dir.path().join("plc-7");
    let token = issuer.token("plc", Some("plc-7"))?;
    run_ok(
        agent()
            .args([
                "enroll",
                "--server",
                &issuer.url,
                "--ca-fingerprint",
                &issuer.fingerprint()?,
                "--token",
                &token,
                "--subject",
                "plc-7",
                "--label",
                "plc",
                "--out",
            ])
            .arg(&device),
    )?;
    let help = run_ok(agent().args(["reenroll", "--help"]))?;
    let options = options_named(&help);
    ensure!(options.contains("--label"), "{help}");
    let reenroll = |extra: &[&str]| -> Result<String> {
        let output = run(agent()
            .args(["reenroll", "--server", &issuer.url, "--cert"])
            .arg(device.join("cert.pem"))
            .arg("--ca")
            .arg(device.join("ca.pem"))
            .args(extra))?;
        ensure!(!output.status.success(), "{output:?}");
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    };

    // Another label than the certificate's, then a revoked certificate: both 403.
    let wrong_label = reenroll(&["--label", "server"])?;
    ensure!(wrong_label.contains("403"), "{wrong_label}");
    issuer.revoke(&device.join("cert.pem"))?;
    let revoked = reenroll(&[])?;
    ensure!(
        revoked.contains("403") && revoked.contains("revoked"),
        "{revoked}"
    );
    for message in [&wrong_label, &revoked] {
        let named = options_named(message);
        ensure!(!named.is_empty(), "no option suggested: {message}");
        for option in named {
            ensure!(
                options.contains(&option),
                "the refusal suggests {option}, which agent reenroll does not have:\n{message}"
            );
        }
    }
    Ok(())
}

/// A port that speaks plain TCP (here: answers like an HTTP server, as the issuer's CRL port
/// would), for as long as the test runs.
fn plain_tcp_listener() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let mut hello = [0u8; 512];
            let _ = stream.read(&mut hello);
            let _ = stream.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    Ok(port)
}

#[test]
fn a_server_that_is_not_tls_or_not_listening_is_named_as_such() -> Result<()> {
    let out = tempfile::tempdir()?;
    let enroll = |server: &str| -> Result<String> {
        let output = run(agent()
            .args([
                "enroll",
                "--server",
                server,
                "--ca-fingerprint",
                &"ab".repeat(32),
                "--token",
                "tok",
                "--subject",
                "plc-7",
                "--out",
            ])
            .arg(out.path().join("plc-7")))?;
        ensure!(output.status.code() == Some(1), "{output:?}");
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    };

    let plain = format!("https://127.0.0.1:{}", plain_tcp_listener()?);
    let message = enroll(&plain)?;
    ensure!(
        message.contains(&format!(
            "{plain} did not answer TLS (is it the issuer's EST port? the issuer prints its EST URL at start)"
        )),
        "{message}"
    );
    ensure!(!message.contains("InvalidContentType"), "{message}");

    // A port nothing listens on: bound, then let go.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("https://127.0.0.1:{}", listener.local_addr()?.port())
    };
    let message = enroll(&closed)?;
    ensure!(
        message.contains(&format!("cannot connect to {closed}: connection refused")),
        "{message}"
    );
    Ok(())
}
