//! `cargo xtask soak`: the load and fault tests, heavier than in `test`
//! (64 senders x 2000 messages, a larger hostile mix, the mixed fault run),
//! in release mode, then each fuzz target for a bounded time. Loopback only;
//! bounded; stops by itself.
//!
//! `--fuzz-seconds N` sets each fuzz target's time (default 120); `--no-fuzz`
//! skips them.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::project::{self, cargo};

/// The fuzz targets in `fuzz/`, each with its seeds in `fuzz/seeds/NAME`.
const FUZZ_TARGETS: &[&str] = &["codec", "session", "answers"];

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut fuzz_seconds = Some(120u64);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--no-fuzz" => fuzz_seconds = None,
            "--fuzz-seconds" => {
                let value = rest.next().context("--fuzz-seconds needs a number")?;
                fuzz_seconds = Some(
                    value
                        .parse()
                        .context("--fuzz-seconds takes whole seconds")?,
                );
            }
            other => bail!("soak takes --fuzz-seconds N or --no-fuzz; got {other:?}"),
        }
    }
    project::run(cargo().args(["build", "--release", "--bins", "--all-features"]))?;
    project::run(cargo().env("SEALPASS_SOAK", "1").args([
        "test",
        "--release",
        "--all-features",
        "--locked",
        "-p",
        "sealpass-receiver",
        "--test",
        "load",
        "--test",
        "service",
        "--test",
        "faults",
    ]))?;
    if let Some(seconds) = fuzz_seconds {
        fuzz(seconds)?;
    }
    Ok(())
}

/// Installs cargo-afl where it is missing (from crates.io; it builds AFL++
/// from the sources it ships), builds the targets and runs each for
/// `seconds`. A crash or a hang fails the run, naming the inputs: each
/// becomes a file in `fuzz/regressions/TARGET`, which the property tests
/// of `cargo xtask test` replay.
fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let has_afl = Command::new("cargo")
        .args(["afl", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !has_afl {
        eprintln!("xtask soak: installing cargo-afl (the fuzzing engine) from crates.io");
        project::run(Command::new("cargo").args(["install", "cargo-afl", "--locked"]))?;
    }
    // Builds AFL++ for this toolchain the first time; a no-op after.
    let _ = Command::new("cargo")
        .args(["afl", "config", "--build"])
        .output();
    let fuzz = project::root().join("fuzz");
    project::run(
        Command::new("cargo")
            .args(["afl", "build", "--release", "--locked"])
            .current_dir(&fuzz),
    )?;
    let mut broken = Vec::new();
    for target in FUZZ_TARGETS {
        let out = project::target_dir().join("fuzz").join(target);
        let _ = std::fs::remove_dir_all(&out);
        // AFL++ makes its output directory, not the ones above it.
        std::fs::create_dir_all(project::target_dir().join("fuzz"))?;
        eprintln!("xtask soak: fuzzing {target} for {seconds} s");
        project::run(
            Command::new("cargo")
                .args(["afl", "fuzz", "-i"])
                .arg(fuzz.join("seeds").join(target))
                .arg("-o")
                .arg(&out)
                .args(["-V", &seconds.to_string(), "--"])
                .arg(fuzz.join("target/release").join(target))
                // No screen, no core-dump or CPU-governor settings changed:
                // the machine is left as it is.
                .env("AFL_NO_UI", "1")
                .env("AFL_SKIP_CPUFREQ", "1")
                .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
                .stdout(std::process::Stdio::null()),
        )?;
        for kind in ["crashes", "hangs"] {
            broken.extend(
                findings(&out.join("default").join(kind))
                    .into_iter()
                    .map(|path| format!("{target} {kind}: {}", path.display())),
            );
        }
    }
    if !broken.is_empty() {
        bail!(
            "the fuzzers broke a property; copy each input into fuzz/regressions/TARGET and fix \
             it:\n  {}",
            broken.join("\n  ")
        );
    }
    eprintln!(
        "xtask soak: {} fuzz targets, no crash and no hang",
        FUZZ_TARGETS.len()
    );
    Ok(())
}

/// The inputs AFL++ saved in `dir` (not its README).
fn findings(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.file_name().is_some_and(|name| name != "README.txt"))
                .collect()
        })
        .unwrap_or_default()
}
