//! Replays the committed fuzz inputs through the fuzz target bodies, without libFuzzer: every
//! file under `fuzz/seeds/<target>/` (valid and near-valid inputs) and
//! `fuzz/regressions/<target>/` (inputs that once found a bug). A body that panics fails the
//! test, naming the file. `scripts/fuzz` runs the same bodies under cargo-fuzz.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/lib.rs"]
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

/// Seconds of mutation per target in [`a_short_mutation_pass_over_every_target_finds_no_panic`]
/// unless `PLANT_FUZZ_SECONDS` says otherwise.
const MUTATION_SECONDS: f64 = 1.0;

/// One random edit of `data`, of the kinds libFuzzer's mutators make most: flip a bit, set
/// a byte to a boundary value, insert, delete or duplicate a run, splice in part of another
/// input.
fn mutate(data: &mut Vec<u8>, other: &[u8], rng: &mut impl rand::Rng) {
    const BOUNDARY: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, b'-', b'=', b'\n'];
    let len = data.len();
    match rng.gen_range(0..6) {
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] = BOUNDARY[rng.gen_range(0..BOUNDARY.len())];
        }
        2 => {
            let i = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let i = rng.gen_range(0..len);
            let n = rng.gen_range(1..=(len - i).min(64));
            data.drain(i..i + n);
        }
        4 if len > 0 => {
            let i = rng.gen_range(0..len);
            let n = rng.gen_range(1..=(len - i).min(64));
            let run = data[i..i + n].to_vec();
            data.splice(i..i, run);
        }
        _ if !other.is_empty() => {
            let from = rng.gen_range(0..other.len());
            let n = rng.gen_range(1..=(other.len() - from).min(256));
            let at = rng.gen_range(0..=len);
            let end = (at + n).min(len);
            data.splice(at..end, other[from..from + n].iter().copied());
        }
        _ => data.push(rng.gen()),
    }
}

/// CI's short fuzz pass: a second of random mutations of every target's seeds, without
/// coverage guidance (the instrumented cargo-fuzz build costs 4–10 minutes of the 2-core CI
/// machine; `scripts/fuzz` runs that). A new panic near the seeds shows up here; the input
/// is written to `target/fuzz-findings/` and named in the failure, ready to become a
/// regression file. `PLANT_FUZZ_SEED` repeats a run; the seed used is printed.
#[test]
fn a_short_mutation_pass_over_every_target_finds_no_panic() {
    use rand::{Rng, SeedableRng};
    let fuzz = fuzz_dir();
    let seconds: f64 = std::env::var("PLANT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MUTATION_SECONDS);
    let seed: u64 = std::env::var("PLANT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("mutation pass: PLANT_FUZZ_SEED={seed}, {seconds} s per target");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let findings = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-findings");
    let mut failures = Vec::new();
    let mut total = 0u64;
    for (target, body) in bodies::TARGETS {
        let corpus: Vec<Vec<u8>> = inputs(&fuzz.join("seeds").join(target))
            .iter()
            .chain(inputs(&fuzz.join("regressions").join(target)).iter())
            .map(|file| std::fs::read(file).expect("read the input"))
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
        let mut runs = 0u64;
        while std::time::Instant::now() < deadline {
            let mut data = corpus[rng.gen_range(0..corpus.len())].clone();
            let other = &corpus[rng.gen_range(0..corpus.len())];
            for _ in 0..rng.gen_range(1..=4) {
                mutate(&mut data, other, &mut rng);
            }
            runs += 1;
            if panic::catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                std::fs::create_dir_all(&findings).expect("findings folder");
                let file = findings.join(format!("{target}-{seed}-{runs}"));
                std::fs::write(&file, &data).expect("write the finding");
                failures.push(format!("{target}: {}", file.display()));
                break;
            }
        }
        total += runs;
        eprintln!("  {target:<24} {runs:>8} runs");
    }
    eprintln!("mutation pass: {total} runs");
    assert!(
        failures.is_empty(),
        "fuzz target bodies panicked (PLANT_FUZZ_SEED={seed}); move each input to \
         fuzz/regressions/<target>/ once fixed:\n  {}",
        failures.join("\n  ")
    );
}
