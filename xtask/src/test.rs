//! `cargo xtask test`: the whole suite, as CI runs it.

use std::time::Instant;

use anyhow::bail;

use crate::project::{self, cargo};

type Step = (&'static str, fn() -> anyhow::Result<()>);

const STEPS: &[Step] = &[
    ("format", || {
        project::run(cargo().args(["fmt", "--all", "--", "--check"]))
    }),
    ("clippy", || {
        project::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
    }),
    ("tests", || {
        project::run(cargo().args(["test", "--workspace", "--all-features", "--locked"]))
    }),
    ("docs without warnings", || {
        project::run(cargo().env("RUSTDOCFLAGS", "-D warnings").args([
            "doc",
            "--no-deps",
            "--workspace",
            "--locked",
        ]))
    }),
    ("demo", || crate::demo::run(&[])),
    ("examples, each with its own peers", run_examples),
    ("conformance of this project's binaries", || {
        crate::conformance::run(&[])
    }),
    (
        "conformance of the async example receiver and sender",
        async_conformance,
    ),
    (
        "conformance of a receiver written from PROTOCOL.md alone",
        || crate::conformance::run(&["--receiver".into(), spec_receiver(&[])]),
    ),
    (
        "conformance catches broken receivers",
        catches_broken_receivers,
    ),
    (
        "a 1.1 sender and a 1.0 receiver (PROTOCOL.md section 8)",
        meets_a_minor_0_receiver,
    ),
    (
        "the Python package: built into a fresh venv, pytest, conformance",
        || crate::python::run_task(&[]),
    ),
    ("the suite on Linux 6.1, in qemu", || {
        crate::vm::boot_and_check(crate::vm::Source::Bookworm)
    }),
    (
        "the suite on the newest kernel for Debian 12 (bookworm-backports), in qemu",
        || crate::vm::boot_and_check(crate::vm::Source::Backports),
    ),
];

/// The programs in `crates/receiver/examples/`: each starts its own peers
/// and exits 0 by itself when all went as it says.
const EXAMPLES: &[&str] = &[
    "handoff_64mib",
    "service_shutdown",
    "worker_queue",
    "forward",
    "bare_peer",
    "async_receiver",
    "async_sender",
];

/// Builds every example (with every feature: the async ones need `tokio`)
/// and returns the directory they are in.
fn build_examples() -> anyhow::Result<std::path::PathBuf> {
    project::run(cargo().args([
        "build",
        "--quiet",
        "--locked",
        "--all-features",
        "-p",
        "sealpass-receiver",
        "--examples",
    ]))?;
    Ok(project::target_dir().join("debug").join("examples"))
}

fn run_examples() -> anyhow::Result<()> {
    let dir = build_examples()?;
    for example in EXAMPLES {
        eprintln!("  example {example}");
        project::run(&mut std::process::Command::new(dir.join(example)))?;
    }
    Ok(())
}

/// The async example receiver and sender, through the whole suite.
fn async_conformance() -> anyhow::Result<()> {
    let dir = build_examples()?;
    crate::conformance::run(&[
        "--receiver".into(),
        dir.join("async_receiver").display().to_string(),
        "--sender".into(),
        dir.join("async_sender").display().to_string(),
    ])
}

/// The Python receiver written from PROTOCOL.md, with `flags`.
fn spec_receiver(flags: &[&str]) -> String {
    let script = project::root().join("xtask/peers/spec_receiver.py");
    format!("python3 {} {}", script.display(), flags.join(" "))
}

/// Each deliberately broken variant of the spec receiver must fail exactly
/// the cases that expose its flaw.
fn catches_broken_receivers() -> anyhow::Result<()> {
    const BROKEN: &[(&str, &[&str])] = &[
        (
            "seals",
            &[
                "malformed/missing-write",
                "malformed/missing-shrink",
                "malformed/future-write-instead-of-write",
            ],
        ),
        (
            "name",
            &["malformed/wrong-name", "malformed/name-prefix-only"],
        ),
        (
            "size",
            &[
                "malformed/smaller-than-declared",
                "malformed/larger-than-declared",
            ],
        ),
        (
            "fd-count",
            &[
                "malformed/more-fds-than-segments",
                "malformed/header-but-no-fds",
            ],
        ),
        ("sparse", &["malformed/sparse"]),
    ];
    for (skipped, exposed_by) in BROKEN {
        let receiver = spec_receiver(&["--skip-check", skipped]);
        let command = receiver.split_whitespace().map(str::to_owned).collect();
        let report = crate::conformance::check(Some(command), None, true)?;
        for case in *exposed_by {
            let name = format!("receiver/{case}");
            if !report.failed().contains(&name) {
                bail!("a receiver that skips the {skipped} check passed {name}");
            }
        }
        eprintln!(
            "  skipping the {skipped} check is caught by: {}",
            report.failed().join(", ")
        );
    }
    Ok(())
}

/// The cases of protocol 1.1 that a 1.0 receiver fails: what tells a
/// receiver that speaks minor 1 from one that speaks minor 0.
const MINOR_1_CASES: &[&str] = &[
    "valid/metadata-alone",
    "malformed/metadata-empty-key",
    "malformed/metadata-key-too-long",
    "malformed/metadata-key-with-nul",
    "malformed/metadata-duplicate-key",
    "malformed/metadata-key-not-utf8",
    "malformed/metadata-trailing-bytes-same-minor",
    "malformed/metadata-count-past-the-body",
    "malformed/metadata-value-past-the-body",
    "malformed/fds-beside-metadata-alone",
];

/// The spec receiver as a 1.0 receiver: conformance tells it apart by the
/// 1.1 cases alone, and `sealpass-send` gets from it what section 8 says:
/// a transfer with segments and metadata is accepted (its metadata
/// skipped), one of metadata alone is refused `InvalidField`, exit 3.
fn meets_a_minor_0_receiver() -> anyhow::Result<()> {
    let receiver = spec_receiver(&["--speak-minor", "0"]);
    let command = receiver.split_whitespace().map(str::to_owned).collect();
    let report = crate::conformance::check(Some(command), None, true)?;
    let expected: Vec<String> = MINOR_1_CASES
        .iter()
        .map(|case| format!("receiver/{case}"))
        .collect();
    let mut failed = report.failed().to_vec();
    failed.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    if failed != sorted {
        bail!("a 1.0 receiver failed {failed:?}; expected exactly {sorted:?}");
    }
    eprintln!(
        "  a 1.0 receiver fails the 1.1 cases alone ({})",
        failed.len()
    );

    let (sender, _) = project::build_binaries(false)?;
    let scratch = project::Scratch::new("minor-0")?;
    let socket = scratch.path().join("minor-0.sock");
    let mut peer = std::process::Command::new("python3")
        .arg(project::root().join("xtask/peers/spec_receiver.py"))
        .args(["--speak-minor", "0", "--socket"])
        .arg(&socket)
        .spawn()?;
    let send = |args: &[&str]| {
        std::process::Command::new(&sender)
            .arg("--socket")
            .arg(&socket)
            .args(["--connect-timeout", "30", "--answer-timeout", "30"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    };
    let outcome = (|| -> anyhow::Result<()> {
        let both = send(&["--fill", "a=A:4KiB", "--meta", "seq=1"])?;
        if both.status.code() != Some(0) {
            bail!(
                "segments with metadata to a 1.0 receiver: {} ({})",
                both.status,
                String::from_utf8_lossy(&both.stderr)
            );
        }
        let alone = send(&["--meta", "seq=1"])?;
        let stderr = String::from_utf8_lossy(&alone.stderr);
        if alone.status.code() != Some(3) || !stderr.contains("InvalidField") {
            bail!(
                "metadata alone to a 1.0 receiver: expected exit 3 and InvalidField; got {} ({stderr})",
                alone.status
            );
        }
        Ok(())
    })();
    let _ = peer.kill();
    let _ = peer.wait();
    outcome?;
    eprintln!(
        "  sealpass-send: segments with metadata accepted, metadata alone refused InvalidField"
    );
    Ok(())
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        bail!("test takes no arguments; got {args:?}");
    }
    let mut failed = Vec::new();
    for (name, step) in STEPS {
        eprintln!("xtask test: {name}");
        let started = Instant::now();
        match step() {
            Ok(()) => eprintln!("PASS {name} ({:.1} s)", started.elapsed().as_secs_f64()),
            Err(error) => {
                eprintln!("FAIL {name}: {error:#}");
                failed.push(*name);
            }
        }
    }
    println!(
        "steps: {} passed, {} failed",
        STEPS.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
