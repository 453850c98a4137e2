//! `cargo xtask bench --peers [--quick] [--thp]`: sealpass end to end beside
//! a unix stream, a pipe, ipc-channel 0.23 and iceoryx2 0.10, in one run
//! (`bench/peers`, a workspace of its own that `cargo xtask test` never
//! builds). With `--thp` (root, explicit), a second pass measures sealpass
//! again with shmem huge pages switched to `advise`, and the old mode is put
//! back after. Prints the table and the ratios, with stable ids, writes
//! `target/bench/peers.json`, and brings the ratios into
//! `target/bench/results.json`'s summary (`crate::summary`). iceoryx2's shared memory objects left in
//! `/dev/shm` by the run, if any, are removed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::project::{self, cargo};

/// One measured figure: a mechanism at a size.
struct Figure {
    mechanism: String,
    bytes: u64,
    median_us: f64,
    min_us: f64,
    max_us: f64,
}

fn shm_entries() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The machine's shmem huge page mode, as the bench labels it.
fn pages() -> String {
    let list = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    match list
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
    {
        Some(("never" | "deny", _)) | None => "4 KiB pages".to_owned(),
        Some((mode, _)) => format!("shmem THP {mode}"),
    }
}

/// Runs the peers binary with `args`; returns its figures.
fn measure(binary: &PathBuf, args: &[&str], label_sealpass: &str) -> anyhow::Result<Vec<Figure>> {
    let output = Command::new(binary)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", binary.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the peers benchmark failed: {}",
        output.status
    );
    let mut figures = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a result line: {line}"))?;
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64);
        let mechanism = value
            .get("mechanism")
            .and_then(serde_json::Value::as_str)
            .context("a result without a mechanism")?;
        figures.push(Figure {
            mechanism: if mechanism == "sealpass" {
                format!("sealpass, {label_sealpass}")
            } else {
                mechanism.to_owned()
            },
            bytes: value
                .get("bytes")
                .and_then(serde_json::Value::as_u64)
                .context("a result without a size")?,
            median_us: number("median_us").context("no median")?,
            min_us: number("min_us").context("no min")?,
            max_us: number("max_us").context("no max")?,
        });
    }
    Ok(figures)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

/// Builds bench/peers (a workspace of its own) and returns its binary.
pub(crate) fn build() -> anyhow::Result<PathBuf> {
    let target = project::target_dir().join("peers");
    let manifest = project::root().join("bench/peers/Cargo.toml");
    project::run(
        cargo()
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target),
    )?;
    Ok(target.join("release/sealpass-peers-bench"))
}

pub(crate) fn run(quick: bool, thp: bool) -> anyhow::Result<()> {
    let binary = build()?;
    let before = shm_entries();
    let args: &[&str] = if quick { &["--quick"] } else { &[] };
    let label = pages();
    let mut figures = measure(&binary, args, &label);
    if thp {
        if let Ok(all) = figures.as_mut() {
            let mut only = args.to_vec();
            only.push("--mechanisms=sealpass");
            // On failure or Ctrl-C the error stands, after the cleanup below.
            match crate::bench::with_huge_pages(|| measure(&binary, &only, "shmem THP advise")) {
                Ok(huge) => all.extend(huge),
                Err(error) => figures = Err(error),
            }
        }
    }
    // iceoryx2 removes its objects when its ports drop; a run that failed
    // half-way may leave some.
    for left in shm_entries().difference(&before) {
        if left.starts_with("iox2") {
            let _ = std::fs::remove_file(PathBuf::from("/dev/shm").join(left));
            eprintln!("peers: removed /dev/shm/{left}");
        }
    }
    let figures = figures?;
    let written = report(&figures, &label, quick)?;
    let invoked = format!(
        "cargo xtask bench --peers{}{}",
        if quick { " --quick" } else { "" },
        if thp { " --thp" } else { "" }
    );
    crate::summary::merge(&written, &invoked)
}

