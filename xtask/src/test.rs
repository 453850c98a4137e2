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
