//! `sealpass-recv` as a long-lived service: access control, limits, fds
//! running out, signals, and peers killed mid-stream. Each test runs the real
//! binary and stops by itself.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sealpass_kernel::fdpass;
use sealpass_proto::{Message, RejectReason, Seals};
use sealpass_receiver::service::SHUTDOWN_GRACE;
use sealpass_sender::{SealedSegment, Sender, Verdict};
use support::{RecvProcess, answer_to};

fn segment(name: &str, size: u64) -> SealedSegment {
    SealedSegment::filled(name, b'x', size, Seals::SENDER_DEFAULT).unwrap()
}

fn send(receiver: &RecvProcess, segments: &[SealedSegment]) -> Verdict {
    let mut sender = Sender::connect(receiver.socket()).unwrap();
    sender
        .set_answer_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sender.send(segments).unwrap()
}

fn reason_of(verdict: Verdict) -> RejectReason {
    match verdict {
        Verdict::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The reject a refused connection gets before anything is sent, then the close.
fn refused_at_connect(receiver: &RecvProcess) -> RejectReason {
    let connection = fdpass::connect(receiver.socket()).unwrap();
    let reason = match answer_to(&connection) {
        Some(Message::Reject(reject)) => reject.reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        answer_to(&connection),
        None,
        "a refused connection is closed"
    );
    reason
}

fn signal(receiver: &mut RecvProcess, signal: Signal) {
    kill(Pid::from_raw(receiver.child().id() as i32), signal).unwrap();
}

#[test]
fn access_control_by_uid_and_gid() {
    // This test's own credentials.
    let me = std::fs::metadata("/proc/self").unwrap();
    let (uid, gid) = (
        std::os::unix::fs::MetadataExt::uid(&me),
        std::os::unix::fs::MetadataExt::gid(&me),
    );
    let other = (uid + 4242).to_string();
    let cases: [(Vec<String>, bool); 5] = [
        (vec![], true),
        (vec!["--allow-uid".into(), uid.to_string()], true),
        (vec!["--allow-uid".into(), other.clone()], false),
        (
            vec![
                "--allow-uid".into(),
                other.clone(),
                "--allow-gid".into(),
                gid.to_string(),
            ],
            true,
        ),
        (vec!["--allow-gid".into(), (gid + 4242).to_string()], false),
    ];
    for (flags, allowed) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let receiver = RecvProcess::start(&flags);
        if allowed {
            assert!(
                send(&receiver, &[segment("s", 8)]).is_accepted(),
                "{flags:?}"
            );
        } else {
            assert_eq!(
                refused_at_connect(&receiver),
                RejectReason::NotAllowed,
                "{flags:?}"
            );
        }
    }
}

#[test]
fn allow_lists_the_socket_mode_shuts_out_are_warned_of() {
    let me = std::fs::metadata("/proc/self").unwrap();
    let (uid, gid) = (
        std::os::unix::fs::MetadataExt::uid(&me),
        std::os::unix::fs::MetadataExt::gid(&me),
    );
    let other_uid = (uid + 4242).to_string();
    let other_gid = (gid + 4242).to_string();
    let own_gid = gid.to_string();
    // (flags, the warnings expected, each by what it starts with)
    let cases: &[(&[&str], &[String])] = &[
        (
            &["--allow-uid", &other_uid],
            &[format!("--allow-uid {other_uid} admits")],
        ),
        (
            &["--allow-gid", &other_gid, "--mode", "660"],
            &[format!("--allow-gid {other_gid} admits")],
        ),
        (
            &["--allow-gid", &own_gid],
            &[format!("--allow-gid {own_gid} admits")],
        ),
        (&["--allow-uid", &other_uid, "--mode", "660"], &[]),
        (&["--allow-gid", &own_gid, "--mode", "660"], &[]),
        (
            &[
                "--allow-uid",
                &other_uid,
                "--allow-gid",
                &other_gid,
                "--mode",
                "666",
            ],
            &[],
        ),
        (&[], &[]),
    ];
    for (flags, expected) in cases {
        let mut receiver = RecvProcess::start(flags);
        // The warnings come right after the start-up line; everything is
        // logged by the time it says it stopped.
        receiver.stop();
        let warned: Vec<String> = receiver
            .log_until("stopped")
            .iter()
            .filter_map(|line| line.split_once(" WARN sealpass_recv: "))
            .map(|(_, warning)| warning.to_owned())
            .collect();
        assert_eq!(warned.len(), expected.len(), "{flags:?}: {warned:?}");
        for (line, start) in warned.iter().zip(expected.iter()) {
            assert!(
                line.starts_with(start.as_str()) && line.contains("--mode 660"),
                "{flags:?}: {line}"
            );
        }
    }
}

#[test]
fn the_socket_is_owner_only_unless_told_otherwise() {
    for (flags, mode) in [(&[][..], 0o600), (&["--mode", "660"][..], 0o660)] {
        let receiver = RecvProcess::start(flags);
        let found = std::fs::metadata(receiver.socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(found, mode, "{flags:?}");
    }
}

#[test]
fn a_connection_over_the_limit_is_refused_clearly_and_service_recovers() {
    let receiver = RecvProcess::start(&["--max-connections", "2"]);
    let mut held: Vec<Sender> = (0..2)
        .map(|i| {
            let mut sender = Sender::connect(receiver.socket()).unwrap();
            // A transfer answered proves the connection is being served.
            assert!(
                sender
                    .send(&[segment(&format!("held-{i}"), 8)])
                    .unwrap()
                    .is_accepted()
            );
            sender
        })
        .collect();
    assert_eq!(
        refused_at_connect(&receiver),
        RejectReason::TooManyConnections
    );
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut sender = Sender::connect(receiver.socket()).unwrap();
        match sender.send(&[segment("after", 8)]) {
            Ok(verdict) if verdict.is_accepted() => break,
            other => assert!(Instant::now() < deadline, "never recovered: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sender refused at connect reads the `Reject` whatever it meets first:
/// `EPIPE` on its send, `ECONNRESET` on its read, or the answer itself.
#[test]
fn a_refusal_at_connect_reaches_the_sender_every_time() {
    const RUNS: usize = 20;
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let other = (me + 4242).to_string();
    let not_allowed = RecvProcess::start(&["--allow-uid", &other]);
    let full = RecvProcess::start(&["--max-connections", "1"]);
    let mut held = Sender::connect(full.socket()).unwrap();
    assert!(held.send(&[segment("held", 8)]).unwrap().is_accepted());
    for (receiver, expected) in [
        (&not_allowed, RejectReason::NotAllowed),
        (&full, RejectReason::TooManyConnections),
    ] {
        for run in 0..RUNS {
            let verdict = send(receiver, &[segment("refused", 64 << 10)]);
            match verdict {
                Verdict::Rejected { id: 0, reason, .. } if reason == expected => {}
                other => panic!("run {run}: expected Reject({expected}) with id 0, got {other:?}"),
            }
        }
    }
    drop(held);
}

#[test]
fn limits_on_segments_and_mapped_bytes_each_have_their_reason() {
    let receiver =
        RecvProcess::start(&["--max-segments", "2", "--max-mapped-per-connection", "1MiB"]);
    let three = [segment("a", 1), segment("b", 1), segment("c", 1)];
    assert_eq!(
        reason_of(send(&receiver, &three)),
        RejectReason::TooManySegments
    );
    assert_eq!(
        reason_of(send(&receiver, &[segment("big", 2 << 20)])),
        RejectReason::MemoryLimit
    );
    assert!(send(&receiver, &[segment("a", 1 << 19), segment("b", 1 << 19)]).is_accepted());
}

/// A peer that sends transfers and never reads an answer, until the
/// receiver stops reading it (its answers fill the peer's queue, and the
/// receiver's send to it blocks). Returns the connection, still open.
fn connect_a_peer_that_never_reads(receiver: &RecvProcess) -> OwnedFd {
    use sealpass_proto::Transfer;
    let connection = fdpass::connect(receiver.socket()).unwrap();
    fdpass::set_timeouts(connection.as_fd(), None, Some(Duration::from_millis(500))).unwrap();
    let frame = segment("s", 64);
    for id in 1..=10_000 {
        let message = Message::Transfer(Transfer::new(id, vec![frame.declaration().clone()]));
        let bytes = sealpass_proto::encode(&message).unwrap();
        if fdpass::send(connection.as_fd(), &bytes, &[frame.fd()]).is_err() {
            return connection;
        }
    }
    panic!("the receiver read 10,000 transfers whose answers were never read");
}

/// Waits for the receiver to exit, at most `limit`.
fn exit_within(receiver: &mut RecvProcess, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = receiver.child().try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stopping_takes_bounded_time_whatever_peers_do_and_a_second_signal_exits_at_once() {
    // No idle timeout: nothing else bounds the wait on a peer that does not read.
    let mut receiver = RecvProcess::start(&["--idle-timeout", "0"]);
    let _stuck = connect_a_peer_that_never_reads(&receiver);
    signal(&mut receiver, Signal::SIGTERM);
    let status = exit_within(&mut receiver, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    let log = receiver.log_until("stopped");
    for said in ["stopping: finishing 1 connection(s)", "closing them"] {
        assert!(
            log.iter().any(|line| line.contains(said)),
            "{said:?} not in {log:#?}"
        );
    }

    let mut receiver = RecvProcess::start(&["--idle-timeout", "0"]);
    let _stuck = connect_a_peer_that_never_reads(&receiver);
    signal(&mut receiver, Signal::SIGTERM);
    receiver.wait_for_log("stopping: finishing");
    let asked = Instant::now();
    signal(&mut receiver, Signal::SIGINT);
    let status = exit_within(&mut receiver, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130));
    assert!(asked.elapsed() < SHUTDOWN_GRACE, "{:?}", asked.elapsed());
}

#[test]
fn sigterm_answers_what_was_sent_removes_the_socket_and_exits_0() {
    let mut receiver = RecvProcess::start(&[]);
    let idle = receiver.idle_fds();
    let connection = fdpass::connect(receiver.socket()).unwrap();
    // Wait until the receiver has accepted it (its fd count grows).
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.open_fds() <= idle {
        assert!(Instant::now() < deadline, "the receiver never accepted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let memfd = segment("in-flight", 4096);
    let header = sealpass_proto::encode(&Message::Transfer(sealpass_proto::Transfer::new(
        1,
        vec![memfd.declaration().clone()],
    )))
    .unwrap();
    fdpass::send(connection.as_fd(), &header, &[memfd.fd()]).unwrap();
    signal(&mut receiver, Signal::SIGTERM);
    match answer_to(&connection) {
        Some(Message::Ack(ack)) => assert_eq!(ack.id, 1),
        other => panic!("the in-flight transfer must be answered; got {other:?}"),
    }
    assert_eq!(answer_to(&connection), None, "then the connection closes");
    let status = receiver.child().wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!receiver.socket().exists(), "its own socket is removed");
}

/// Starts `sealpass-recv` with RLIMIT_NOFILE lowered to `soft` (and `hard`).
fn recv_with_nofile(
    soft: u32,
    hard: u32,
    dir: &std::path::Path,
) -> (std::process::Child, std::path::PathBuf) {
    let socket = dir.join("nofile.sock");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg(env!("CARGO_BIN_EXE_sealpass-recv"))
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs the receiver with a lowered fd limit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fdpass::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, socket)
}

#[test]
fn the_receiver_raises_its_soft_fd_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _socket) = recv_with_nofile(64, 4096, dir.path());
    // prlimit execs the receiver: the child's pid is the receiver's.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let figures: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(figures, ["4096", "4096"], "{open_files}");
}

#[test]
fn when_fds_run_short_new_work_is_refused_cleanly_and_service_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket) = recv_with_nofile(32, 32, dir.path());
    // Hold connections until the receiver runs out of fds and says so. Each
    // connection sends a header without its fd: one being served answers
    // FdCountMismatch and stays open; one refused at accept gets the refusal.
    let probe = sealpass_proto::encode(&Message::Transfer(sealpass_proto::Transfer::new(
        1,
        vec![sealpass_proto::Segment::new(
            "probe",
            1,
            Seals::SENDER_DEFAULT,
        )],
    )))
    .unwrap();
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut refused = None;
    for _ in 0..64 {
        let connection = fdpass::connect(&socket).unwrap();
        // A refused connection may be closed before the probe goes out.
        let _ = fdpass::send(connection.as_fd(), &probe, &[]);
        match answer_to(&connection) {
            Some(Message::Reject(reject)) if reject.reason == RejectReason::FdCountMismatch => {
                held.push(connection); // served, now silently waiting
            }
            other => {
                refused = other;
                break;
            }
        }
    }
    match refused {
        Some(Message::Reject(reject)) => assert_eq!(
            reject.reason,
            RejectReason::ResourceExhausted,
            "{}",
            reject.message
        ),
        other => panic!("expected a ResourceExhausted refusal once fds ran out; got {other:?}"),
    }
    // A transfer with more fds than are left: refused, not a crash.
    if let Some(connection) = held.last() {
        let segments: Vec<_> = (0..40).map(|i| segment(&format!("f{i}"), 1)).collect();
        let header = sealpass_proto::encode(&Message::Transfer(sealpass_proto::Transfer::new(
            1,
            segments.iter().map(|s| s.declaration().clone()).collect(),
        )))
        .unwrap();
        let fds: Vec<_> = segments.iter().map(SealedSegment::fd).collect();
        fdpass::send(connection.as_fd(), &header, &fds).unwrap();
        fdpass::set_timeouts(connection.as_fd(), Some(Duration::from_secs(10)), None).unwrap();
        match answer_to(connection) {
            Some(Message::Reject(reject)) => {
                assert_eq!(
                    reject.reason,
                    RejectReason::ControlTruncated,
                    "{}",
                    reject.message
                )
            }
            other => panic!("expected a refusal of the fd flood, got {other:?}"),
        }
    }
    // Free the fds: the receiver recovers.
    held.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let verdict = Sender::connect(&socket).and_then(|mut s| s.send(&[segment("recovered", 8)]));
        match verdict {
            Ok(verdict) if verdict.is_accepted() => break,
            other => assert!(Instant::now() < deadline, "never recovered: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the receiver is still running"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn killed_peers_are_reported_and_nothing_hangs() {
    let mut receiver = RecvProcess::start_with(&["--print"], Stdio::piped());
    let mut printed = receiver.child().stdout.take().unwrap();
    // Built beside sealpass-recv by `cargo test --workspace` (cargo xtask test).
    let send_binary =
        std::path::Path::new(env!("CARGO_BIN_EXE_sealpass-recv")).with_file_name("sealpass-send");
    assert!(
        send_binary.exists(),
        "{} missing: run `cargo xtask test` or `cargo test --workspace`",
        send_binary.display()
    );
    let sender = |name: &str| {
        Command::new(&send_binary)
            .arg("--socket")
            .arg(receiver.socket())
            .args([
                "--answer-timeout",
                "20",
                "--fill",
                &format!("{name}=x:1MiB"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut one_byte = [0u8; 1];

    // A sender killed while the receiver is still handling its transfer
    // (blocked printing into a pipe nobody reads yet).
    let mut doomed = sender("doomed");
    printed.read_exact(&mut one_byte).unwrap();
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let mut rest = vec![0; (1 << 20) - 1];
    printed.read_exact(&mut rest).unwrap();
    // The receiver reports it (its Ack went nowhere) and still serves.
    let report = receiver.wait_for_log("connection ended");
    assert!(report.contains("EPIPE"), "{report}");
    assert!(send(&receiver, &[segment("after-kill", 3)]).is_accepted());
    let mut three = [0u8; 3];
    printed.read_exact(&mut three).unwrap();

    // The receiver killed while a sender waits for its answer.
    let waiting = sender("orphan");
    printed.read_exact(&mut one_byte).unwrap();
    signal(&mut receiver, Signal::SIGKILL);
    let started = Instant::now();
    let output = waiting.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the sender hung"
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("delivery unknown"), "{stderr}");
}
