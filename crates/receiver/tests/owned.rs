//! Owned deliveries across real processes: transfers kept, moved to other
//! threads, answered out of order or not at all, bytes that outlive the
//! answer, `bytes::Bytes` without a copy, and a sealed fd forwarded to a
//! third process. The peers are this test binary, run again in a role.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

mod support;

use sealpass_receiver::{Config, Listener, RejectReason, Seals};
use sealpass_sender::{SealedSegment, Sender, Verdict};

const ROLE: &str = "SEALPASS_TEST_ROLE";
const SOCKET: &str = "SEALPASS_TEST_SOCKET";
const SIZE: usize = 1 << 20;

/// The byte at `offset` of transfer `id`'s segment.
fn pattern(id: u64, offset: usize) -> u8 {
    (offset as u64).wrapping_mul(31).wrapping_add(id) as u8
}

fn filled(name: &str, id: u64) -> SealedSegment {
    SealedSegment::with_mapping(name, SIZE as u64, Seals::SENDER_DEFAULT, |bytes| {
        for (offset, byte) in bytes.iter_mut().enumerate() {
            *byte = pattern(id, offset);
        }
        Ok::<(), std::io::Error>(())
    })
    .unwrap()
}

fn check_bytes(id: u64, bytes: &[u8]) {
    assert_eq!(bytes.len(), SIZE);
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(offset, &byte)| byte == pattern(id, offset)),
        "transfer {id}: bytes differ"
    );
}

/// A peer process, killed if the test fails before it is finished.
struct Peer(Option<Child>);

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Peer {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

/// This binary, run again as a peer in `role`, at `socket`. Its stdout is
/// piped back: one line per event.
fn peer(role: &str, socket: &Path) -> Peer {
    Peer(Some(spawn_peer(role, socket)))
}

fn spawn_peer(role: &str, socket: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "peer_roles",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ROLE, role)
        .env(SOCKET, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The lines a peer printed (its own, not the test harness's), once it exits
/// successfully.
fn finish(mut peer: Peer) -> Vec<String> {
    let output = peer.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "peer failed: {}: {stdout}",
        output.status
    );
    stdout.lines().filter_map(said).collect()
}

/// What a peer said on `line`, if anything: the harness may print the
/// test's name before it on the same line.
fn said(line: &str) -> Option<String> {
    line.split_once("peer: ").map(|(_, said)| said.to_owned())
}

fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Accepted { id } => format!("{id} Ack"),
        Verdict::Rejected {
            id,
            reason,
            message,
        } => format!("{id} Reject {reason}: {message}"),
        other => format!("{other:?}"),
    }
}

