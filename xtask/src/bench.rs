//! `cargo xtask bench [--quick]`: the handoff benchmark (crates/receiver/
//! benches/handoff/) in release mode. Prints a table, and writes
//! target/bench/results.json and the plot target/bench/handoff.svg.

use anyhow::bail;

use crate::project::{self, cargo};

pub(crate) const HELP: &str = "\
usage: cargo xtask bench [--quick] [--hot-path] [--pipelined] [--async] [--fill]

Runs the handoff benchmark in release mode, sender and receiver in separate
processes, and prints medians with their spread, the ratios against the
kernel's floor and against copying, and which targets are met. Writes
target/bench/results.json and the plot target/bench/handoff.svg.

  --quick       fewer sizes and runs (about 10 s instead of about 2 minutes)
  --hot-path    only the one-CPU 4 KiB round trip and allocations per message,
                for before/after comparisons of the hot path
  --pipelined   only pipelined throughput on one connection
  --fill        only the producer's fill paths (mapping, MAP_POPULATE
                mapping, pwrite) at each size
  --async       only the async round trip and pipelined rate (tokio at both
                ends) beside the blocking ones, and their ratios
  -h, --help    this text

Changes no system setting.
";

const FLAGS: &[&str] = &["--quick", "--hot-path", "--pipelined", "--async", "--fill"];

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        print!("{HELP}");
        return Ok(());
    }
    if let Some(unknown) = args.iter().find(|arg| !FLAGS.contains(&arg.as_str())) {
        bail!("bench: unknown flag {unknown:?}\n\n{HELP}");
    }
    let mut command = cargo();
    command
        .env("SEALPASS_BENCH_OUT", project::root().join("target/bench"))
        .args([
            "bench",
            "--locked",
            "-p",
            "sealpass-receiver",
            "--features",
            "tokio",
            "--bench",
            "handoff",
            "--",
        ])
        .args(args);
    project::run(&mut command)
}
