//! One place for every benchmark target: `target/bench/results.json`'s
//! `summary` holds each figure with a stable `id` from whichever bench mode
//! measured it last (`bench`, `--e2e`, `--e2e --thp`, `--peers`), with the
//! command that measured it and when. Each ratio in it compares two figures
//! of one run; different ids may come from different runs, and their
//! `command` and `measured_at_unix` say which.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

fn results_path() -> PathBuf {
    crate::project::target_dir().join("bench/results.json")
}

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not JSON", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

fn summary_of(document: &Value) -> Vec<Value> {
    document
        .get("summary")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn id_of(line: &Value) -> Option<&str> {
    line.get("id").and_then(Value::as_str)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Marks `line` as measured by `command` now.
fn stamp(line: &mut Value, command: &str, measured_at: u64) {
    if let Some(fields) = line.as_object_mut() {
        fields.insert("command".into(), json!(command));
        fields.insert("measured_at_unix".into(), json!(measured_at));
    }
}

/// `results.json` as it is, for lines to keep: one that cannot be read is
/// reported and treated as absent, so it never stops a benchmark.
fn earlier_results() -> Option<Value> {
    read_json(&results_path()).unwrap_or_else(|error| {
        eprintln!("bench: {error:#}; its earlier lines are dropped");
        None
    })
}

/// The id'd lines of `results.json` as it is now, before a full `bench`
/// run rewrites the file: the ones that run does not measure are put back
/// after it by [`restore_others`].
pub(crate) fn keep_others() -> Vec<Value> {
    earlier_results()
        .map(|document| summary_of(&document))
        .unwrap_or_default()
        .into_iter()
        .filter(|line| id_of(line).is_some())
        .collect()
}

/// After a full `bench` run (`command`) rewrote `results.json`: stamps its
/// own id'd lines, and puts back each kept line whose id it did not measure.
pub(crate) fn restore_others(kept: Vec<Value>, command: &str) -> anyhow::Result<()> {
    let path = results_path();
    let Some(mut document) = read_json(&path)? else {
        anyhow::bail!("the benchmark wrote no {}", path.display());
    };
    let mut measured = summary_of(&document);
    let now = now_unix();
    for line in measured.iter_mut().filter(|line| id_of(line).is_some()) {
        stamp(line, command, now);
    }
    write_summary(&path, &mut document, combine(kept, measured))
}

/// After a bench mode (`command`) wrote `from`: its id'd lines, stamped,
/// replace the lines of the same id in `results.json` (made if missing).
pub(crate) fn merge(from: &Path, command: &str) -> anyhow::Result<()> {
    let Some(source) = read_json(from)? else {
        anyhow::bail!("the benchmark wrote no {}", from.display());
    };
    let now = now_unix();
    let mut incoming: Vec<Value> = summary_of(&source)
        .into_iter()
        .filter(|line| id_of(line).is_some())
        .collect();
    for line in &mut incoming {
        stamp(line, command, now);
        if let Some(fields) = line.as_object_mut() {
            fields.insert(
                "file".into(),
                json!(from.file_name().map(|name| name.to_string_lossy())),
            );
        }
    }
    let path = results_path();
    let mut document = earlier_results().unwrap_or_else(|| json!({ "summary": [] }));
    let summary = combine(summary_of(&document), incoming);
    write_summary(&path, &mut document, summary)
}

/// `older`'s lines that `newer` does not measure again (by id), then
/// `newer`'s: a figure is never listed twice, and the latest one wins.
fn combine(older: Vec<Value>, newer: Vec<Value>) -> Vec<Value> {
    let mut combined: Vec<Value> = older
        .into_iter()
        .filter(|line| id_of(line).is_none_or(|id| !newer.iter().any(|new| id_of(new) == Some(id))))
        .collect();
    combined.extend(newer);
    combined
}

fn write_summary(path: &Path, document: &mut Value, summary: Vec<Value>) -> anyhow::Result<()> {
    if let Some(fields) = document.as_object_mut() {
        fields.insert("summary".into(), Value::Array(summary));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(document)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("summary with ids: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn combine_table() {
        fn check(
            older: &[(Option<&str>, f64)],
            newer: &[(Option<&str>, f64)],
            expected: &[(Option<&str>, f64)],
        ) {
            let lines = |spec: &[(Option<&str>, f64)]| -> Vec<Value> {
                spec.iter()
                    .map(|(id, value)| json!({"id": id, "value": value}))
                    .collect()
            };
            assert_eq!(
                combine(lines(older), lines(newer)),
                lines(expected),
                "{older:?} + {newer:?}"
            );
        }
        let (a, b) = (Some("e2e_64m_vs_stream"), Some("pipelined_vs_raw"));
        check(&[], &[(a, 1.0)], &[(a, 1.0)]);
        // The newer figure replaces the older one of its id, wherever it was.
        check(&[(a, 1.0), (b, 2.0)], &[(a, 3.0)], &[(b, 2.0), (a, 3.0)]);
        // Ids not measured again stay; lines without ids are kept from both.
        check(
            &[(None, 5.0), (b, 2.0)],
            &[(None, 6.0), (a, 1.0)],
            &[(None, 5.0), (b, 2.0), (None, 6.0), (a, 1.0)],
        );
        check(&[(a, 1.0)], &[], &[(a, 1.0)]);
    }

    #[test]
    fn stamping_marks_the_command_and_time() {
        let mut line = json!({"id": "x", "value": 1.0});
        stamp(&mut line, "cargo xtask bench --e2e", 7);
        assert_eq!(line["command"], "cargo xtask bench --e2e");
        assert_eq!(line["measured_at_unix"], 7);
    }
}
