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
    assert_eq!(line["peer"]["pid"], std::process::id());
    // SO_PEERPIDFD came with Linux 6.5.
    assert_eq!(line["peer"]["pidfd"], support::kernel_at_least(6, 5));
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
fn a_quarter_gigabyte_costs_no_copy() {
    // Zero-filled: allocated by the sender (fallocate), mapped by the
    // receiver, never copied.
    let receiver = RecvProcess::start(&[]);
    assert!(send(&receiver, &[segment("big", 0, 256 << 20)]).is_accepted());
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

/// The files in `dir`, sorted.
fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn out_is_atomic_under_concurrent_writers_of_one_name() {
    const WRITERS: u8 = 8;
    const SIZE: u64 = 4 << 20;
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let receiver = RecvProcess::start(&["--out", out.to_str().unwrap()]);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(usize::from(WRITERS)));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let socket = receiver.socket().to_owned();
            let barrier = std::sync::Arc::clone(&barrier);
            std::thread::spawn(move || {
                let segment = segment("same", b'a' + writer, SIZE);
                let mut sender = Sender::connect(&socket).unwrap();
                barrier.wait();
                sender.send(&[segment]).unwrap()
            })
        })
        .collect();
    for writer in writers {
        let verdict = writer.join().unwrap();
        assert!(verdict.is_accepted(), "{verdict:?}");
    }
    assert_eq!(files_in(&out), ["same"], "one copy, no temporary files");
    let stored = std::fs::read(out.join("same")).unwrap();
    assert_eq!(stored.len() as u64, SIZE);
    assert!(
        stored.iter().all(|&byte| byte == stored[0]) && (b'a'..b'a' + WRITERS).contains(&stored[0]),
        "the copy is one writer's, whole"
    );
}

