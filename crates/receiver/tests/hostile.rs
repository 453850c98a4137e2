//! The real `sealpass-recv`, run as its own process, against hostile senders.
//! Each case must be answered by a `Reject` with the right reason; afterwards
//! the receiver still accepts a valid transfer and its open-fd count is back
//! to where it was.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use sealpass_proto::fdpass;
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{Ack, Message, RejectReason, Seals, Segment, Transfer, encode};
use support::{RecvProcess, answer_to, send_valid};

const SEALED: Seals = Seals::SENDER_DEFAULT;

fn memfd(name: &str, size: i64, seals: Seals) -> OwnedFd {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    nix::unistd::ftruncate(&fd, size).unwrap();
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals.bits() as i32)),
    )
    .unwrap();
    fd
}

fn segment(name: &str, size: u64) -> Segment {
    Segment::new(name, size, SEALED)
}

fn transfer(segments: Vec<Segment>) -> Vec<u8> {
    encode(&Message::Transfer(Transfer::new(9, segments))).unwrap()
}

fn one_segment() -> Vec<u8> {
    transfer(vec![segment("seg", 4096)])
}

fn with_version(major: u16) -> Vec<u8> {
    let mut bytes = one_segment();
    bytes[4..6].copy_from_slice(&major.to_le_bytes());
    bytes
}

fn good_memfd() -> OwnedFd {
    memfd("seg", 4096, SEALED)
}

fn open(path: &str) -> OwnedFd {
    std::fs::File::open(path).unwrap().into()
}

struct Case {
    name: &'static str,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
    reason: RejectReason,
}

fn case(name: &'static str, payload: Vec<u8>, fds: Vec<OwnedFd>, reason: RejectReason) -> Case {
    Case {
        name,
        payload,
        fds,
        reason,
    }
}

fn cases(scratch: &std::path::Path) -> Vec<Case> {
    use RejectReason::*;
    let mut bad_magic = one_segment();
    bad_magic[..4].copy_from_slice(b"SLPX");
    let mut truncated_body = one_segment();
    truncated_body.pop();
    let mut lying_length = one_segment();
    lying_length[8] = lying_length[8].wrapping_add(1);
    let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
    let (socket_a, _socket_b) = fdpass::pair().unwrap();
    let disk_file = scratch.join("regular-file");
    std::fs::write(&disk_file, vec![0u8; 4096]).unwrap();
    let ack = encode(&Message::Ack(Ack::new(9))).unwrap();
    let mut newer_minor_extra = one_segment();
    newer_minor_extra.push(0);
    newer_minor_extra[8] += 1;

    vec![
        case("bad magic", bad_magic, vec![good_memfd()], BadMagic),
        case(
            "unknown major",
            with_version(2),
            vec![good_memfd()],
            UnsupportedVersion,
        ),
        case(
            "truncated preamble",
            one_segment()[..5].to_vec(),
            vec![good_memfd()],
            Truncated,
        ),
        case(
            "truncated body",
            truncated_body,
            vec![good_memfd()],
            Truncated,
        ),
        case(
            "body length lying",
            lying_length,
            vec![good_memfd()],
            Truncated,
        ),
        case(
            "trailing bytes in a same-minor body",
            newer_minor_extra,
            vec![good_memfd()],
            Malformed,
        ),
        case(
            "body over the limit",
            vec![0; MAX_MESSAGE_LEN + 1],
            vec![good_memfd()],
            TooLarge,
        ),
        case(
            "fds but no header",
            Vec::new(),
            vec![good_memfd()],
            Truncated,
        ),
        case("header but no fds", one_segment(), vec![], FdCountMismatch),
        case(
            "more fds than segments",
            one_segment(),
            vec![good_memfd(), good_memfd()],
            FdCountMismatch,
        ),
        case(
            "fewer fds than segments",
            transfer(vec![segment("seg", 4096), segment("seg2", 4096)]),
            vec![good_memfd()],
            FdCountMismatch,
        ),
        case("a pipe", one_segment(), vec![pipe_read], NotMemfd),
        case(
            "/dev/null",
            one_segment(),
            vec![open("/dev/null")],
            NotMemfd,
        ),
        case("a directory", one_segment(), vec![open("/")], NotMemfd),
        case("a socket", one_segment(), vec![socket_a], NotMemfd),
        case(
            "a regular file on disk",
            one_segment(),
            vec![open(disk_file.to_str().unwrap())],
            NotMemfd,
        ),
        case(
            "a memfd without WRITE",
            one_segment(),
            vec![memfd("seg", 4096, Seals::SHRINK | Seals::GROW)],
            MissingSeals,
        ),
        case(
            "FUTURE_WRITE instead of WRITE",
            one_segment(),
            vec![memfd(
                "seg",
                4096,
                Seals::SHRINK | Seals::GROW | Seals::FUTURE_WRITE | Seals::SEAL,
            )],
            MissingSeals,
        ),
        case(
            "a memfd without SHRINK",
            transfer(vec![Segment::new("seg", 4096, Seals::WRITE)]),
            vec![memfd("seg", 4096, Seals::WRITE | Seals::GROW)],
            MissingSeals,
        ),
        case(
            "a declared seal the memfd lacks",
            one_segment(),
            vec![memfd(
                "seg",
                4096,
                Seals::SHRINK | Seals::GROW | Seals::WRITE,
            )],
            MissingSeals,
        ),
        case(
            "a name that differs",
            one_segment(),
            vec![memfd("other", 4096, SEALED)],
            NameMismatch,
        ),
        case(
            "a size that differs",
            one_segment(),
            vec![memfd("seg", 4095, SEALED)],
            SizeMismatch,
        ),
        case(
            "second of two segments bad",
            transfer(vec![segment("seg", 4096), segment("seg2", 4096)]),
            vec![good_memfd(), memfd("seg2", 8192, SEALED)],
            SizeMismatch,
        ),
        case(
            "an Ack sent to the receiver",
            ack,
            vec![],
            UnexpectedMessage,
        ),
        case(
            "two segments of one name",
            raw_transfer(&[b"dup", b"dup"]),
            vec![good_memfd_named("dup"), good_memfd_named("dup")],
            InvalidField,
        ),
        case("no segments", raw_transfer(&[]), vec![], InvalidField),
        case(
            "a name with NUL",
            raw_transfer(&[b"se\0g"]),
            vec![good_memfd()],
            InvalidField,
        ),
        case(
            "a name of 250 bytes",
            raw_transfer(&[&[b'n'; 250]]),
            vec![good_memfd()],
            InvalidField,
        ),
        case(
            "1000 segments",
            raw_transfer(&vec![&b"s"[..]; 1000]),
            vec![good_memfd()],
            TooManySegments,
        ),
    ]
}

