//! `cargo xtask bench [--quick]`: the handoff benchmark (crates/receiver/
//! benches/handoff/) in release mode. Prints a table, and writes
//! target/bench/results.json and the plot target/bench/handoff.svg.

use anyhow::bail;

use crate::project::{self, cargo};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = match args {
        [] => false,
        [flag] if flag == "--quick" => true,
        other => bail!("bench takes --quick or nothing; got {other:?}"),
    };
    let mut command = cargo();
    command
        .env("SEALPASS_BENCH_OUT", project::root().join("target/bench"))
        .args([
            "bench",
            "--locked",
            "-p",
            "sealpass-receiver",
            "--bench",
            "handoff",
            "--",
        ]);
    if quick {
        command.arg("--quick");
    }
    project::run(&mut command)
}