#[test]
fn out_publishes_a_transfer_all_or_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    std::fs::create_dir_all(out.join("b")).unwrap();
    let receiver = RecvProcess::start(&["--out", out.to_str().unwrap()]);
    // `b` cannot be stored (a directory holds its name): `a`, written
    // first, must not appear either.
    match send(
        &receiver,
        &[segment("a", b'a', 4096), segment("b", b'b', 4096)],
    ) {
        Verdict::Rejected {
            reason, message, ..
        } => {
            assert_eq!(reason, RejectReason::ApplicationRejected, "{message}");
            assert!(message.contains("is a directory"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(files_in(&out), ["b"], "nothing published, nothing left");
    std::fs::remove_dir(out.join("b")).unwrap();
    assert!(
        send(
            &receiver,
            &[segment("a", b'a', 4096), segment("b", b'b', 4096)]
        )
        .is_accepted()
    );
    assert_eq!(files_in(&out), ["a", "b"]);
}

/// A pid no process has: a child that has exited and been reaped.
fn a_dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_receiver_removes_temporaries_that_dead_receivers_left() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path();
    let dead = format!(".sealpass-{}-0123abcd", a_dead_pid());
    let alive = format!(".sealpass-{}-0123abcd", std::process::id());
    for name in [
        dead.as_str(),
        ".sealpass-Ab12Cd",
        alive.as_str(),
        ".sealpass-notes",
        "kept",
    ] {
        std::fs::write(out.join(name), b"partial").unwrap();
    }
    let receiver = RecvProcess::start(&["--out", out.to_str().unwrap()]);
    let mut expected = vec![alive.as_str(), ".sealpass-notes", "kept", "recv.sock"];
    expected.sort();
    // The socket lives in its own directory: only the files above are here.
    let mut left = files_in(out);
    left.retain(|name| name != "recv.sock");
    expected.retain(|name| *name != "recv.sock");
    assert_eq!(
        left, expected,
        "a dead receiver's and an old version's temporaries go"
    );
    drop(receiver);
}

#[test]
fn a_receiver_killed_while_writing_leaves_no_file_under_a_name() {
    const SIZE: u64 = 256 << 20;
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    let mut receiver = RecvProcess::start(&["--out", out.to_str().unwrap()]);
    let mut sender = Sender::connect(receiver.socket()).unwrap();
    sender.submit(&[segment("big", b'k', SIZE)]).unwrap();
    // Killed once it has a file open in DIR, that is while it writes (or,
    // on a fast machine, just after): DIR holds the whole segment or nothing.
    let fds = format!("/proc/{}/fd", receiver.child().id());
    let writing = || {
        std::fs::read_dir(&fds).unwrap().any(|fd| {
            std::fs::read_link(fd.unwrap().path()).is_ok_and(|target| target.starts_with(&out))
        })
    };
    let started = std::time::Instant::now();
    while !writing() && out.join("big").metadata().is_err() {
        assert!(started.elapsed().as_secs() < 20, "the receiver never wrote");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    receiver.child().kill().unwrap();
    receiver.child().wait().unwrap();
    let left = files_in(&out);
    match left.as_slice() {
        [] => {}
        [name] if name == "big" => {
            assert_eq!(std::fs::metadata(out.join("big")).unwrap().len(), SIZE);
        }
        other => panic!("left behind: {other:?}"),
    }
}

#[test]
fn out_takes_every_legal_name() {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    let receiver = RecvProcess::start(&["--out", out.to_str().unwrap()]);
    let names: Vec<String> = [247, 248, 249]
        .iter()
        .map(|&len| "n".repeat(len - 1) + &len.to_string()[2..])
        .collect();
    for name in &names {
        let verdict = send(&receiver, &[segment(name, b'n', 10)]);
        assert!(
            verdict.is_accepted(),
            "{}-byte name: {verdict:?}",
            name.len()
        );
        assert_eq!(std::fs::read(out.join(name)).unwrap(), b"nnnnnnnnnn");
    }
    assert_eq!(files_in(&out).len(), names.len(), "no temporary files left");
}

#[test]
fn out_is_checked_before_binding() {
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("never.sock");
    let file = scratch.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let deep = scratch.path().join("missing-parent").join("out");
    let cases = [
        (file.to_str().unwrap(), "exists and is not a directory"),
        (deep.to_str().unwrap(), "neither does its parent"),
        ("/proc", "cannot create files in it"),
    ];
    for (dir, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_sealpass-recv"))
            .args(["--socket", socket.to_str().unwrap(), "--out", dir])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "--out {dir}: {stderr}");
        assert!(stderr.contains(expected), "--out {dir}: {stderr}");
        assert!(!socket.exists(), "--out {dir}: bound before checking");
    }
    assert!(
        !scratch.path().join("missing-parent").exists(),
        "no directory tree is created"
    );
    // A missing last component is created when its parent exists.
    let fresh = scratch.path().join("fresh");
    let receiver = RecvProcess::start(&["--out", fresh.to_str().unwrap()]);
    assert!(send(&receiver, &[segment("made", b'm', 1)]).is_accepted());
    assert_eq!(std::fs::read(fresh.join("made")).unwrap(), b"m");
}

/// A sealed memfd of `size` bytes of which only the first page is written.
/// Sends one transfer of memfds sealed SEAL|SHRINK|GROW|WRITE, each
/// `(name, size, written)`: written in full, or left all holes. Sent as it
/// is, on a connection of its own (the sender library would back the holes
/// first); returns the answer.
fn send_raw(receiver: &RecvProcess, segments: &[(&str, u64, bool)]) -> sealpass_proto::Message {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use sealpass_kernel::fdpass;
    use sealpass_proto::{Message, Segment, Transfer, encode};
    use std::os::fd::AsFd;
    let seals = Seals::SENDER_DEFAULT;
    let fds: Vec<_> = segments
        .iter()
        .map(|&(name, size, written)| {
            let fd =
                memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
            nix::unistd::ftruncate(&fd, size as i64).unwrap();
            if written {
                nix::sys::uio::pwrite(&fd, &vec![b'w'; size as usize], 0).unwrap();
            }
            fcntl(
                &fd,
                FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals.bits() as i32)),
            )
            .unwrap();
            fd
        })
        .collect();
    let declared = segments
        .iter()
        .map(|&(name, size, _)| Segment::new(name.to_owned(), size, seals))
        .collect();
    let bytes = encode(&Message::Transfer(Transfer::new(1, declared))).unwrap();
    let connection = fdpass::connect(receiver.socket()).unwrap();
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    fdpass::send(connection.as_fd(), &bytes, &borrowed).unwrap();
    support::answer_to(&connection).expect("an answer")
}

fn reject_of(answer: sealpass_proto::Message) -> sealpass_proto::Reject {
    match answer {
        sealpass_proto::Message::Reject(reject) => reject,
        other => panic!("expected a Reject, got {other:?}"),
    }
}

#[test]
fn sparse_memfds_are_refused_unless_allowed_and_then_count_whole() {
    // Refused by default: read, 512 MiB of holes would be charged to the
    // receiver, for as long as the sender keeps the memfd.
    let receiver = RecvProcess::start(&[]);
    let reject = reject_of(send_raw(&receiver, &[("holes", 512 << 20, false)]));
    assert_eq!(reject.reason, RejectReason::Sparse, "{}", reject.message);
    let reject = reject_of(send_raw(
        &receiver,
        &[("whole", 8192, true), ("holes", 1 << 20, false)],
    ));
    assert_eq!((reject.id, reject.reason), (1, RejectReason::Sparse));
    assert_eq!(
        reject.message,
        "segment 1 (\"holes\"): memfd has 0 of its 1048576 bytes allocated; \
         this receiver refuses sparse memfds, whose holes would be allocated on read"
    );
    assert!(send(&receiver, &[segment("whole", b'w', 8192)]).is_accepted());
    assert!(send(&receiver, &[segment("empty", 0, 0)]).is_accepted());
    drop(receiver);

    // Accepted on request, and counted by size, not by what is allocated.
    let receiver = RecvProcess::start(&["--allow-sparse", "--max-mapped-per-connection", "1MiB"]);
    assert!(matches!(
        send_raw(&receiver, &[("holes", 1 << 20, false)]),
        sealpass_proto::Message::Ack(_)
    ));
    let reject = reject_of(send_raw(&receiver, &[("holes", 2 << 20, false)]));
    assert_eq!(
        reject.reason,
        RejectReason::MemoryLimit,
        "a 2 MiB sparse memfd counts as 2 MiB"
    );
}