/// The peers. Does nothing unless run as one by [`peer`].
#[test]
fn peer_roles() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = std::env::var_os(SOCKET).unwrap();
    match role.as_str() {
        // Four transfers in flight, then their verdicts in order.
        "pipelining-sender" => {
            let mut sender = Sender::connect(&socket).unwrap();
            for id in 1..=4 {
                assert_eq!(sender.submit(&[filled(&format!("t{id}"), id)]).unwrap(), id);
            }
            for _ in 1..=4 {
                println!("peer: {}", describe(&sender.next_verdict().unwrap()));
            }
        }
        // One transfer at a time, each sent the moment the last is answered
        // (made before that one went out, so nothing delays the send).
        "one-at-a-time-sender" => {
            let mut sender = Sender::connect(&socket).unwrap();
            let mut next = page_marked(1);
            for id in 1..=ONE_AT_A_TIME {
                let segment = std::mem::replace(&mut next, page_marked(id + 1));
                let verdict = sender.send(&[segment]).unwrap();
                println!("peer: {}", describe(&verdict));
            }
        }
        "one-sender" => {
            let verdict = Sender::connect(&socket)
                .unwrap()
                .send(&[filled("frame", 7)])
                .unwrap();
            println!("peer: {}", describe(&verdict));
        }
        // The third process: receives what is forwarded to it and checks it.
        "checking-receiver" => {
            let listener = Listener::bind(&socket).unwrap();
            println!("peer: listening");
            let mut connection = listener.accept().unwrap();
            let transfer = connection.receive().unwrap().unwrap();
            let segment = &transfer.segments()[0];
            check_bytes(7, segment.bytes());
            println!(
                "peer: got {} ({} bytes) from pid {}",
                segment.name(),
                segment.size(),
                transfer.peer().pid
            );
            transfer.accept().unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn transfers_move_to_a_worker_and_answers_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("owned.sock");
    let listener = Listener::bind(&socket).unwrap();
    let sender = peer("pipelining-sender", &socket);
    let mut connection = listener.accept().unwrap();

    // The connection thread only receives; a worker holds the transfers.
    let (to_worker, inbox) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let mut held: Vec<sealpass_receiver::IncomingTransfer> = inbox.iter().collect();
        assert_eq!(held.len(), 4);
        for transfer in &held {
            check_bytes(transfer.id(), transfer.segments()[0].bytes());
        }
        let four = held.pop().unwrap();
        let three = held.pop().unwrap();
        let two = held.pop().unwrap();
        let one = held.pop().unwrap();
        // Out of order: 4 and 3 first (they wait), 2 is dropped unanswered.
        four.accept().unwrap();
        three.reject("three is not wanted").unwrap();
        drop(two);
        one.accept().unwrap();
    });
    for _ in 0..4 {
        let transfer = connection.receive().unwrap().expect("a transfer");
        to_worker.send(transfer).unwrap();
    }
    drop(to_worker);
    worker.join().unwrap();
    assert_eq!(
        finish(sender),
        [
            "1 Ack",
            "2 Reject ApplicationRejected: the receiving application dropped the transfer without answering",
            "3 Reject ApplicationRejected: three is not wanted",
            "4 Ack",
        ]
    );
    assert!(
        connection.receive().unwrap().is_none(),
        "the sender is gone"
    );
    assert_eq!(connection.mapped(), 0);
}

/// Transfers the "one-at-a-time-sender" sends.
const ONE_AT_A_TIME: u64 = 16;

/// Their size: big enough that unmapping one, every page read, takes
/// longer than the sender needs to send the next once it has the answer.
const PAGE_MARKED_SIZE: usize = 16 << 20;

/// Transfer `id` of the "one-at-a-time-sender": every byte `id`.
fn page_marked(id: u64) -> SealedSegment {
    SealedSegment::filled(
        &format!("t{id}"),
        id as u8,
        PAGE_MARKED_SIZE as u64,
        Seals::SENDER_DEFAULT,
    )
    .unwrap()
}

/// Reads one byte of every page of transfer `id`: each must be `id`.
fn check_pages(id: u64, bytes: &[u8]) {
    assert_eq!(bytes.len(), PAGE_MARKED_SIZE);
    assert!(
        bytes.iter().step_by(4096).all(|&byte| byte == id as u8),
        "transfer {id}: bytes differ"
    );
}

/// Where the receiving side answers each transfer.
#[derive(Debug, Clone, Copy)]
enum AnsweredOn {
    /// The thread that reads the connection, before it reads on: `accept`
    /// answers first and unmaps after.
    ReadingThread,
    /// A worker, while the connection thread is already waiting for the
    /// next message: `accept` answers first there too, so the next message
    /// must be judged only once the worker has unmapped.
    Worker,
}

/// A listener at `socket` whose connections may each map `bytes`.
fn listener_with_budget(socket: &Path, bytes: usize) -> Listener {
    let mut listener = Listener::bind(socket).unwrap();
    listener.set_config(
        Config::builder()
            .max_mapped_per_connection(bytes as u64)
            .build()
            .unwrap(),
    );
    listener
}

