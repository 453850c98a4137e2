//! `sealpass-send`, run as its own process, against a receiver in this test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;

use sealpass_proto::fdpass::{self, ControlBuffer};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{Policy, Seals};
use sealpass_receiver::{Listener, Outcome};

/// What the receiver saw of one segment.
#[derive(Debug, PartialEq)]
struct Seen {
    name: String,
    bytes: Vec<u8>,
    seals: Seals,
}

/// Serves one connection at `socket` under `policy`, reporting what arrived.
fn receiver(socket: &Path, policy: Policy) -> mpsc::Receiver<(Outcome, Vec<Seen>)> {
    let mut listener = Listener::bind(socket).unwrap();
    listener.set_policy(policy);
    let (report, reports) = mpsc::channel();
    thread::spawn(move || {
        let mut connection = listener.accept().unwrap();
        let mut seen = Vec::new();
        let outcome = connection
            .serve_one(|transfer| {
                for segment in transfer.segments() {
                    seen.push(Seen {
                        name: segment.name().to_owned(),
                        bytes: segment.bytes().to_vec(),
                        seals: segment.seals(),
                    });
                }
                Ok::<(), String>(())
            })
            .unwrap();
        report.send((outcome, seen)).unwrap();
    });
    reports
}

fn send(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    (dir, socket)
}

#[test]
fn a_64_mib_file_arrives_byte_for_byte_with_every_source_in_order() {
    let (dir, socket) = scratch();
    let file = dir.path().join("payload.bin");
    let content: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &content).unwrap();
    let reports = receiver(&socket, Policy::default());

    let file_spec = format!("big={}", file.display());
    let output = send(
        &socket,
        &[
            "--fill",
            "a=A:3",
            "--file",
            &file_spec,
            "--stdin",
            "piped",
            "--fill",
            "b=0x42:0x2",
        ],
        b"from stdin",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("accepted transfer 1: 4 segments"),
        "{stdout}"
    );

    let (outcome, seen) = reports.recv().unwrap();
    assert!(
        matches!(outcome, Outcome::Accepted { segments: 4, .. }),
        "{outcome:?}"
    );
    let names: Vec<_> = seen.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "big", "piped", "b"]);
    assert_eq!(seen[0].bytes, b"AAA");
    assert!(
        seen[1].bytes == content,
        "64 MiB file differs after the handoff"
    );
    assert_eq!(seen[2].bytes, b"from stdin");
    assert_eq!(seen[3].bytes, b"BB");
    for segment in &seen {
        assert!(
            segment.seals.contains(Seals::SENDER_DEFAULT),
            "{}",
            segment.seals
        );
    }
}

#[test]
fn a_rejection_exits_3_with_the_reason() {
    let (_dir, socket) = scratch();
    let reports = receiver(&socket, Policy::default());
    let output = send(
        &socket,
        &["--fill", "a=A:4K", "--seals", "shrink,grow"],
        b"",
    );
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("rejected transfer 1: MissingSeals"),
        "{stderr}"
    );
    assert!(stderr.contains("missing WRITE"), "{stderr}");
    assert!(matches!(
        reports.recv().unwrap().0,
        Outcome::Rejected { .. }
    ));
}

fn check_failure(args: &[&str], expected_stderr: &str) {
    let (_dir, socket) = scratch();
    let output = send(&socket, args, b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert_ne!(output.status.code(), Some(3), "{args:?}: not a rejection");
    assert!(stderr.contains(expected_stderr), "{args:?}: {stderr}");
}

#[test]
fn usage_and_connection_errors_are_clear() {
    check_failure(
        &["--fill", "a=A:4K"],
        "connecting to the receiver failed: connect failed: ENOENT",
    );
    check_failure(&["--fill", "a=A:4Q"], "invalid size \"4Q\"");
    check_failure(
        &["--fill", "a=AB:4"],
        "expected one ASCII character or 0xNN",
    );
    check_failure(&["--fill", "noequals"], "expected NAME=");
    check_failure(
        &["--file", "f=/nonexistent/file"],
        "opening /nonexistent/file",
    );
    check_failure(&[], "nothing to send");
    check_failure(
        &["--stdin", "a", "--stdin", "b"],
        "stdin can fill one segment",
    );
    check_failure(
        &["--fill", "a=A:1", "--seals", "shrnk"],
        "unknown seal \"shrnk\"",
    );
}

#[test]
fn a_receiver_that_dies_before_answering_means_delivery_unknown() {
    let (_dir, socket) = scratch();
    let listener = fdpass::listen(&socket, 1).unwrap();
    let dies = thread::spawn(move || {
        let connection = fdpass::accept(std::os::fd::AsFd::as_fd(&listener)).unwrap();
        let mut buffer = vec![0; MAX_MESSAGE_LEN];
        fdpass::receive(
            std::os::fd::AsFd::as_fd(&connection),
            &mut buffer,
            &mut ControlBuffer::new(),
        )
        .unwrap();
        // Took the message, then vanished without a word.
    });
    let output = send(&socket, &["--fill", "a=A:1"], b"");
    dies.join().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("delivery unknown"), "{stderr}");
}

#[test]
fn connect_timeout_waits_for_a_receiver_that_starts_late() {
    let (_dir, socket) = scratch();
    let late = socket.clone();
    let starter = thread::spawn(move || {
        thread::sleep(std::time::Duration::from_millis(400));
        receiver(&late, Policy::default())
    });
    let output = send(
        &socket,
        &["--connect-timeout", "20", "--fill", "a=A:1"],
        b"",
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (outcome, _) = starter.join().unwrap().recv().unwrap();
    assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");

    // Without it, an absent receiver is an immediate, clear failure.
    let (_dir, absent) = scratch();
    let output = send(&absent, &["--fill", "a=A:1"], b"");
    assert_eq!(output.status.code(), Some(1));
}
