//! `cargo xtask bench [--quick]`: the handoff benchmark (crates/receiver/
//! benches/handoff/) in release mode. Prints a table, and writes
//! target/bench/results.json and the plot target/bench/handoff.svg.

use anyhow::{Context, bail};

use crate::project::{self, cargo};
use crate::summary;

pub(crate) const HELP: &str = "\
usage: cargo xtask bench [--quick] [--hot-path] [--pipelined] [--async] [--fill] [--checks] [--meta]
                         [--e2e [--thp | --hugetlb]]
       cargo xtask bench --python [--runs N] [--thp]
       cargo xtask bench --peers [--quick] [--thp]
       cargo xtask bench --fanout [--quick] [--thp]

Runs the handoff benchmark in release mode, sender and receiver in separate
processes, and prints medians with their spread, the ratios against the
kernel's floor and against copying, and which targets are met. Writes
target/bench/results.json and the plot target/bench/handoff.svg.

  --quick       fewer sizes and runs (about 10 s instead of about 2 minutes)
  --meta        only protocol 1.1's metadata rows: fields as metadata against an
                extra JSON segment, 4 KiB as metadata alone against a unix
                stream, and the cost of 200 bytes of metadata (meta.json)
  --hot-path    only the one-CPU 4 KiB round trip and allocations per message,
                for before/after comparisons of the hot path
  --pipelined   only pipelined throughput on one connection
  --fill        only the producer's fill paths (mapping, MAP_POPULATE
                mapping, pwrite, MADV_HUGEPAGE mapping) at each size, and
                where huge pages can be had (2 MiB and more; with --thp
                here), a cached file copied or read into a MADV_HUGEPAGE
                mapping
  --checks      only the receiver's cost per 4 KiB segment, system call by
                system call (each check, the mapping, the close, the two
                messages one at a time and 32 per recvmmsg/sendmmsg, and a
                pread beside the mapping), on one CPU
  --e2e         only end to end (create, fill, seal, send, verify, map,
                read every byte) against a unix stream copy at each size,
                sender and receiver pinned to two CPUs, and their ratio
  --fanout      instead: one producer to 1, 2, 4 and 8 consumer processes,
                1 and 64 MiB, sealpass (one sealed memfd for all) against
                unix-stream copies (one each), every byte read, and the
                peak extra memory of each; writes target/bench/fanout.json
                (bench/peers, a workspace of its own)
  --peers       instead: sealpass end to end beside a unix stream, a pipe,
                ipc-channel 0.23 and iceoryx2 0.10 (bench/peers, a workspace
                of its own; producer and consumer pinned to two CPUs, every
                byte written, read and checked); writes target/bench/peers.json
                and peers.svg
  --hugetlb     with --e2e, as root: the same with memfds from the hugetlb
                pool (MFD_HUGETLB), at the sizes it takes (whole 2 MiB pages);
                if the pool lacks room for two of the largest segment,
                raise vm.nr_hugepages for the run, say so, and put the old
                value back on every path, Ctrl-C included
  --thp         with --e2e, --fill, --python or --peers, as root: switch shmem
                transparent huge pages to `advise` for the run
                (/sys/kernel/mm/transparent_hugepage/shmem_enabled), say so,
                and put the old mode back on every path, Ctrl-C included.
                Without it the machine's mode is used as it is
  --async       only the async round trip and pipelined rate (tokio at both
                ends) beside the blocking ones, and their ratios
  --python      instead: a 64 MiB numpy array from one Python process to
                another through sealpass, multiprocessing.Queue, a pipe with
                pickle protocol 5 and multiprocessing.shared_memory; then
                new data each round, at 64 and 256 MiB, filled into
                sealpass.empty (sealed in place) or numpy.empty (copied)
                (crates/python/bench/handoff.py, in the venv that `cargo xtask
                python` makes); writes target/bench/python.json
  -h, --help    this text

Changes no system setting, except with --thp and --hugetlb.
";

const FLAGS: &[&str] = &[
    "--hugetlb",
    "--quick",
    "--hot-path",
    "--pipelined",
    "--async",
    "--fill",
    "--e2e",
    "--thp",
    "--checks",
    "--meta",
];