/// A sender that waits for each answer never meets a budget of one
/// transfer still holding the last, wherever `accept` ran.
fn check_one_at_a_time_within_a_budget_of_one(answered_on: AnsweredOn) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("budget.sock");
    let listener = listener_with_budget(&socket, PAGE_MARKED_SIZE);
    let sender = peer("one-at-a-time-sender", &socket);
    let mut connection = listener.accept().unwrap();
    let (to_worker, inbox) = mpsc::channel::<sealpass_receiver::IncomingTransfer>();
    let worker = std::thread::spawn(move || {
        for transfer in inbox {
            check_pages(transfer.id(), transfer.segments()[0].bytes());
            transfer.accept().unwrap();
        }
    });
    while let Some(transfer) = connection.receive().unwrap() {
        match answered_on {
            AnsweredOn::ReadingThread => {
                check_pages(transfer.id(), transfer.segments()[0].bytes());
                transfer.accept().unwrap();
            }
            AnsweredOn::Worker => to_worker.send(transfer).unwrap(),
        }
    }
    drop(to_worker);
    worker.join().unwrap();
    let expected: Vec<String> = (1..=ONE_AT_A_TIME).map(|id| format!("{id} Ack")).collect();
    assert_eq!(finish(sender), expected, "answered on the {answered_on:?}");
    assert_eq!(connection.mapped(), 0);
}

#[test]
fn answered_on_the_reading_thread_the_next_transfer_fits_a_budget_of_one() {
    check_one_at_a_time_within_a_budget_of_one(AnsweredOn::ReadingThread);
}

#[test]
fn answered_on_a_worker_the_next_transfer_fits_a_budget_of_one() {
    check_one_at_a_time_within_a_budget_of_one(AnsweredOn::Worker);
}

/// A worker's `accept` answers before it unmaps, but the connection sees
/// the segment gone as soon as the sender has its answer: the connection
/// waits for a release under way before it judges (and before it reports
/// what it holds), without any lock held across the unmapping.
#[test]
fn after_a_workers_answer_the_connection_no_longer_counts_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("worker.sock");
    let listener = Listener::bind(&socket).unwrap();
    let (answered, on_answer) = mpsc::channel();
    let sender = std::thread::spawn(move || {
        let verdict = Sender::connect(&socket)
            .unwrap()
            .send(&[page_marked(1)])
            .unwrap();
        answered.send(describe(&verdict)).unwrap();
    });
    let mut connection = listener.accept().unwrap();
    let transfer = connection.receive().unwrap().unwrap();
    let worker = std::thread::spawn(move || {
        // Every page mapped, so the unmapping takes a while.
        check_pages(1, transfer.segments()[0].bytes());
        transfer.accept().unwrap();
    });
    assert_eq!(on_answer.recv().unwrap(), "1 Ack");
    assert_eq!(
        connection.mapped(),
        0,
        "counted after the sender had its Ack"
    );
    worker.join().unwrap();
    sender.join().unwrap();
}

#[test]
fn bytes_outlive_the_answer_and_stay_counted_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("outlive.sock");
    let listener = listener_with_budget(&socket, SIZE);
    let sender = peer("one-sender", &socket);
    let mut connection = listener.accept().unwrap();
    let transfer = connection.receive().unwrap().unwrap();
    let (segments, responder) = transfer.into_parts();
    responder.accept().unwrap();
    // The sender has its Ack and is gone, its fds closed; the bytes stay.
    assert_eq!(finish(sender), ["1 Ack"]);
    assert_eq!(connection.mapped(), SIZE as u64, "counted while held");
    let keeper = std::thread::spawn(move || {
        check_bytes(7, segments[0].bytes());
        segments
    });
    let segments = keeper.join().unwrap();
    drop(segments);
    assert_eq!(connection.mapped(), 0, "given back when dropped");
}

#[cfg(feature = "bytes")]
#[test]
fn a_segment_becomes_bytes_without_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bytes.sock");
    let listener = Listener::bind(&socket).unwrap();
    let sender = peer("one-sender", &socket);
    let mut connection = listener.accept().unwrap();
    let transfer = connection.receive().unwrap().unwrap();
    let (mut segments, responder) = transfer.into_parts();
    let segment = segments.pop().unwrap();
    let mapped_at = segment.bytes().as_ptr();
    let bytes = segment.into_bytes();
    assert_eq!(bytes.as_ptr(), mapped_at, "the same pages, not a copy");
    responder.accept().unwrap();
    assert_eq!(finish(sender), ["1 Ack"]);
    let clone = bytes.slice(10..20);
    let reader = std::thread::spawn(move || check_bytes(7, &bytes));
    reader.join().unwrap();
    assert_eq!(connection.mapped(), SIZE as u64, "a clone still holds it");
    assert_eq!(clone[0], pattern(7, 10));
    drop(clone);
    assert_eq!(connection.mapped(), 0);
}

