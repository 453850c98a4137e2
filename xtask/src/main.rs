//! The project's task runner (the cargo-xtask pattern): `cargo xtask <task>`.
//! Plain Rust, few dependencies; each task is one module.

mod bench;
mod conformance;
mod demo;
mod fanout;
mod hostile;
mod noexec;
mod peers;
mod project;
mod python;
mod soak;
mod summary;
mod test;
mod vm;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  demo [--release]   two sealed 4 MiB memfds (shma = 'A', shmb = 'B') from sealpass-send to
                     sealpass-recv, each its own process; checks every byte, prints a summary
  conformance [--receiver 'CMD ...'] [--sender 'CMD ...']
                     checks a receiver and/or a sender executable against PROTOCOL.md
                     (each started with --socket PATH appended); default: this project's
  test               the whole suite: fmt, clippy, every crate's tests, the demo, conformance
  python             the Python package: builds it into a fresh venv (target/python/venv;
                     maturin, pytest, numpy from the package index), runs its tests and
                     the conformance suite against its example receiver and sender
  soak               the load and fault tests, heavier and in release mode
  vm [--backports]   the conformance suites, the demo, compat mode and the kernel-facing
                     tests on Debian 12's Linux 6.1 (with --backports: the newest kernel
                     bookworm-backports offers, 6.12), booted in qemu (TCG); installs qemu
                     with apt if missing
  noexec             the demo and the conformance suite with vm.memfd_noexec=2 (changes that
                     system setting for the run, says so, restores it; never run by `test`)
  hostile sparse --socket PATH --size BYTES
                     a peer that breaks the rules on purpose, for fault tests (prints the
                     answer; exit 3 when the connection closed without one)
  bench [--quick] [--hot-path] [--pipelined]
                     handoff cost against the kernel's floor and against copying;
                     writes target/bench/results.json (cargo xtask bench --help)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (Some(task.as_str()), rest),
        None => (None, &[][..]),
    };
    let asks_help = rest.iter().any(|arg| arg == "--help" || arg == "-h");
    if asks_help && task != Some("bench") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = match task {
        Some("demo") => demo::run(rest),
        Some("test") => test::run(rest),
        Some("conformance") => conformance::run(rest),
        Some("soak") => soak::run(rest),
        Some("bench") => bench::run(rest),
        Some("vm") => vm::run(rest),
        Some("noexec") => noexec::run(rest),
        Some("hostile") => hostile::run(rest),
        Some("python") => python::run_task(rest),
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown task {other:?}\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no task given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
