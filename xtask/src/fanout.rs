//! `cargo xtask bench --fanout [--quick] [--thp]`: one producer to 1, 2, 4
//! and 8 consumer processes, sealpass (one sealed memfd per round, on every
//! consumer's connection) against unix-stream copies (one per consumer) and
//! iceoryx2 publish-subscribe (one loaned sample to N subscribers), each
//! consumer reading every byte, and the peak extra memory of each
//! (bench/peers' `--fanout`); ratios under stable ids in results.json.

use std::process::Command;

use anyhow::Context;

use crate::project;

/// One line of the peers benchmark's `--fanout` output.
struct Row {
    mechanism: String,
    consumers: u64,
    bytes: u64,
    median_us: f64,
    peak_extra_kib: f64,
}

fn rows(binary: &std::path::Path, quick: bool) -> anyhow::Result<Vec<Row>> {
    let mut command = Command::new(binary);
    command.args(["--fanout=1,2,4,8", "--sizes=1048576,67108864"]);
    if quick {
        command.arg("--quick");
    }
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", binary.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the fan-out benchmark failed: {}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("not a result line: {line}"))?;
            let number = |key: &str| {
                value
                    .get(key)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("no {key} in {line}"))
            };
            Ok(Row {
                mechanism: value
                    .get("mechanism")
                    .and_then(serde_json::Value::as_str)
                    .context("no mechanism")?
                    .to_owned(),
                consumers: number("consumers")? as u64,
                bytes: number("bytes")? as u64,
                median_us: number("median_us")?,
                peak_extra_kib: number("peak_extra_kib")?,
            })
        })
        .collect()
}

pub(crate) fn run(quick: bool, thp: bool) -> anyhow::Result<()> {
    let binary = crate::peers::build()?;
    let measured = if thp {
        crate::bench::with_huge_pages(|| rows(&binary, quick))?
    } else {
        rows(&binary, quick)?
    };
    let pages = if thp {
        "shmem THP advise"
    } else {
        "4 KiB pages"
    };
    println!(
        "{:<12} {:>9} {:>8} {:>12} {:>16}   ({pages})",
        "mechanism", "consumers", "size", "median µs", "peak extra MiB"
    );
    for row in &measured {
        println!(
            "{:<12} {:>9} {:>8} {:>12.1} {:>16.1}",
            row.mechanism,
            row.consumers,
            format!("{} MiB", row.bytes >> 20),
            row.median_us,
            row.peak_extra_kib / 1024.0
        );
    }
    let find = |mechanism: &str, consumers: u64, bytes: u64| {
        measured
            .iter()
            .find(|r| r.mechanism == mechanism && r.consumers == consumers && r.bytes == bytes)
    };
    let suffix = if thp { "_thp" } else { "" };
    // (id, the other mechanism, consumers, time or memory, target: at
    // least (time) or at most (memory))
    let wanted: &[(&str, &str, u64, bool, Option<f64>)] = if thp {
        &[
            ("fanout4_64m_vs_stream", "unix-stream", 4, true, Some(4.0)),
            ("fanout4_64m_vs_iceoryx2", "iceoryx2", 4, true, Some(0.6)),
        ]
    } else {
        &[
            ("fanout4_64m_vs_stream", "unix-stream", 4, true, Some(1.3)),
            ("fanout8_64m_vs_stream", "unix-stream", 8, true, Some(2.0)),
            (
                "fanout4_64m_memory_vs_stream",
                "unix-stream",
                4,
                false,
                Some(0.35),
            ),
            ("fanout4_64m_vs_iceoryx2", "iceoryx2", 4, true, None),
        ]
    };
    let mut summary = Vec::new();
    println!();
    for &(id, other, consumers, time, target) in wanted {
        let (Some(ours), Some(stream)) = (
            find("sealpass", consumers, 64 << 20),
            find(other, consumers, 64 << 20),
        ) else {
            continue;
        };
        let id = format!("{id}{suffix}");
        let (ratio, what, met) = if time {
            let ratio = stream.median_us / ours.median_us;
            let met = target.map(|bound| ratio >= bound);
            (
                ratio,
                format!("{other} to {consumers} / sealpass to {consumers}, 64 MiB, {pages}"),
                met,
            )
        } else {
            let ratio = ours.peak_extra_kib / stream.peak_extra_kib;
            let met = target.map(|bound| ratio <= bound);
            (
                ratio,
                format!("sealpass peak extra memory / {other}'s, {consumers} consumers, 64 MiB"),
                met,
            )
        };
        let target_text = target.map(|bound| format!("{} {bound}", if time { ">=" } else { "<=" }));
        let verdict = match (&target_text, met) {
            (Some(text), Some(true)) => format!("  (target {text}: met)"),
            (Some(text), _) => format!("  (target {text}: NOT met)"),
            _ => String::new(),
        };
        println!("{id}: {what}: {ratio:.2}{verdict}");
        summary.push(serde_json::json!({
            "id": id, "what": what, "value": ratio, "target": target_text, "met": met,
        }));
    }
    let results: Vec<_> = measured
        .iter()
        .map(|r| {
            serde_json::json!({
                "mechanism": r.mechanism, "consumers": r.consumers, "bytes": r.bytes,
                "median_us": r.median_us, "peak_extra_kib": r.peak_extra_kib,
            })
        })
        .collect();
    let out = project::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join(format!("fanout{suffix}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({
            "quick": quick,
            "pages": pages,
            "producer": "one process on the first allowed CPU; stream copies written one after another; iceoryx2 writes one loaned sample in place",
            "results": results,
            "summary": summary,
        }))?,
    )?;
    println!("wrote {}", path.display());
    let invoked = format!(
        "cargo xtask bench --fanout{}{}",
        if quick { " --quick" } else { "" },
        if thp { " --thp" } else { "" }
    );
    crate::summary::merge(&path, &invoked)
}