#[test]
fn a_sealed_segment_is_forwarded_to_a_third_process_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let inbound = dir.path().join("in.sock");
    let outbound = dir.path().join("out.sock");
    let listener = Listener::bind(&inbound).unwrap();
    let origin = peer("one-sender", &inbound);
    let mut destination = peer("checking-receiver", &outbound);
    let mut said_lines = BufReader::new(destination.child().stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| said(&line));
    assert_eq!(said_lines.next().as_deref(), Some("listening"));

    let mut connection = listener.accept().unwrap();
    let transfer = connection.receive().unwrap().unwrap();
    let (mut segments, responder) = transfer.into_parts();
    let fd = segments.pop().unwrap().into_fd();
    assert_eq!(connection.mapped(), 0, "the mapping went with into_fd");
    let forwarded = SealedSegment::from_sealed_fd(fd, Seals::SENDER_DEFAULT).unwrap();
    assert_eq!((forwarded.name(), forwarded.size()), ("frame", SIZE as u64));
    let verdict = Sender::connect(&outbound)
        .unwrap()
        .send(&[forwarded])
        .unwrap();
    assert!(verdict.is_accepted(), "{verdict:?}");
    responder.accept().unwrap();
    assert_eq!(finish(origin), ["1 Ack"]);
    assert_eq!(
        said_lines.next(),
        Some(format!(
            "got frame ({SIZE} bytes) from pid {}",
            std::process::id()
        ))
    );
    assert!(destination.child().wait().unwrap().success());
}

#[test]
fn an_unsealed_or_foreign_fd_is_not_forwarded() {
    let (pipe, _writer) = nix::unistd::pipe().unwrap();
    assert!(SealedSegment::from_sealed_fd(pipe, Seals::empty()).is_err());
    let loose = SealedSegment::filled("loose", 1, 10, Seals::GROW)
        .unwrap()
        .into_fd();
    let error = SealedSegment::from_sealed_fd(loose, Seals::SENDER_DEFAULT).unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
}

#[test]
fn a_reason_by_any_spelling_is_the_reason() {
    assert_eq!(RejectReason::Unknown(17), RejectReason::ApplicationRejected);
}

/// Where the kernel has `SO_PEERPIDFD` (6.5+), a transfer carries a pidfd
/// for the process that connected: it reads that process's pid while it
/// runs, and tells, once it has exited, that it has, whatever process gets
/// the pid next. Before 6.5 there is none, and nothing else changes.
#[test]
fn a_transfer_names_its_sender_by_pidfd_where_the_kernel_can() {
    use std::os::fd::AsRawFd;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("pidfd.sock");
    let listener = Listener::bind(&socket).unwrap();
    let sender = peer("one-sender", &socket);
    let sender_pid = sender.0.as_ref().unwrap().id();
    let mut connection = listener.accept().unwrap();
    let transfer = connection.receive().unwrap().unwrap();
    assert_eq!(transfer.peer().pid as u32, sender_pid);
    let fdinfo_pid = |transfer: &sealpass_receiver::IncomingTransfer| {
        let pidfd = transfer.peer_pidfd()?;
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix("Pid:"))
            .map(|pid| pid.trim().parse::<i64>().unwrap())
    };
    // SO_PEERPIDFD came with Linux 6.5.
    let has_pidfd = support::kernel_at_least(6, 5);
    assert_eq!(transfer.peer_pidfd().is_some(), has_pidfd);
    assert_eq!(connection.peer_pidfd().is_some(), has_pidfd);
    if has_pidfd {
        assert_eq!(fdinfo_pid(&transfer), Some(i64::from(sender_pid)));
    }
    let (segments, responder) = transfer.into_parts();
    drop(segments);
    // Keep the transfer's pidfd past the answer and the sender's exit.
    let held = connection
        .peer_pidfd()
        .map(|fd| fd.try_clone_to_owned().unwrap());
    responder.accept().unwrap();
    assert_eq!(finish(sender), ["1 Ack"]);
    if let Some(pidfd) = held {
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&pidfd),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(),
            1,
            "an exited process's pidfd polls readable"
        );
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        assert!(info.lines().any(|line| line == "Pid:\t-1"), "{info}");
    }
}

