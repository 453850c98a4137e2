//! `sealpass-recv --compat` against a bare peer that sends fds the way plain
//! programs do: SOCK_STREAM, 256 bytes of filler, no header, unsealed memfds.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;

use nix::sys::memfd::{MFdFlags, memfd_create};
use sealpass_kernel::fdpass;
use support::RecvProcess;

/// A memfd made as plain programs make them: no sealing allowed, filled.
fn plain_memfd(name: &str, byte: u8, size: usize) -> OwnedFd {
    let fd = memfd_create(name, MFdFlags::empty()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::from(fd.try_clone().unwrap()),
        &vec![byte; size],
        0,
    )
    .unwrap();
    fd
}

fn bare_send(receiver: &RecvProcess, fds: &[OwnedFd]) {
    let socket = fdpass::connect_stream(receiver.socket()).unwrap();
    let junk: Vec<u8> = (0..=255).collect();
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    fdpass::send(socket.as_fd(), &junk, &borrowed).unwrap();
}

fn finish(mut receiver: RecvProcess) -> (bool, Vec<u8>, String) {
    let mut stdout = Vec::new();
    receiver
        .child()
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    let mut stderr = String::new();
    if let Some(mut pipe) = receiver.child().stderr.take() {
        pipe.read_to_string(&mut stderr).unwrap();
    }
    (receiver.child().wait().unwrap().success(), stdout, stderr)
}

#[test]
fn the_original_scenario_prints_both_memfds() {
    let receiver = RecvProcess::start_with(&["--compat", "--once", "--print"], Stdio::piped());
    bare_send(
        &receiver,
        &[
            plain_memfd("shma", b'A', 4 << 20),
            plain_memfd("shmb", b'B', 4 << 20),
        ],
    );
    let (ok, stdout, _) = finish(receiver);
    assert!(ok);
    assert_eq!(stdout.len(), 8 << 20);
    assert!(stdout[..4 << 20].iter().all(|&b| b == b'A'));
    assert!(stdout[4 << 20..].iter().all(|&b| b == b'B'));
}

#[test]
fn json_reports_what_the_kernel_says() {
    let receiver = RecvProcess::start_with(&["--compat", "--once", "--json"], Stdio::piped());
    bare_send(&receiver, &[plain_memfd("shma", b'A', 4096)]);
    let (ok, stdout, _) = finish(receiver);
    assert!(ok);
    let line: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(line["compat"], true);
    assert_eq!(line["segments"][0]["name"], "shma");
    assert_eq!(line["segments"][0]["size"], 4096);
    // A memfd made without MFD_ALLOW_SEALING reports F_SEAL_SEAL.
    assert_eq!(line["segments"][0]["seals"], "SEAL");
}

/// Reads exactly `len` bytes of the receiver's stdout, waiting at most 10 s.
fn printed(receiver: &mut RecvProcess, len: usize) -> Vec<u8> {
    let mut stdout = receiver.child().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = vec![0; len];
        let result = stdout.read_exact(&mut bytes).map(|()| (bytes, stdout));
        let _ = tx.send(result);
    });
    let (bytes, stdout) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the receiver printed too little")
        .unwrap();
    receiver.child().stdout = Some(stdout);
    bytes
}

#[test]
fn non_memfds_are_refused_and_the_receiver_keeps_serving() {
    let mut receiver = RecvProcess::start_with(&["--compat", "--print"], Stdio::piped());
    let baseline = receiver.idle_fds();
    let (pipe, _writer) = nix::unistd::pipe().unwrap();
    bare_send(&receiver, &[pipe, plain_memfd("good", b'g', 3)]);
    assert_eq!(printed(&mut receiver, 3), b"ggg");
    bare_send(&receiver, &[plain_memfd("next", b'n', 2)]);
    assert_eq!(printed(&mut receiver, 2), b"nn");
    receiver.wait_for_open_fds(baseline, "after two bare peers");
}

#[test]
fn required_seals_apply_in_compat_mode_too() {
    let mut receiver = RecvProcess::start_with(
        &["--compat", "--print", "--require-seals", "write"],
        Stdio::piped(),
    );
    bare_send(&receiver, &[plain_memfd("unsealed", b'u', 10)]);
    let sealed = sealpass_sender::SealedSegment::filled(
        "sealed",
        b's',
        4,
        sealpass_proto::Seals::SENDER_DEFAULT,
    )
    .unwrap()
    .into_fd();
    bare_send(&receiver, &[sealed]);
    // Served in order: had the unsealed memfd been accepted, its bytes would come first.
    assert_eq!(printed(&mut receiver, 4), b"ssss");
}

#[test]
fn once_counts_only_accepted_memfds_and_logs_say_what_happened() {
    let mut receiver = RecvProcess::start_with(&["--compat", "--once", "--print"], Stdio::piped());
    // A batch of refused fds only: logged as refused, and --once goes on.
    let (pipe, _writer) = nix::unistd::pipe().unwrap();
    bare_send(&receiver, &[pipe]);
    let refused = receiver.wait_for_log("refused a bare fd");
    assert!(refused.contains("expected a memfd"), "{refused}");
    bare_send(&receiver, &[plain_memfd("after", b'a', 5)]);
    assert_eq!(printed(&mut receiver, 5), b"aaaaa");
    let received = receiver.wait_for_log("received ");
    assert!(
        received.contains("received 1 bare memfd: after (5 bytes"),
        "{received}"
    );
    let status = receiver.child().wait().unwrap();
    assert!(status.success(), "{status}");
    let log = receiver.drain_log();
    assert!(
        !log.iter().any(|line| line.contains("received 0")),
        "{log:?}"
    );
}

#[test]
fn sigint_and_sigterm_end_compat_mode_with_0_and_remove_the_socket() {
    use nix::sys::signal::{Signal, kill};
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let mut receiver = RecvProcess::start(&["--compat"]);
        // Once while idle, once in the middle of a connection.
        let connection =
            (signal == Signal::SIGTERM).then(|| fdpass::connect_stream(receiver.socket()).unwrap());
        let socket = receiver.socket().to_owned();
        kill(
            nix::unistd::Pid::from_raw(receiver.child().id() as i32),
            signal,
        )
        .unwrap();
        let status = receiver.child().wait().unwrap();
        assert_eq!(status.code(), Some(0), "{signal}: {status}");
        assert!(!socket.exists(), "{signal}: the socket file is left behind");
        drop(connection);
    }
}
