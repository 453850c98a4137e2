//! `sealpass-recv`'s command line, driven as a user would: as a separate
//! process, fed by the sender library.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::io::Read;
use std::process::{Command, Stdio};

use sealpass_proto::limits::MAX_SEGMENTS;
use sealpass_proto::{RejectReason, Seals};
use sealpass_sender::{SealedSegment, Sender, Verdict};
use support::RecvProcess;

fn segment(name: &str, byte: u8, size: u64) -> SealedSegment {
    SealedSegment::filled(name, byte, size, Seals::SENDER_DEFAULT).unwrap()
}

fn send(receiver: &RecvProcess, segments: &[SealedSegment]) -> Verdict {
    Sender::connect(receiver.socket())
        .unwrap()
        .send(segments)
        .unwrap()
}

fn finish(mut receiver: RecvProcess) -> (std::process::ExitStatus, String) {
    let mut stdout = String::new();
    if let Some(mut pipe) = receiver.child().stdout.take() {
        pipe.read_to_string(&mut stdout).unwrap();
    }
    (receiver.child().wait().unwrap(), stdout)
}

#[test]
fn print_writes_the_bytes_in_order_and_once_exits() {
    let receiver = RecvProcess::start_with(&["--once", "--print"], Stdio::piped());
    let verdict = send(
        &receiver,
        &[
            segment("shma", b'A', 3),
            segment("empty", b'E', 0),
            segment("shmb", b'B', 2),
        ],
    );
    assert!(verdict.is_accepted(), "{verdict:?}");
    let (status, stdout) = finish(receiver);
    assert!(status.success());
    assert_eq!(stdout, "AAABB");
}

#[test]
fn json_describes_each_transfer() {
    let receiver = RecvProcess::start_with(&["--once", "--json"], Stdio::piped());
    assert!(send(&receiver, &[segment("shma", b'A', 4 << 20)]).is_accepted());
    let (status, stdout) = finish(receiver);
    assert!(status.success());
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["id"], 1);
    assert_eq!(line["version"], "1.0");
    assert_eq!(line["segments"][0]["name"], "shma");
    assert_eq!(line["segments"][0]["size"], 4 << 20);
    assert_eq!(line["segments"][0]["head"], "41".repeat(16));
    let seals: Seals = line["segments"][0]["seals"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(seals.contains(Seals::SENDER_DEFAULT), "{seals}");
}

#[test]
fn out_stores_each_segment_and_refuses_escaping_names() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    let receiver = RecvProcess::start(&["--out", out.to_str().unwrap()]);
    let payload: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    let verdict = send(
        &receiver,
        &[
            SealedSegment::from_bytes("frame", &payload, Seals::SENDER_DEFAULT).unwrap(),
            segment("zero", 0, 0),
        ],
    );
    assert!(verdict.is_accepted(), "{verdict:?}");
    assert_eq!(std::fs::read(out.join("frame")).unwrap(), payload);
    assert_eq!(std::fs::read(out.join("zero")).unwrap(), b"");

    for name in ["..", ".", "a/b", ""] {
        match send(&receiver, &[segment(name, b'x', 1)]) {
            Verdict::Rejected {
                reason, message, ..
            } => {
                assert_eq!(
                    reason,
                    RejectReason::ApplicationRejected,
                    "{name:?}: {message}"
                );
                assert!(message.contains("could leave"), "{message}");
            }
            other => panic!("{name:?}: expected a rejection, got {other:?}"),
        }
    }
    let mut left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["frame", "zero"],
        "nothing else written, no partial files"
    );
}

#[test]
fn the_most_segments_a_message_can_carry() {
    let receiver = RecvProcess::start(&[]);
    let segments: Vec<_> = (0..MAX_SEGMENTS)
        .map(|i| segment(&format!("segment-{i:03}"), b'x', i as u64))
        .collect();
    assert!(send(&receiver, &segments).is_accepted());
}

#[test]
fn a_gigabyte_costs_no_copy() {
    // Sparse: zero-filled memfds cost no RAM on either side.
    let receiver = RecvProcess::start(&[]);
    assert!(send(&receiver, &[segment("big", 0, 1 << 30)]).is_accepted());
}

#[test]
fn require_seals_tightens_the_policy() {
    let receiver = RecvProcess::start(&["--require-seals", "shrink,grow,write,seal"]);
    let unsealable =
        SealedSegment::filled("s", b's', 8, Seals::SHRINK | Seals::GROW | Seals::WRITE).unwrap();
    match send(&receiver, &[unsealable]) {
        Verdict::Rejected { reason, .. } => assert_eq!(reason, RejectReason::MissingSeals),
        other => panic!("expected MissingSeals, got {other:?}"),
    }
    assert!(send(&receiver, &[segment("s", b's', 8)]).is_accepted());
}

fn recv_at(path: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sealpass-recv"))
        .arg("--socket")
        .arg(path)
        .arg("--once")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_stale_socket_is_replaced_but_nothing_else_is_touched() {
    let dir = tempfile::tempdir().unwrap();

    let regular = dir.path().join("not-a-socket");
    std::fs::write(&regular, b"precious").unwrap();
    let output = recv_at(&regular);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a socket; refusing to remove it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&regular).unwrap(), b"precious");

    // A socket nobody listens on: left by a receiver that died.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut receiver = Command::new(env!("CARGO_BIN_EXE_sealpass-recv"))
        .arg("--socket")
        .arg(&stale)
        .arg("--once")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sender = Sender::connect_with_retry(&stale, std::time::Duration::from_secs(10));
    // The stale file may still be there for an instant before it is replaced.
    let mut sender = sender.unwrap();
    assert!(sender.send(&[segment("s", b's', 1)]).unwrap().is_accepted());
    assert!(receiver.wait().unwrap().success());
    assert!(
        !stale.exists(),
        "the receiver removes its own socket on exit"
    );

    // A live one is not stolen.
    let live = RecvProcess::start(&[]);
    let output = recv_at(live.socket());
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is in use"));
    assert!(send(&live, &[segment("s", b's', 1)]).is_accepted());
}
