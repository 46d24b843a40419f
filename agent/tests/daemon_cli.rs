//! `agent run` and `agent status` from the command line: a bad config exits 64 naming the key
//! to fix, before anything is started.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agent"))
}

const CONFIG: &str = r#"server = "https://127.0.0.1:1"
trust_bundle = "ca.pem"
trust_domain = "plant.example"
state_dir = "state"
socket = "workload.sock"
[attestation]
method = "join_token"
join_token = "t"
"#;

#[test]
fn a_bad_config_exits_64_and_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            CONFIG.replace("join_token\"", "psk\""),
            "attestation.method",
        ),
        (CONFIG.replace("https://", "http://"), "server"),
        (CONFIG.replace("plant.example", "Plant!"), "trust_domain"),
        (CONFIG.to_owned(), "trust_bundle"), // ca.pem does not exist
    ];
    for (text, key) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        let out = agent()
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .expect("run agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(!dir.path().join("workload.sock").exists(), "{key}");
    }
}

/// No agent has run with this state_dir: not running (3, as `systemctl status`), not a
/// usage error.
#[test]
fn status_without_a_daemon_exits_3_and_says_how_to_start_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, CONFIG).expect("write");
    let out = agent()
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .expect("run agent");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stdout.contains("NOT RUNNING"), "{stdout}");
    assert!(stdout.contains("agent run --config"), "{stdout}");
}

/// `agent status | head -1` once `head` has gone: the output ends quietly with the status's
/// own exit code, not the panic `print!` gives on a closed pipe (exit 101). Output that can't
/// be written for another reason (a full disk) fails the command and says so.
#[test]
fn status_into_a_closed_pipe_ends_quietly_and_into_a_full_disk_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, CONFIG).expect("write");

    let status_into = |stdout: std::process::Stdio| {
        let out = agent()
            .args(["status", "--config"])
            .arg(&path)
            .stdout(stdout)
            .output()
            .expect("run agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let (code, stderr) = status_into(writer.into());
    assert_eq!(code, Some(3), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let (code, stderr) = status_into(full.into());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("writing the output failed"), "{stderr}");
}