/// Prints the table and ratios, writes peers.json and the plot; returns
/// peers.json's path.
fn report(figures: &[Figure], label: &str, quick: bool) -> anyhow::Result<PathBuf> {
    println!(
        "{:<32} {:>8} {:>14} {:>26}",
        "mechanism", "size", "median µs", "spread µs"
    );
    for figure in figures {
        println!(
            "{:<32} {:>8} {:>14.1} {:>26}",
            figure.mechanism,
            human(figure.bytes),
            figure.median_us,
            format!("{:.1}..{:.1}", figure.min_us, figure.max_us)
        );
    }
    let time = |mechanism: &str, bytes: u64| {
        figures
            .iter()
            .find(|f| f.mechanism == mechanism && f.bytes == bytes)
            .map(|f| f.median_us)
    };
    let ours = format!("sealpass, {label}");
    let huge = "sealpass, shmem THP advise";
    // (id, numerator, denominator, size, target)
    let ratios: [(&str, &str, &str, u64, Option<f64>); 6] = [
        // Since the big-buffers decisions: at least 0.5 with the copy
        // path, and none for 64 MiB with 4 KiB pages (judged against the
        // fresh-page floor instead, `bench --e2e`).
        ("e2e_4k_vs_stream", "unix-stream", &ours, 4 << 10, Some(0.5)),
        ("e2e_64m_vs_stream", "unix-stream", &ours, 64 << 20, None),
        (
            "e2e_64m_vs_ipc_channel",
            "ipc-channel",
            &ours,
            64 << 20,
            Some(2.0),
        ),
        (
            "e2e_64m_vs_stream_thp",
            "unix-stream",
            huge,
            64 << 20,
            Some(2.5),
        ),
        (
            "e2e_1g_vs_stream_thp",
            "unix-stream",
            huge,
            1 << 30,
            Some(2.5),
        ),
        (
            "e2e_64m_vs_iceoryx2_thp",
            "iceoryx2",
            huge,
            64 << 20,
            Some(0.7),
        ),
    ];
    let mut summary = Vec::new();
    println!();
    for (id, numerator, denominator, bytes, target) in ratios {
        let (Some(top), Some(bottom)) = (time(numerator, bytes), time(denominator, bytes)) else {
            continue;
        };
        let ratio = top / bottom;
        let met = target.map(|bound| ratio >= bound);
        let verdict = match (target, met) {
            (Some(bound), Some(true)) => format!("  (target >= {bound}: met)"),
            (Some(bound), _) => format!("  (target >= {bound}: NOT met)"),
            _ => String::new(),
        };
        println!(
            "{id}: {numerator} / {denominator} at {}: {ratio:.2}{verdict}",
            human(bytes)
        );
        summary.push(serde_json::json!({
            "id": id,
            "what": format!("{numerator} time / {denominator} time at {}", human(bytes)),
            "value": ratio,
            "target": target.map(|bound| format!(">= {bound}")),
            "met": met,
        }));
    }
    let rows: Vec<_> = figures
        .iter()
        .map(|f| {
            serde_json::json!({
                "mechanism": f.mechanism,
                "bytes": f.bytes,
                "unit": "µs",
                "value": {"median": f.median_us, "min": f.min_us, "max": f.max_us},
            })
        })
        .collect();
    let out = project::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("peers.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({
            "quick": quick,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "pinned": "producer on the first allowed CPU, consumer on the second",
            "iceoryx2_waits": "Listener::blocking_wait on an event service, both ways",
            "results": rows,
            "summary": summary,
        }))?,
    )?;
    println!("wrote {}", path.display());
    // The plot, drawn by the handoff benchmark's plotter.
    project::run(
        crate::bench::handoff_bench()
            .args(["--quiet", "--", "--plot-peers"])
            .arg(&path)
            .arg(out.join("peers.svg")),
    )?;
    Ok(path)
}