const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        print!("{HELP}");
        return Ok(());
    }
    if args.first().is_some_and(|arg| arg == "--python") {
        return python(args.get(1..).unwrap_or_default());
    }
    if args.first().is_some_and(|arg| arg == "--fanout") {
        let rest = args.get(1..).unwrap_or_default();
        if let Some(unknown) = rest.iter().find(|a| *a != "--quick" && *a != "--thp") {
            bail!("bench --fanout takes --quick and --thp; got {unknown:?}\n\n{HELP}");
        }
        let flag = |name: &str| rest.iter().any(|a| a == name);
        return crate::fanout::run(flag("--quick"), flag("--thp"));
    }
    if args.first().is_some_and(|arg| arg == "--peers") {
        let rest = args.get(1..).unwrap_or_default();
        if let Some(unknown) = rest.iter().find(|a| *a != "--quick" && *a != "--thp") {
            bail!("bench --peers takes --quick and --thp; got {unknown:?}\n\n{HELP}");
        }
        let flag = |name: &str| rest.iter().any(|a| a == name);
        return crate::peers::run(flag("--quick"), flag("--thp"));
    }
    if let Some(unknown) = args.iter().find(|arg| !FLAGS.contains(&arg.as_str())) {
        bail!("bench: unknown flag {unknown:?}\n\n{HELP}");
    }
    let thp = args.iter().any(|arg| arg == "--thp");
    let hugetlb = args.iter().any(|arg| arg == "--hugetlb");
    let e2e = args.iter().any(|arg| arg == "--e2e");
    let fill = args.iter().any(|arg| arg == "--fill");
    if thp && !e2e && !fill {
        bail!("bench: --thp goes with --e2e, --fill, --python or --peers\n\n{HELP}");
    }
    if hugetlb && (!e2e || thp) {
        bail!("bench: --hugetlb goes with --e2e, without --thp\n\n{HELP}");
    }
    let full = args.iter().all(|arg| arg == "--quick");
    let invoked = std::iter::once("cargo xtask bench")
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let args: Vec<&String> = args.iter().filter(|arg| *arg != "--thp").collect();
    let out = project::target_dir().join("bench");
    let mut command = handoff_bench();
    command
        .env("SEALPASS_BENCH_OUT", &out)
        .arg("--")
        .args(&args);
    let kept = if full {
        summary::keep_others()
    } else {
        Vec::new()
    };
    if thp {
        // Build first, so the setting holds only while the benchmark runs.
        project::run(handoff_bench().arg("--no-run"))?;
        run_with_huge_pages(&mut command)?;
    } else if hugetlb {
        project::run(handoff_bench().arg("--no-run"))?;
        let quick = args.iter().any(|arg| *arg == "--quick");
        with_hugetlb_pool(if quick { 64 << 20 } else { 1 << 30 }, || {
            project::run(&mut command)
        })?;
    } else {
        project::run(&mut command)?;
    }
    if full {
        summary::restore_others(kept, &invoked)?;
    } else if e2e {
        // The benchmark names its file after the pages it found.
        let written = ["e2e-hugetlb.json", "e2e-thp.json", "e2e.json"]
            .into_iter()
            .map(|name| out.join(name))
            .filter_map(|path| Some((std::fs::metadata(&path).ok()?.modified().ok()?, path)))
            .max();
        if let Some((_, path)) = written {
            summary::merge(&path, &invoked)?;
        }
    }
    Ok(())
}

/// `--python [--runs N] [--thp]`: the Python handoff benchmark, in a fresh
/// venv.
fn python(args: &[String]) -> anyhow::Result<()> {
    let thp = args.iter().any(|arg| arg == "--thp");
    let rest: Vec<&String> = args.iter().filter(|arg| *arg != "--thp").collect();
    let runs = match rest.as_slice() {
        [] => None,
        [flag, runs] if *flag == "--runs" => Some((*runs).clone()),
        _ => bail!("bench --python takes only --runs N and --thp; got {args:?}\n\n{HELP}"),
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
    if thp {
        run_with_huge_pages(&mut command)?;
    } else {
        project::run(&mut command)?;
    }
    let invoked = format!("cargo xtask bench --python {}", args.join(" "));
    summary::merge(&out.join("python.json"), invoked.trim_end())
}

/// Runs `command` under [`with_huge_pages`].
fn run_with_huge_pages(command: &mut std::process::Command) -> anyhow::Result<()> {
    with_huge_pages(|| project::run(command))
}

/// Runs `task` with shmem transparent huge pages switched to `advise`, and
/// puts the old mode back after, whatever happens (Ctrl-C included).
pub(crate) fn with_huge_pages<T>(task: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    project::with_changed_setting("bench", SHMEM_THP, "advise", |_| task())
}

/// Runs `task` with room in the hugetlb pool for two segments of
/// `largest` bytes (one being read while the next is filled). A pool with
/// room already is used as it is; otherwise `vm.nr_hugepages` is raised for
/// the run, said so, and put back after, whatever happens (Ctrl-C
/// included).
fn with_hugetlb_pool(
    largest: u64,
    task: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
    let pool = || {
        sealpass_kernel::host::HugeTlbPool::read()
            .context("/proc/meminfo names no hugetlb pool: a kernel without hugetlbfs")
    };
    let before = pool()?;
    let (total, free, page) = (before.total, before.room(), before.page_bytes);
    let needed = 2 * largest.div_ceil(page) + 4;
    if free >= needed {
        eprintln!(
            "bench: the hugetlb pool has {free} free pages of {page} bytes; using it as it is"
        );
        return task();
    }
    let raised = (total + needed - free).to_string();
    project::with_changed_setting("bench", NR_HUGEPAGES, &raised, |_| {
        let got = pool()?.room();
        if got < needed {
            bail!(
                "the kernel found {got} free huge pages of the {needed} asked for (memory too fragmented)"
            );
        }
        task()
    })
}

/// `cargo bench` of the handoff benchmark (crates/receiver/benches/handoff),
/// before its `--`.
pub(crate) fn handoff_bench() -> std::process::Command {
    let mut command = cargo();
    command.args([
        "bench",
        "--locked",
        "-p",
        "sealpass-receiver",
        "--features",
        "tokio",
        "--bench",
        "handoff",
    ]);
    command
}