/// A hostile sender's hugetlb memfd with no page behind it: sized and
/// sealed but never mapped, so nothing in the pool is reserved for it. By
/// default it is refused as sparse (`Sparse`), whatever the pool holds. A
/// receiver that accepts sparse memfds maps it, and its mapping reserves
/// what its reads may fault in: with room in the pool the transfer is
/// accepted and reads as zeros; without, the mapping fails and the transfer
/// is refused with `ResourceExhausted`. Never a SIGBUS on a read (it would
/// kill this test). This machine has no pool; `cargo xtask vm` runs it with
/// one.
#[test]
fn a_hugetlb_memfd_with_nothing_reserved_is_mapped_with_room_or_refused_without() {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::fd::AsFd;
    let Some(pool) = sealpass_kernel::host::HugeTlbPool::read() else {
        eprintln!("no hugetlbfs on this kernel: nothing to check");
        return;
    };
    // Sent as it is: the sender library would allocate its page first.
    let send_unbacked = |socket: &Path| -> RejectReasonOrAck {
        let fd = memfd_create(
            "holes",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_HUGETLB,
        )
        .expect("a kernel with a hugetlb pool makes hugetlb memfds");
        nix::unistd::ftruncate(&fd, i64::try_from(pool.page_bytes).unwrap()).unwrap();
        let seals = SealFlag::F_SEAL_SEAL
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        let declared = sealpass_proto::Segment::new(
            "holes".to_owned(),
            pool.page_bytes,
            Seals::SENDER_DEFAULT,
        );
        let message =
            sealpass_proto::Message::Transfer(sealpass_proto::Transfer::new(1, vec![declared]));
        let connection = sealpass_kernel::fdpass::connect(socket).unwrap();
        sealpass_kernel::fdpass::send(
            connection.as_fd(),
            &sealpass_proto::encode(&message).unwrap(),
            &[fd.as_fd()],
        )
        .unwrap();
        let mut buffer = vec![0; sealpass_proto::limits::MAX_MESSAGE_LEN];
        let received = sealpass_kernel::fdpass::receive(
            connection.as_fd(),
            &mut buffer,
            &mut sealpass_kernel::fdpass::ControlBuffer::new(),
        )
        .unwrap();
        match sealpass_proto::decode(&buffer[..received.len])
            .unwrap()
            .message
        {
            sealpass_proto::Message::Ack(_) => None,
            sealpass_proto::Message::Reject(reject) => Some(reject.reason),
            other => panic!("unexpected {other:?}"),
        }
    };
    for refuse_sparse in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holes.sock");
        let mut listener = Listener::bind(&socket).unwrap();
        listener.set_config(
            Config::builder()
                .refuse_sparse(refuse_sparse)
                .build()
                .unwrap(),
        );
        let receiver = std::thread::spawn(move || {
            let mut connection = listener.accept().unwrap();
            if let Some(transfer) = connection.receive().unwrap() {
                let bytes = transfer.segments()[0].bytes();
                assert!(bytes.iter().all(|&b| b == 0), "holes read as zeros");
                transfer.accept().unwrap();
            }
        });
        let room = sealpass_kernel::host::HugeTlbPool::read().unwrap().room();
        let verdict = send_unbacked(&socket);
        receiver.join().unwrap();
        let expected = match (refuse_sparse, room) {
            (true, _) => Some(RejectReason::Sparse),
            (false, 0) => Some(RejectReason::ResourceExhausted),
            (false, _) => None,
        };
        assert_eq!(
            verdict, expected,
            "refuse_sparse {refuse_sparse}, pool room {room}"
        );
    }
}

/// A verdict: `None` for `Ack`, the reason of a `Reject`.
type RejectReasonOrAck = Option<RejectReason>;