/// A transfer of id 9 that the encoder would refuse: `names`, 4096 bytes each.
fn raw_transfer(names: &[&[u8]]) -> Vec<u8> {
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&9u64.to_le_bytes());
    body.extend_from_slice(&(names.len() as u64).to_le_bytes());
    for name in names {
        body.extend_from_slice(&(name.len() as u64).to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&4096u64.to_le_bytes());
        body.extend_from_slice(&SEALED.bits().to_le_bytes());
    }
    let mut message = sealpass_proto::MAGIC.to_vec();
    message.extend_from_slice(&[1, 0, 0, 0]);
    message.extend_from_slice(&(body.len() as u32).to_le_bytes());
    message.extend_from_slice(&body);
    message
}

fn good_memfd_named(name: &str) -> OwnedFd {
    memfd(name, 4096, SEALED)
}

/// The id a reject must repeat (PROTOCOL.md section 4.1): 0 where the body
/// did not decode, the transfer's (9) from the field rules on.
fn expected_id(reason: RejectReason) -> u64 {
    use RejectReason::*;
    match reason {
        TooLarge | ControlTruncated | Truncated | BadMagic | UnsupportedVersion | TrailingBytes
        | Malformed => 0,
        _ => 9,
    }
}

#[test]
fn every_hostile_sender_is_rejected_and_the_receiver_keeps_serving() {
    let receiver = RecvProcess::start(&[]);
    let baseline = receiver.idle_fds();
    send_valid(&receiver);

    for case in cases(receiver.dir()) {
        let connection = fdpass::connect(receiver.socket()).unwrap();
        let fds: Vec<_> = case.fds.iter().map(AsFd::as_fd).collect();
        fdpass::send(connection.as_fd(), &case.payload, &fds).unwrap();
        drop(case.fds);
        let answer = answer_to(&connection);
        match answer {
            Some(Message::Reject(reject)) => {
                assert_eq!(
                    reject.reason, case.reason,
                    "{}: rejected for the wrong reason: {}",
                    case.name, reject.message
                );
                assert_eq!(
                    reject.id,
                    expected_id(case.reason),
                    "{}: the reject must repeat the id it could read",
                    case.name
                );
            }
            other => panic!(
                "{}: expected Reject({:?}), got {other:?}",
                case.name, case.reason
            ),
        }
        if case.reason == RejectReason::UnsupportedVersion {
            assert_eq!(
                answer_to(&connection),
                None,
                "{}: connection must close",
                case.name
            );
        }
        drop(connection);
        receiver.wait_for_open_fds(baseline, case.name);
        send_valid(&receiver);
        receiver.wait_for_open_fds(baseline, case.name);
    }
}

#[test]
fn silent_and_vanishing_peers_leave_nothing_behind() {
    let receiver = RecvProcess::start(&["--idle-timeout", "1", "--first-message-deadline", "1"]);
    let baseline = receiver.idle_fds();
    send_valid(&receiver);

    // Connects and closes at once.
    drop(fdpass::connect(receiver.socket()).unwrap());
    // Sends a transfer and closes before reading the answer.
    let connection = fdpass::connect(receiver.socket()).unwrap();
    fdpass::send(connection.as_fd(), &one_segment(), &[good_memfd().as_fd()]).unwrap();
    drop(connection);
    receiver.wait_for_open_fds(baseline, "peer gone before the answer");
    // Connects and says nothing: told why, then closed.
    let silent = fdpass::connect(receiver.socket()).unwrap();
    match answer_to(&silent) {
        Some(Message::Reject(reject)) => {
            assert_eq!(reject.reason, RejectReason::Timeout, "{}", reject.message)
        }
        other => panic!("a silent peer gets Reject(Timeout); got {other:?}"),
    }
    assert_eq!(answer_to(&silent), None, "then the connection closes");
    receiver.wait_for_open_fds(baseline, "silent peer");
    send_valid(&receiver);
}
