//! Replays the committed fuzz inputs through the fuzz target bodies, without libFuzzer: every
//! file under `fuzz/seeds/<target>/` (valid and near-valid inputs) and
//! `fuzz/regressions/<target>/` (inputs that once found a bug). A body that panics fails the
//! test, naming the file. `scripts/fuzz` runs the same bodies under cargo-fuzz.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod bodies;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file() && path.file_name() != Some("README.md".as_ref()))
        .collect();
    files.sort();
    files
}

/// The subfolder names of `dir`.
fn folders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_dir())
        .map(|path| {
            path.file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn every_seed_and_regression_input_passes_its_fuzz_target_without_a_panic() {
    let fuzz = fuzz_dir();
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, body) in bodies::TARGETS {
        for kind in ["seeds", "regressions"] {
            for file in inputs(&fuzz.join(kind).join(target)) {
                let data = std::fs::read(&file).expect("read the input");
                replayed += 1;
                if panic::catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                    failures.push(file.display().to_string());
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz target bodies panicked on (see the panic messages above):\n  {}",
        failures.join("\n  ")
    );
    assert!(replayed > 0, "no fuzz input found under {}", fuzz.display());
}

/// The fuzz binaries, the bodies and the input folders name the same targets, and each has
/// seeds: a target added in one place only would go unfuzzed or unreplayed.
#[test]
fn every_fuzz_target_has_a_body_a_binary_and_seeds() {
    let fuzz = fuzz_dir();
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let mut binaries: Vec<&str> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|table| {
            let line = table.lines().find(|l| l.trim_start().starts_with("name"))?;
            line.split('"').nth(1)
        })
        .collect();
    binaries.sort_unstable();
    let mut names: Vec<&str> = bodies::TARGETS.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    assert_eq!(
        binaries, names,
        "fuzz/Cargo.toml [[bin]]s and TARGETS differ"
    );
    for name in &names {
        let source = std::fs::read_to_string(fuzz.join(format!("fuzz_targets/{name}.rs")))
            .expect("the target's source");
        assert!(
            source.contains(&format!("plant_fuzz::{name}(data)")),
            "fuzz_targets/{name}.rs does not call its body"
        );
        assert!(
            !inputs(&fuzz.join("seeds").join(name)).is_empty(),
            "fuzz/seeds/{name}/ has no seed"
        );
    }
    for kind in ["seeds", "regressions"] {
        for folder in folders(&fuzz.join(kind)) {
            assert!(
                names.contains(&folder.as_str()),
                "fuzz/{kind}/{folder}/ names no fuzz target"
            );
        }
    }
}
