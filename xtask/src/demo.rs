//! `cargo xtask demo`: the article's scenario, done properly. Two memfds,
//! `shma` of 'A' and `shmb` of 'B', 4 MiB each, sealed, sent by
//! `sealpass-send` to `sealpass-recv` in another process; the receiver prints
//! their bytes (as the original did) and this task checks every one.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::project::{self, Scratch};

const SEGMENT_SIZE: usize = 4 << 20;
const SEGMENTS: [(&str, u8); 2] = [("shma", b'A'), ("shmb", b'B')];

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let release = match args {
        [] => false,
        [flag] if flag == "--release" => true,
        other => bail!("demo takes no arguments but --release; got {other:?}"),
    };
    let (sender, receiver) = project::build_binaries(release)?;
    let scratch = Scratch::new("demo")?;
    let socket = scratch.path().join("demo.sock");
    let started = Instant::now();

    // --print puts the bytes on stdout and, with it, the JSON line on stderr.
    let mut recv = Command::new(&receiver)
        .arg("--socket")
        .arg(&socket)
        .args(["--once", "--print", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", receiver.display()))?;
    let mut recv_stdout = recv.stdout.take().context("receiver stdout")?;
    let printed = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        recv_stdout.read_to_end(&mut bytes).map(|_| bytes)
    });
    let recv_stderr = recv.stderr.take().context("receiver stderr")?;
    let logged = std::thread::spawn(move || {
        BufReader::new(recv_stderr)
            .lines()
            .collect::<Result<Vec<_>, _>>()
    });

    let fills: Vec<String> = SEGMENTS
        .iter()
        .map(|(name, byte)| format!("{name}={}:4MiB", *byte as char))
        .collect();
    let send = Command::new(&sender)
        .arg("--socket")
        .arg(&socket)
        .args(["--connect-timeout", "30", "--answer-timeout", "60"])
        .args(fills.iter().flat_map(|fill| ["--fill", fill.as_str()]))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", sender.display()))?;
    let send_stdout = String::from_utf8_lossy(&send.stdout);
    if !send.status.success() {
        let _ = recv.kill();
        bail!(
            "sealpass-send failed ({}):\n{}{}",
            send.status,
            send_stdout,
            String::from_utf8_lossy(&send.stderr)
        );
    }
    let recv_status = recv.wait()?;
    let printed = printed
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let logged = logged
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let elapsed = started.elapsed();
    ensure!(
        recv_status.success(),
        "sealpass-recv failed ({recv_status}):\n{}",
        logged.join("\n")
    );

    let report = logged
        .iter()
        .find(|line| line.starts_with('{'))
        .context("sealpass-recv printed no JSON line")?;
    let report: serde_json::Value =
        serde_json::from_str(report).context("parsing the receiver's JSON line")?;
    let segments = report
        .get("segments")
        .and_then(serde_json::Value::as_array)
        .context("JSON line has no segments")?;
    ensure!(
        segments.len() == SEGMENTS.len(),
        "receiver saw {} segments; expected 2",
        segments.len()
    );

    println!(
        "sealpass demo: two sealed memfds, sealpass-send -> sealpass-recv, separate processes"
    );
    println!("  socket  {}", socket.display());
    let mut printed_rest = printed.as_slice();
    for ((name, byte), seen) in SEGMENTS.iter().zip(segments) {
        ensure!(
            seen["name"] == *name,
            "receiver saw segment {}; expected {name}",
            seen["name"]
        );
        ensure!(
            seen["size"] == SEGMENT_SIZE,
            "{name}: receiver saw {} bytes; expected {SEGMENT_SIZE}",
            seen["size"]
        );
        let seals = seen["seals"].as_str().unwrap_or_default();
        for required in ["SHRINK", "GROW", "WRITE", "SEAL"] {
            ensure!(
                seals.split('|').any(|s| s == required),
                "{name}: sealed {seals}; expected {required}"
            );
        }
        let (bytes, rest) = printed_rest
            .split_at_checked(SEGMENT_SIZE)
            .with_context(|| {
                format!("{name}: receiver printed only {} bytes", printed_rest.len())
            })?;
        printed_rest = rest;
        if let Some((offset, found)) = bytes.iter().enumerate().find(|(_, b)| *b != byte) {
            bail!(
                "{name}: byte {offset} is {found:#04x}; expected {byte:#04x} ('{}')",
                *byte as char
            );
        }
        let head = String::from_utf8_lossy(bytes.get(..16).unwrap_or(bytes));
        println!(
            "  {name}    {SEGMENT_SIZE} bytes  sealed {seals} (verified by the receiver)  first bytes {head:?}"
        );
    }
    ensure!(
        printed_rest.is_empty(),
        "receiver printed {} bytes too many",
        printed_rest.len()
    );
    println!(
        "  every one of the {} bytes matches",
        SEGMENTS.len() * SEGMENT_SIZE
    );
    for line in send_stdout.lines().take(1) {
        // The handoff ends at the Ack, which follows the receiver's --print.
        println!("  sender: {line} (the handoff includes the receiver printing the bytes)");
    }
    println!(
        "  total {:.1} ms, both processes included",
        elapsed.as_secs_f64() * 1e3
    );
    println!("demo OK");
    Ok(())
}
