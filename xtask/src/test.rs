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
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
    }),
    ("tests", || {
        project::run(cargo().args(["test", "--workspace", "--locked"]))
    }),
    ("demo", || crate::demo::run(&[])),
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
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