#[test]
fn version_help_and_start_up_line_read_well() {
    let run = |arg: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_sealpass-recv"))
            .arg(arg)
            .output()
            .unwrap();
        assert!(output.status.success(), "{arg}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(
        run("--version"),
        format!("sealpass-recv {}\n", env!("CARGO_PKG_VERSION"))
    );
    let help = run("--help");
    for expected in [
        "seal, shrink, grow, write, future_write, exec",
        "Exit status: 0",
        "2 a usage error",
        "RUST_LOG",
        "SIGINT or SIGTERM",
        "--allow-sparse",
        "A RISK",
    ] {
        assert!(
            help.contains(expected),
            "--help lacks {expected:?}:\n{help}"
        );
    }
    let doctor = run("--doctor");
    for expected in [
        "kernel: ",
        "vm.memfd_noexec: ",
        "shmem transparent huge pages: ",
        "RLIMIT_NOFILE: ",
        "change: ",
    ] {
        assert!(
            doctor.contains(expected),
            "--doctor lacks {expected:?}:\n{doctor}"
        );
    }
    let receiver = RecvProcess::start(&["--max-mapped-total", "16GiB"]);
    let line = receiver.started_line();
    assert!(
        line.contains("requiring seals SHRINK|GROW|WRITE, no holes; at most 128 connections, 253 segments per message, 8 GiB mapped per connection and 16 GiB in all; first message within 10 s, idle timeout 30 s; admitting any peer"),
        "{line}"
    );
    assert!(!line.contains('{'), "no Debug dumps: {line}");
}

#[test]
fn json_ids_name_a_transfer_across_connections() {
    let receiver = RecvProcess::start_with(&["--json"], Stdio::piped());
    for _ in 0..2 {
        assert!(send(&receiver, &[segment("a", b'a', 1)]).is_accepted());
    }
    let (_, stdout) = {
        let mut receiver = receiver;
        receiver.stop();
        finish(receiver)
    };
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let keys: Vec<_> = lines
        .iter()
        .map(|line| {
            (
                line["connection"].as_u64().unwrap(),
                line["id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(keys, [(1, 1), (2, 1)], "{stdout}");
}

/// Protocol 1.1 at the receiver's command line: `--json` gives the
/// metadata (UTF-8 where valid, hex otherwise), `--print` the bytes alone,
/// and `--out` stores the metadata beside the segments, published with them.
#[test]
fn metadata_reaches_json_print_and_out() {
    let fields: &[(&str, &[u8])] = &[
        ("frame", b"42"),
        ("raw", &[0xff, 0x00, 0x41]),
        ("note", "h\u{e9}llo".as_bytes()),
    ];
    let send_to = |receiver: &RecvProcess| {
        let verdict = Sender::connect(receiver.socket())
            .unwrap()
            .send_with(&[segment("a", b'A', 3)], fields)
            .unwrap();
        assert!(verdict.is_accepted(), "{verdict:?}");
    };
    let expected = serde_json::json!([
        {"key": "frame", "value": "42", "encoding": "utf-8"},
        {"key": "raw", "value": "ff0041", "encoding": "hex"},
        {"key": "note", "value": "h\u{e9}llo", "encoding": "utf-8"},
    ]);

    let receiver = RecvProcess::start_with(&["--once", "--print", "--json"], Stdio::piped());
    send_to(&receiver);
    let line = receiver.wait_for_log("\"metadata\"");
    let (status, stdout) = finish(receiver);
    assert!(status.success());
    assert_eq!(stdout, "AAA", "--print writes the bytes alone");
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["version"], "1.1");
    assert_eq!(line["metadata"], expected);

    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out");
    let receiver = RecvProcess::start(&["--once", "--out", out.to_str().unwrap()]);
    send_to(&receiver);
    let (status, _) = finish(receiver);
    assert!(status.success());
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"AAA");
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sealpass-metadata.json")).unwrap())
            .unwrap();
    assert_eq!(stored, expected);
}
