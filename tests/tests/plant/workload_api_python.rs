//! The Workload API with py-spiffe (the `spiffe` package from PyPI), a client nobody here
//! wrote, and the PID-reuse attack on workload attestation, played by a Python process that
//! hands its connection over before its pid goes to another program.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use plant_tests::{openssl, run_ok, Agent, Issuer};

const HISTORIAN: &str = "spiffe://plant.example/historian";

fn python() -> Result<PathBuf> {
    let python = std::env::var("PLANT_PYTHON").context(
        "PLANT_PYTHON must point at the Python with py-spiffe (scripts/test sets it up)",
    )?;
    Ok(PathBuf::from(python))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Runs a py-spiffe script against the agent's socket and parses the JSON it prints.
fn py_spiffe(agent: &Agent, name: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = run_ok(Command::new(python()?).arg(script(name)).args(args).env(
        "SPIFFE_ENDPOINT_SOCKET",
        format!("unix://{}", agent.socket.display()),
    ))
    .with_context(|| format!("{name} {args:?}; agent log:\n{}", agent.log()))?;
    serde_json::from_str(out.trim()).with_context(|| format!("{name} printed {out}"))
}

/// The executable the kernel reports for a process running `program` (symlinks resolved
/// as /proc/<pid>/exe resolves them), which is what `unix:path` selects.
fn executable_of(program: &Path, args: &[&str]) -> Result<String> {
    let mut child = Command::new(program).args(args).spawn()?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", child.id()));
    child.kill()?;
    child.wait()?;
    Ok(exe?.display().to_string())
}

#[test]
fn py_spiffe_fetches_a_chaining_svid_validates_a_jwt_and_sees_a_rotation() -> Result<()> {
    let issuer = Issuer::start()?;
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(&issuer, &token)?;
    let node = agent.node_id()?;
    issuer.create_entry(
        HISTORIAN,
        &node,
        &[&format!("unix:uid:{}", plant_tests::own_uid()?)],
        &["--ttl", "20s"],
    )?;
    agent.wait_for_svid(HISTORIAN)?;

    let dir = tempfile::tempdir()?;
    let out = dir.path().display().to_string();
    let x509 = py_spiffe(&agent, "workload_client.py", &["x509", &out])?;
    assert_eq!(x509["spiffe_id"], HISTORIAN, "{x509}");
    assert_eq!(x509["key_matches_leaf"], true, "{x509}");
    ensure!(x509["bundle_size"].as_u64() >= Some(1), "{x509}");
    // The leaf chains to the bundle py-spiffe received, by openssl.
    let bundle = dir.path().join("bundle.pem").display().to_string();
    let leaf = dir.path().join("leaf.pem").display().to_string();
    let intermediates = dir.path().join("intermediates.pem").display().to_string();
    let verified = openssl(&[
        "verify",
        "-CAfile",
        &bundle,
        "-untrusted",
        &intermediates,
        &leaf,
    ])?;
    assert!(verified.contains("OK"), "openssl verify: {verified}");

    let jwt = py_spiffe(&agent, "workload_client.py", &["jwt", "scada"])?;
    assert_eq!(jwt["spiffe_id"], HISTORIAN, "{jwt}");
    assert_eq!(jwt["validated_by_agent"], HISTORIAN, "{jwt}");
    assert_eq!(jwt["validated_locally"], HISTORIAN, "{jwt}");
    let lifetime = jwt["expiry"].as_i64().unwrap_or(0) - jwt["now"].as_i64().unwrap_or(0);
    ensure!(
        (1..=300).contains(&lifetime),
        "JWT-SVID lives {lifetime} s: {jwt}"
    );

    // A 20 s SVID rotates at about 10 s; py-spiffe's stream sees the new one by itself.
    let watched = py_spiffe(&agent, "workload_client.py", &["watch", "45"])?;
    let serials = watched["serials"].as_array().cloned().unwrap_or_default();
    ensure!(
        serials.len() >= 2,
        "no rotation seen by py-spiffe within 45 s: {watched}\n{}",
        agent.log()
    );
    assert_ne!(serials[0], serials[1]);
    Ok(())
}

#[test]
fn a_connection_whose_pid_went_to_another_program_gets_nothing() -> Result<()> {
    let issuer = Issuer::start()?;
    let token = issuer.join_token()?;
    let mut agent = Agent::start_with_join_token(&issuer, &token)?;
    let node = agent.node_id()?;
    let uid = plant_tests::own_uid()?;
    let python = python()?;
    let python_exe = executable_of(&python, &["-c", "import time; time.sleep(30)"])?;
    let sleep_exe = executable_of(Path::new("sleep"), &["30"])?;
    // The victim: whatever runs `sleep` as this uid. The control: Python as this uid, which
    // is what connects in both runs below.
    let victim = "spiffe://plant.example/victim";
    let control = "spiffe://plant.example/python-workload";
    issuer.create_entry(
        victim,
        &node,
        &[
            &format!("unix:uid:{uid}"),
            &format!("unix:path:{sleep_exe}"),
        ],
        &[],
    )?;
    issuer.create_entry(
        control,
        &node,
        &[
            &format!("unix:uid:{uid}"),
            &format!("unix:path:{python_exe}"),
        ],
        &[],
    )?;
    agent.wait_for_svid(victim)?;
    agent.wait_for_svid(control)?;

    // Control: the connecting process stays alive; its connection, relayed the same way,
    // gets the connecting process's own identity. So the plumbing works.
    let honest = py_spiffe(&agent, "pid_reuse.py", &["--control", &sleep_exe])?;
    assert_eq!(honest["svid"], control, "{honest}");

    // The attack: the connecting process exits and its pid is given to `sleep`.
    let attack = py_spiffe(&agent, "pid_reuse.py", &[&sleep_exe])?;
    ensure!(
        attack["reused"] == true,
        "could not arrange the pid reuse (needs root for ns_last_pid): {attack}"
    );
    assert_ne!(
        attack["svid"], victim,
        "the victim's SVID went to a connection made by another process: {attack}"
    );
    assert!(attack["svid"].is_null(), "{attack}");
    Ok(())
}
