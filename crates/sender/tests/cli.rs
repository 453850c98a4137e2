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

use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use std::os::fd::AsFd;

use sealpass_proto::{Message, Reject, RejectReason, Seals, encode};
use sealpass_receiver::Listener;

/// What the receiver saw of one segment.
#[derive(Debug, PartialEq)]
struct Seen {
    name: String,
    bytes: Vec<u8>,
    seals: Seals,
}

/// What became of the first transfer a receiver was sent.
#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted {
        segments: usize,
    },
    /// Refused by the receiver's checks (and answered so).
    Rejected,
}

/// Serves one connection at `socket`, reporting what arrived.
fn receiver(socket: &Path) -> mpsc::Receiver<(Outcome, Vec<Seen>)> {
    let listener = Listener::bind(socket).unwrap();
    let (report, reports) = mpsc::channel();
    thread::spawn(move || {
        let mut connection = listener.accept().unwrap();
        let mut seen = Vec::new();
        let outcome = match connection.receive().unwrap() {
            Some(transfer) => {
                for segment in transfer.segments() {
                    seen.push(Seen {
                        name: segment.name().to_owned(),
                        bytes: segment.bytes().to_vec(),
                        seals: segment.seals(),
                    });
                }
                let segments = transfer.segments().len();
                transfer.accept().unwrap();
                Outcome::Accepted { segments }
            }
            None if connection.refused() > 0 => Outcome::Rejected,
            None => panic!("the sender sent nothing"),
        };
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
    let reports = receiver(&socket);

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

/// `--hugetlb` takes the pool for a segment of whole huge pages where the
/// pool has room (the VM steps boot with one), makes the rest in shmem,
/// says which, and the bytes arrive either way.
#[test]
fn hugetlb_segments_say_where_their_pages_came_from() {
    let (dir, socket) = scratch();
    let file = dir.path().join("two-mib.bin");
    let content: Vec<u8> = (0..2u32 << 20).map(|i| (i % 241) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    let pool = sealpass_kernel::host::HugeTlbPool::read();
    let room = pool.map_or(0, |pool| pool.room());
    let reports = receiver(&socket);
    let file_spec = format!("file={}", file.display());
    let output = send(
        &socket,
        &[
            "--hugetlb",
            "--fill",
            "whole=W:2MiB",
            "--file",
            &file_spec,
            "--fill",
            "odd=O:5KiB",
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shmem = "(shmem pages: the hugetlb pool did not take it)";
    // Each 2 MiB segment needs one huge page, if 2 MiB is the machine's size.
    let huge_page_is_2_mib = pool.is_some_and(|pool| pool.page_bytes == 2 << 20);
    let whole = if huge_page_is_2_mib && room >= 2 {
        "(hugetlb pages)"
    } else {
        shmem
    };
    let lines: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            format!(
                "  whole 2097152 bytes sealed {} {whole}",
                lines[0].split_whitespace().nth(4).unwrap()
            ),
            format!(
                "  file 2097152 bytes sealed {} {whole}",
                lines[1].split_whitespace().nth(4).unwrap()
            ),
            format!(
                "  odd 5120 bytes sealed {} {shmem}",
                lines[2].split_whitespace().nth(4).unwrap()
            ),
        ],
        "pool room {room}"
    );
    let (outcome, seen) = reports.recv().unwrap();
    assert!(
        matches!(outcome, Outcome::Accepted { segments: 3, .. }),
        "{outcome:?}"
    );
    assert_eq!(seen[0].bytes, vec![b'W'; 2 << 20]);
    assert!(
        seen[1].bytes == content,
        "the file differs after the handoff"
    );
    assert_eq!(seen[2].bytes, vec![b'O'; 5 << 10]);
}

#[test]
fn a_rejection_exits_3_with_the_reason() {
    let (_dir, socket) = scratch();
    let reports = receiver(&socket);
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
    assert!(matches!(reports.recv().unwrap().0, Outcome::Rejected));
}

/// Runs the sender against no receiver with `args`; see [`check_failure_at`].
fn check_failure(args: &[&str], code: i32, expected: &str) {
    let (_dir, socket) = scratch();
    check_failure_at(&socket, args, code, expected);
}

#[test]
fn usage_errors_exit_2_before_any_memfd_or_connection() {
    let longest = "n".repeat(249);
    let too_long = format!("{}=A:1", "n".repeat(250));
    let many: Vec<String> = (0..254).map(|i| format!("s{i}=A:1")).collect();
    let mut too_many: Vec<&str> = Vec::new();
    for spec in &many {
        too_many.extend(["--fill", spec]);
    }
    let cases: &[(&[&str], &str)] = &[
        (&[], "nothing to send"),
        (&["--fill", "a=A:4Q"], "invalid size \"4Q\""),
        (
            &["--fill", "a=AB:4"],
            "expected one ASCII character or 0xNN",
        ),
        (&["--fill", "a=0x100:4"], "expected 0x00 to 0xff"),
        (&["--fill", "noequals"], "expected NAME=BYTE:SIZE"),
        (&["--fill", "a=A"], "expected NAME=BYTE:SIZE"),
        (&["--file", "nopath"], "expected NAME=PATH"),
        (
            &["--stdin", "a", "--stdin", "b"],
            "cannot be used multiple times",
        ),
        (
            &["--fill", &too_long],
            "name of 250 bytes; expected at most 249",
        ),
        (&too_many, "254 segments; expected at most 253"),
        (
            // A 4 GiB fill is never made: the duplicate is found first.
            &["--fill", "dup=A:4G", "--fill", "dup=B:1"],
            "name \"dup\" is already the name of segment 0",
        ),
        (
            &["--fill", "a=A:1", "--stdin", "a"],
            "already the name of segment 0",
        ),
        (
            &["--fill", "a=A:1", "--seals", "shrnk"],
            "unknown seal \"shrnk\"",
        ),
        (
            &["--fill", "a=A:1", "--connect-timeout=-1"],
            "expected a number of seconds",
        ),
        (
            &["--fill", "a=A:1", "--answer-timeout", "soon"],
            "expected a number of seconds",
        ),
    ];
    for (args, expected) in cases {
        check_failure(args, 2, expected);
    }
    // The longest legal name is no usage error: this fails later, at connect.
    check_failure(
        &["--fill", &format!("{longest}=A:1")],
        1,
        "connecting to the receiver",
    );
}

#[test]
fn sources_of_unknown_length_are_refused_or_bounded() {
    let scratch_dir = tempfile::tempdir().unwrap();
    let fifo = scratch_dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let fifo_spec = format!("f={}", fifo.display());
    let cases: &[(&[&str], &str)] = &[
        // /dev/zero would grow a memfd until memory ran out; a FIFO with no
        // writer would block for ever.
        (
            &["--file", "z=/dev/zero"],
            "is a character device, not a regular file",
        ),
        (&["--file", &fifo_spec], "is a FIFO, not a regular file"),
    ];
    for (args, expected) in cases {
        let (_dir, socket) = scratch();
        let _receiver = receiver(&socket);
        let started = std::time::Instant::now();
        check_failure_at(&socket, args, 1, expected);
        assert!(
            started.elapsed().as_secs() < 10,
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    // A stream past its bound: refused, with the flag that raises it.
    let (_dir, socket) = scratch();
    let _receiver = receiver(&socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
        .arg("--socket")
        .arg(&socket)
        .args(["--stdin", "s", "--max-stream-size", "1MiB"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("more than 1048576 bytes") && stderr.contains("--max-stream-size"),
        "{stderr}"
    );
}

#[test]
fn connection_errors_name_the_socket_once_and_hint_at_the_fix() {
    // Nobody there: said once, with the path and what to do, and found
    // before any source is read (the missing file is never opened).
    let (dir, socket) = scratch();
    let output = send(&socket, &["--file", "f=/nonexistent/file"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "sealpass-send: error: connecting to the receiver at {} failed: connect failed: ENOENT: No such file or directory\n\
         hint: no socket at {}: start `sealpass-recv --socket {}` first, or pass --connect-timeout SECS to wait for it\n",
        socket.display(),
        socket.display(),
        socket.display()
    );
    assert_eq!(stderr, expected);

    // With a receiver there, a source that cannot be read is the error.
    let _reports = receiver(&socket);
    check_failure_at(
        &socket,
        &["--file", "f=/nonexistent/file"],
        1,
        "opening /nonexistent/file failed: No such file or directory",
    );

    // A compat (SOCK_STREAM) receiver: EPROTOTYPE, and which mode to use.
    let stream = dir.path().join("stream.sock");
    let _listener = fdpass::listen_stream(&stream, 1).unwrap();
    check_failure_at(
        &stream,
        &["--fill", "a=A:1"],
        1,
        "connect failed: EPROTOTYPE: Protocol wrong type for socket\nhint: the receiver at",
    );
    check_failure_at(
        &stream,
        &["--fill", "a=A:1"],
        1,
        "pass --compat to send bare fds",
    );
    // And the reverse: --compat at a sealpass receiver.
    let seqpacket = dir.path().join("seqpacket.sock");
    let _listener = fdpass::listen(&seqpacket, 1).unwrap();
    check_failure_at(
        &seqpacket,
        &["--compat", "--fill", "a=A:1"],
        1,
        "drop --compat",
    );
    // A socket file nobody listens at.
    let stale = dir.path().join("stale.sock");
    drop(fdpass::listen(&stale, 1).unwrap());
    check_failure_at(&stale, &["--fill", "a=A:1"], 1, "nothing listens there");
    // Not a socket at all.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"").unwrap();
    check_failure_at(&file, &["--fill", "a=A:1"], 1, "is not a socket");
}

/// Runs the sender at `socket` with `args`; it must exit `code` and print
/// `expected` on stderr, with no cause repeated.
fn check_failure_at(socket: &Path, args: &[&str], code: i32, expected: &str) {
    let output = send(socket, args, b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    for cause in ["ENOENT", "EPROTOTYPE", "No such file or directory"] {
        assert!(
            stderr.matches(cause).count() <= 1,
            "{args:?}: {cause:?} printed more than once: {stderr}"
        );
    }
}

#[test]
fn a_receiver_that_dies_before_answering_means_delivery_unknown() {
    let (_dir, socket) = scratch();
    let listener = fdpass::listen(&socket, 1).unwrap();
    let dies = thread::spawn(move || {
        let connection = fdpass::accept(listener.as_fd()).unwrap();
        let mut buffer = vec![0; MAX_MESSAGE_LEN];
        fdpass::receive(connection.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
        .arg("--socket")
        .arg(&socket)
        .args(["--connect-timeout", "20", "--fill", "a=A:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The receiver starts only once the sender says it is waiting for one.
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains(&format!(
            "no receiver at {} yet; waiting up to 20s",
            socket.display()
        )),
        "{first}"
    );
    let reports = receiver(&socket);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let (outcome, _) = reports.recv().unwrap();
    assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");

    // Without it, an absent receiver is an immediate, clear failure.
    let (_dir, absent) = scratch();
    let output = send(&absent, &["--fill", "a=A:1"], b"");
    assert_eq!(output.status.code(), Some(1));
}

/// A receiver that refuses every connection the moment it accepts it, as
/// `sealpass-recv` does over `--max-connections`: `Reject` with id 0, then a
/// close without reading, so the sender meets `EPIPE` or `ECONNRESET`.
fn refusing_receiver(
    socket: &Path,
    reason: RejectReason,
    connections: usize,
) -> thread::JoinHandle<()> {
    let listener = fdpass::listen(socket, 64).unwrap();
    let reject = encode(&Message::Reject(Reject::new(0, reason, "scripted refusal"))).unwrap();
    thread::spawn(move || {
        for _ in 0..connections {
            let connection = fdpass::accept(listener.as_fd()).unwrap();
            fdpass::send(connection.as_fd(), &reject, &[]).unwrap();
        }
    })
}

#[test]
fn a_refusal_at_connect_is_reported_every_time() {
    const RUNS: usize = 20;
    let (_dir, socket) = scratch();
    let refuser = refusing_receiver(&socket, RejectReason::TooManyConnections, RUNS);
    for run in 0..RUNS {
        let output = send(&socket, &["--fill", "a=A:64K"], b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "run {run}: {stderr}");
        assert!(
            stderr.contains(
                "the receiver refused the transfer: TooManyConnections: scripted refusal"
            ),
            "run {run}: {stderr}"
        );
    }
    refuser.join().unwrap();
}

#[test]
fn version_help_and_summary_read_well() {
    let run = |arg: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
            .arg(arg)
            .output()
            .unwrap();
        assert!(output.status.success(), "{arg}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(
        run("--version"),
        format!("sealpass-send {}\n", env!("CARGO_PKG_VERSION"))
    );
    let help = run("--help");
    for expected in [
        "seal, shrink, grow, write, future_write, exec",
        "Exit status: 0 accepted; 3 rejected",
        "2 usage error",
        "RUST_LOG",
        "SIGINT and SIGTERM",
        "unique within the transfer",
    ] {
        assert!(
            help.contains(expected),
            "--help lacks {expected:?}:\n{help}"
        );
    }
    assert!(run("--doctor").contains("MFD_NOEXEC_SEAL: "));
    let (_dir, socket) = scratch();
    let _reports = receiver(&socket);
    let output = send(&socket, &["--fill", "one=A:1"], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("accepted transfer 1: 1 segment, 1 bytes;"),
        "{stdout}"
    );
}

/// `--meta` and `--meta-file` reach the receiver in command-line order,
/// and metadata alone is a transfer of its own.
#[test]
fn meta_flags_send_the_applications_fields_in_order() {
    let (dir, socket) = scratch();
    let value_file = dir.path().join("raw.bin");
    std::fs::write(&value_file, [0xffu8, 0x00]).unwrap();
    let listener = Listener::bind(&socket).unwrap();
    let (report, reports) = mpsc::channel();
    thread::spawn(move || {
        for _ in 0..2 {
            let mut connection = listener.accept().unwrap();
            let transfer = connection.receive().unwrap().unwrap();
            let fields: Vec<(String, Vec<u8>)> = transfer
                .metadata()
                .iter()
                .map(|(key, value)| (key.to_owned(), value.to_vec()))
                .collect();
            report.send((transfer.segments().len(), fields)).unwrap();
            transfer.accept().unwrap();
        }
    });
    let meta_file = format!("raw={}", value_file.display());
    let output = send(
        &socket,
        &[
            "--meta",
            "frame=42",
            "--fill",
            "a=A:3",
            "--meta-file",
            &meta_file,
            "--meta",
            "note=x=y",
        ],
        b"",
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        said.contains("1 segment, 3 bytes, 3 metadata entries"),
        "{said}"
    );
    let (segments, fields) = reports.recv().unwrap();
    assert_eq!(segments, 1);
    assert_eq!(
        fields,
        [
            ("frame".to_owned(), b"42".to_vec()),
            ("raw".to_owned(), vec![0xff, 0x00]),
            ("note".to_owned(), b"x=y".to_vec()),
        ]
    );
    let output = send(&socket, &["--meta", "command=flush"], b"");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        reports.recv().unwrap(),
        (0, vec![("command".to_owned(), b"flush".to_vec())])
    );
}

#[test]
fn meta_flags_that_break_a_rule_are_usage_errors() {
    let (dir, socket) = scratch();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![0u8; 70_000]).unwrap();
    let big = format!("v={}", big.display());
    for (args, expected) in [
        (
            &["--meta", "k=1", "--meta", "k=2"][..],
            "already the key of entry 0",
        ),
        (&["--meta", "=1"][..], "empty key"),
        (&["--meta", "novalue"][..], "expected KEY=VALUE"),
        (&["--meta", "k=1", "--compat"][..], "carries no --meta"),
        (
            &["--meta-file", big.as_str()][..],
            "more than the 61440 bytes",
        ),
        (&["--meta-file", "k=/nonexistent/file"][..], "No such file"),
        (&[][..], "nothing to send"),
    ] {
        let output = send(&socket, args, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// `--socket` more than once: the same memfds to every receiver, each
/// verdict on its own line (or JSON line), and an exit status that says
/// whether all, some or none accepted.
#[test]
fn several_sockets_get_the_same_segments_and_their_own_verdicts() {
    let (dir, _) = scratch();
    let serve = |name: &str, accept: bool| {
        let socket = dir.path().join(name);
        let listener = Listener::bind(&socket).unwrap();
        thread::spawn(move || {
            let transfer = listener.accept().unwrap().receive().unwrap().unwrap();
            assert_eq!(transfer.segments()[0].bytes(), b"AAAA");
            if accept {
                transfer.accept().unwrap();
            } else {
                transfer.reject("full").unwrap();
            }
        });
        socket
    };
    let (one, two) = (serve("one.sock", true), serve("two.sock", true));
    let both = [
        "--socket",
        one.to_str().unwrap(),
        "--socket",
        two.to_str().unwrap(),
        "--fill",
        "a=A:4",
    ];
    let output = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
        .args(both)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("2 of 2 receivers accepted 1 segment, 4 bytes"),
        "{stdout}"
    );

    let (yes, no) = (serve("yes.sock", true), serve("no.sock", false));
    let missing = dir.path().join("missing.sock");
    let output = Command::new(env!("CARGO_BIN_EXE_sealpass-send"))
        .args(["--json", "--fill", "a=A:4"])
        .args(["--socket", yes.to_str().unwrap()])
        .args(["--socket", no.to_str().unwrap()])
        .args(["--socket", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "some accepted, some did not");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let verdicts: Vec<&str> = lines
        .iter()
        .map(|line| line["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["accepted", "rejected", "failed"]);
    assert_eq!(lines[1]["reason"], "ApplicationRejected");
    assert_eq!(lines[1]["message"], "full");
    assert!(
        lines[2]["error"].as_str().unwrap().contains("ENOENT"),
        "{}",
        lines[2]
    );
}
