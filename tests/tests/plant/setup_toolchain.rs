//! The front door: `scripts/setup` (and every script that builds) checks the Rust toolchain
//! against `rust-version` in the top-level Cargo.toml and, when Rust is missing or too old,
//! stops with the commands that fix it. These run the scripts' own `ensure_cargo` (in
//! `scripts/lib.sh`) with a fake `rustc`/`cargo` on PATH, so no toolchain is touched.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace's minimum Rust, read the way a reader of Cargo.toml would.
fn workspace_rust_version() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix("rust-version")?.trim_start();
            Some(value.strip_prefix('=')?.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("no rust-version in Cargo.toml"))
}

/// Writes an executable shell script `name` into `dir`.
fn fake_tool(dir: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The system tools `ensure_cargo` uses, linked into one directory so that PATH can hold
/// them without whatever cargo, rustc or rustup the machine has in /usr/bin.
const SYSTEM_TOOLS: &[&str] = &[
    "bash",
    "sed",
    "head",
    "awk",
    "sort",
    "basename",
    "dirname",
    "apt-cache",
];

/// Runs `ensure_cargo` from scripts/lib.sh with only `fake_bin` and the system tools on PATH
/// and a HOME without ~/.cargo, and returns (succeeded, stderr).
fn ensure_cargo(fake_bin: &Path, home: &Path) -> anyhow::Result<(bool, String)> {
    let lib = repo_root().join("scripts/lib.sh");
    let system = home.join("system-bin");
    if !system.exists() {
        std::fs::create_dir(&system)?;
        for tool in SYSTEM_TOOLS {
            for dir in ["/usr/bin", "/bin"] {
                let path = Path::new(dir).join(tool);
                if path.exists() {
                    std::os::unix::fs::symlink(&path, system.join(tool))?;
                    break;
                }
            }
        }
    }
    let output = Command::new(system.join("bash"))
        .arg("-c")
        .arg(r#"set -euo pipefail; . "$1"; ensure_cargo"#)
        .arg("ensure_cargo")
        .arg(&lib)
        .env(
            "PATH",
            format!("{}:{}", fake_bin.display(), system.display()),
        )
        .env("HOME", home)
        .env_remove("CARGO_HOME")
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn setup_refuses_a_rustc_older_than_cargo_toml_rust_version_and_says_how_to_upgrade(
) -> anyhow::Result<()> {
    let minimum = workspace_rust_version()?;
    let dir = tempfile::tempdir()?;
    fake_tool(
        dir.path(),
        "rustc",
        "echo 'rustc 1.70.0 (90c541806 2023-05-31)'",
    )?;
    fake_tool(dir.path(), "cargo", "echo 'cargo 1.70.0'")?;

    let (ok, stderr) = ensure_cargo(dir.path(), dir.path())?;
    assert!(!ok, "a rustc 1.70 passed the check:\n{stderr}");
    assert!(
        stderr.contains(&format!("rustc 1.70.0 is older than {minimum}")),
        "the error does not name the versions: {stderr}"
    );
    assert!(
        stderr.contains("rustup") && stderr.contains("rustup default stable"),
        "the error does not say how to install a newer Rust: {stderr}"
    );

    // With rustup already there, the advice is to update through it.
    fake_tool(dir.path(), "rustup", "exit 0")?;
    let (ok, stderr) = ensure_cargo(dir.path(), dir.path())?;
    assert!(!ok, "a rustc 1.70 passed the check:\n{stderr}");
    assert!(
        stderr.contains("rustup update stable"),
        "with rustup present the advice is not 'rustup update stable': {stderr}"
    );
    Ok(())
}

#[test]
fn setup_without_rust_says_which_version_and_how_to_install_it() -> anyhow::Result<()> {
    let minimum = workspace_rust_version()?;
    let dir = tempfile::tempdir()?;

    let (ok, stderr) = ensure_cargo(dir.path(), dir.path())?;
    assert!(!ok, "the check passed without cargo on PATH:\n{stderr}");
    assert!(
        stderr.contains(&format!("needs Rust >= {minimum}")),
        "the error does not name the minimum version: {stderr}"
    );
    assert!(
        stderr.contains("rustup default stable"),
        "the error does not say how to install Rust: {stderr}"
    );
    Ok(())
}

#[test]
fn setup_accepts_a_rustc_at_exactly_the_minimum_version() -> anyhow::Result<()> {
    let minimum = workspace_rust_version()?;
    let dir = tempfile::tempdir()?;
    fake_tool(
        dir.path(),
        "rustc",
        &format!("echo 'rustc {minimum}.0 (x 2025-01-01)'"),
    )?;
    fake_tool(dir.path(), "cargo", "echo cargo")?;

    let (ok, stderr) = ensure_cargo(dir.path(), dir.path())?;
    assert!(ok, "rustc {minimum}.0 was refused:\n{stderr}");
    Ok(())
}