/// `receive` skips what it refuses (each refusal answered with its reason),
/// and `refused()` counts them.
#[test]
fn receive_skips_refused_messages_and_counts_them() {
    use sealpass_kernel::fdpass;
    use sealpass_proto::{Message, Transfer, encode};
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("refused.sock");
    let listener = Listener::bind(&socket).unwrap();
    let path = socket.clone();
    let peer = std::thread::spawn(move || {
        let connection = fdpass::connect(&path).unwrap();
        for garbage in [
            &b"not a message"[..],
            b"SLPX\x01\x00\x00\x00\x00\x00\x00\x00",
        ] {
            fdpass::send(connection.as_fd(), garbage, &[]).unwrap();
        }
        let frame = SealedSegment::from_bytes("frame", b"hi", Seals::SENDER_DEFAULT).unwrap();
        let header = encode(&Message::Transfer(Transfer::new(
            1,
            vec![frame.declaration().clone()],
        )))
        .unwrap();
        fdpass::send(connection.as_fd(), &header, &[frame.fd()]).unwrap();
        (0..3)
            .map(|_| match support::answer_to(&connection) {
                Some(Message::Ack(ack)) => format!("Ack {}", ack.id),
                Some(Message::Reject(reject)) => format!("Reject {} {}", reject.id, reject.reason),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
    });
    let mut connection = listener.accept().unwrap();
    assert_eq!(connection.refused(), 0);
    let transfer = connection.receive().unwrap().unwrap();
    assert_eq!(connection.refused(), 2, "the two messages before it");
    transfer.accept().unwrap();
    assert_eq!(
        peer.join().unwrap(),
        ["Reject 0 BadMagic", "Reject 0 BadMagic", "Ack 1"]
    );
}

/// Whether `address` lies in a mapping of a memfd (`/proc/self/maps`),
/// rather than in this process's own memory.
fn in_a_memfd_mapping(address: *const u8) -> bool {
    let address = address as usize;
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains("/memfd:"))
        .filter_map(|line| {
            let (range, _) = line.split_once(' ')?;
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .any(|(start, end)| (start..end).contains(&address))
}

/// Segments up to `copy_at_most` are read into the receiver's own memory
/// (no mapping of the memfd), bigger ones mapped; 0 maps them all. Either
/// way the bytes are the sender's, read-only, and the sealed fd stays with
/// the segment.
#[test]
fn small_segments_are_copied_and_big_ones_mapped() {
    let _serial = support::serial();
    for (copy_at_most, small_mapped) in [(None, false), (Some(0), true)] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("copy.sock");
        let mut listener = Listener::bind(&socket).unwrap();
        let mut config = Config::builder();
        if let Some(bytes) = copy_at_most {
            config = config.copy_at_most(bytes);
        }
        listener.set_config(config.build().unwrap());
        let sender = std::thread::spawn(move || {
            let small = SealedSegment::filled("small", b's', 4096, Seals::SENDER_DEFAULT).unwrap();
            let big = SealedSegment::filled("big", b'b', 1 << 20, Seals::SENDER_DEFAULT).unwrap();
            let mut sender = Sender::connect(&socket).unwrap();
            (sender.send(&[small]).unwrap(), sender.send(&[big]).unwrap())
        });
        let mut connection = listener.accept().unwrap();
        for (size, byte, mapped) in [(4096, b's', small_mapped), (1 << 20, b'b', true)] {
            let transfer = connection.receive().unwrap().unwrap();
            let segment = &transfer.segments()[0];
            assert_eq!(segment.bytes().len(), size);
            assert!(segment.bytes().iter().all(|&b| b == byte));
            assert_eq!(
                in_a_memfd_mapping(segment.bytes().as_ptr()),
                mapped,
                "{size} bytes, copy_at_most {copy_at_most:?}: mapped {mapped}"
            );
            assert_eq!(connection.mapped(), size as u64, "counted either way");
            transfer.accept().unwrap();
        }
        let (small, big) = sender.join().unwrap();
        assert!(small.is_accepted() && big.is_accepted());
    }
}
