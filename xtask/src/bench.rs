//! `cargo xtask bench [--quick]`: the handoff benchmark (crates/receiver/
//! benches/handoff/) in release mode. Prints a table, and writes
//! target/bench/results.json and the plot target/bench/handoff.svg.

use anyhow::bail;

use crate::project::{self, cargo};

pub(crate) const HELP: &str = "\
usage: cargo xtask bench [--quick] [--hot-path] [--pipelined] [--async] [--fill]
       cargo xtask bench --python [--runs N]

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
  --python      instead: a 64 MiB numpy array from one Python process to
                another through sealpass, multiprocessing.Queue, a pipe with
                pickle protocol 5 and multiprocessing.shared_memory
                (crates/python/bench/handoff.py, in the venv that `cargo xtask
                python` makes); writes target/bench/python.json
  -h, --help    this text

Changes no system setting.
";

const FLAGS: &[&str] = &["--quick", "--hot-path", "--pipelined", "--async", "--fill"];

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        print!("{HELP}");
        return Ok(());
    }
    if args.first().is_some_and(|arg| arg == "--python") {
        return python(args.get(1..).unwrap_or_default());
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

/// `--python [--runs N]`: the Python handoff benchmark, in a fresh venv.
fn python(args: &[String]) -> anyhow::Result<()> {
    let runs = match args {
        [] => None,
        [flag, runs] if flag == "--runs" => Some(runs.clone()),
        _ => bail!("bench --python takes only --runs N; got {args:?}\n\n{HELP}"),
    };
    let venv = crate::python::Venv::fresh()?;
    let out = project::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let mut command = venv.python();
    command
        .arg(project::root().join("crates/python/bench/handoff.py"))
        .arg("--out")
        .arg(out.join("python.json"));
    if let Some(runs) = runs {
        command.args(["--runs", &runs]);
    }
    project::run(&mut command)
}
