//! `Connection::serve_batch`, the `Service`'s way: messages already queued
//! are served in one `recvmmsg`, each judged on its own and in order, and
//! every answer is sent before it returns, whatever the batch held:
//! refusals, a closing reject, the end of the stream, a handler's panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::conformance::fixtures::{SEALED, framed_exact, memfd, segment, transfer_bytes};
use crate::{Connection, Listener};
use nix::errno::Errno;
use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{Message, RejectReason, Seals, decode};

use super::Outcome;

/// A listener, a sender's raw connection to it, and the accepted side.
fn connected(dir: &Path) -> (Connection, OwnedFd) {
    let socket = dir.join("batch.sock");
    let listener = Listener::bind(&socket).unwrap();
    let sender = fdpass::connect(&socket).unwrap();
    let connection = listener.accept().unwrap();
    (connection, sender)
}

fn send(sender: &OwnedFd, payload: &[u8], fds: &[OwnedFd]) {
    let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    fdpass::send(sender.as_fd(), payload, &fds).unwrap();
}

/// Queues a valid one-segment transfer (4 KiB, sealed) for each of `ids`.
fn send_valid_transfers(sender: &OwnedFd, ids: std::ops::RangeInclusive<u64>) {
    for id in ids {
        send(
            sender,
            &transfer_bytes(id, vec![segment("s", 4096, SEALED)]).unwrap(),
            &[memfd("s", 4096, SEALED).unwrap()],
        );
    }
}

/// The answers already waiting for the sender, without waiting for more.
fn answers_waiting(sender: &OwnedFd) -> Vec<Message> {
    fdpass::set_timeouts(sender.as_fd(), Some(Duration::from_millis(50)), None).unwrap();
    let mut buffer = vec![0; MAX_MESSAGE_LEN];
    let mut control = ControlBuffer::new();
    let mut answers = Vec::new();
    loop {
        match fdpass::receive(sender.as_fd(), &mut buffer, &mut control) {
            Ok(received) if received.is_end_of_stream() => return answers,
            Ok(received) => {
                assert!(received.fds.is_empty(), "answers carry no fds");
                answers.push(decode(&buffer[..received.len]).unwrap().message);
            }
            Err(fdpass::TransportError::TimedOut { .. }) => return answers,
            Err(error) => panic!("reading answers: {error}"),
        }
    }
}

/// A pipe's reader to send as an fd, and whether any reader of that pipe is
/// still open anywhere in this process.
fn pipe_reader() -> (OwnedFd, impl Fn() -> bool) {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    (reader, move || {
        nix::unistd::write(&writer, b"x") != Err(Errno::EPIPE)
    })
}

/// One message's payload and fds, as sent.
type Sent = (Vec<u8>, Vec<OwnedFd>);

/// One `serve_batch`, its outcomes as a list.
fn serve_batch<E: std::fmt::Display>(
    connection: &mut Connection,
    handler: impl FnMut(&crate::IncomingTransfer) -> Result<(), E>,
) -> Result<Vec<Outcome>, crate::ServeError> {
    let mut outcomes = vec![Outcome::Closed]; // appended to, never cleared
    let count = connection.serve_batch(handler, &mut outcomes)?;
    assert_eq!(count, outcomes.len() - 1);
    Ok(outcomes.split_off(1))
}

/// What the sender should read for one message.
#[derive(Debug, PartialEq)]
enum Expected {
    Ack(u64),
    Reject(u64, RejectReason),
}

fn verdict(message: &Message) -> Expected {
    match message {
        Message::Ack(ack) => Expected::Ack(ack.id),
        Message::Reject(reject) => Expected::Reject(reject.id, reject.reason),
        other => panic!("not an answer: {other:?}"),
    }
}

fn outcome_verdict(outcome: &Outcome) -> Expected {
    match outcome {
        Outcome::Accepted { id, .. } => Expected::Ack(*id),
        Outcome::Rejected { id, reason, .. } => Expected::Reject(*id, *reason),
        other => panic!("not a verdict: {other:?}"),
    }
}

#[test]
fn a_batch_judges_each_queued_message_on_its_own_and_answers_all_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut connection, sender) = connected(dir.path());
    let (not_a_memfd, readers_left) = pipe_reader();
    let one = |id: u64, name: &str, declared: u64, actual: u64, seals: Seals| {
        let header = transfer_bytes(id, vec![segment(name, declared, SEALED)]).unwrap();
        (header, vec![memfd(name, actual, seals).unwrap()])
    };
    let messages: Vec<(Sent, Expected)> = vec![
        (one(1, "a", 4096, 4096, SEALED), Expected::Ack(1)),
        (
            one(2, "b", 4096, 4096, Seals::SHRINK | Seals::GROW),
            Expected::Reject(2, RejectReason::MissingSeals),
        ),
        (
            (
                transfer_bytes(3, vec![segment("c", 4096, SEALED)]).unwrap(),
                vec![],
            ),
            Expected::Reject(3, RejectReason::FdCountMismatch),
        ),
        (
            (b"not a header at all".to_vec(), vec![]),
            Expected::Reject(0, RejectReason::BadMagic),
        ),
        (
            (
                transfer_bytes(5, vec![segment("e", 1, SEALED)]).unwrap(),
                vec![not_a_memfd],
            ),
            Expected::Reject(5, RejectReason::NotMemfd),
        ),
        (
            one(6, "f", 4096, 8192, SEALED),
            Expected::Reject(6, RejectReason::SizeMismatch),
        ),
        (
            one(7, "g", 4096, 4096, SEALED),
            Expected::Reject(7, RejectReason::ApplicationRejected),
        ),
        (one(8, "h", 1, 1, SEALED), Expected::Ack(8)),
    ];
    let mut expected = Vec::new();
    for ((payload, fds), answer) in messages {
        send(&sender, &payload, &fds);
        expected.push(answer);
    }
    // Every message is queued before the first batch is read.
    let slots = fdpass::batch_slots();
    let mut outcomes = Vec::new();
    let mut batches = Vec::new();
    while outcomes.len() < expected.len() {
        let batch = serve_batch(&mut connection, |transfer| {
            assert_eq!(transfer.segments().len(), 1);
            if transfer.id() == 7 {
                Err("the application says no")
            } else {
                Ok(())
            }
        })
        .unwrap();
        // Each batch is answered in full before it returns.
        let answered = answers_waiting(&sender);
        assert_eq!(
            answered.iter().map(verdict).collect::<Vec<_>>(),
            batch.iter().map(outcome_verdict).collect::<Vec<_>>()
        );
        batches.push(batch.len());
        outcomes.extend(batch);
    }
    assert_eq!(
        outcomes.iter().map(outcome_verdict).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(
        batches[0],
        expected.len().min(slots),
        "one recvmmsg takes every queued message its slots allow ({batches:?})"
    );
    assert!(!readers_left(), "the refused fd is closed");
    drop(sender);
    assert_eq!(
        serve_batch(&mut connection, |_| Ok::<(), String>(())).unwrap(),
        [Outcome::Closed]
    );
    assert!(!connection.is_open());
}

#[test]
fn a_closing_reject_mid_batch_discards_the_rest_and_closes_their_fds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut connection, sender) = connected(dir.path());
    let body = |name: &str| {
        let header = transfer_bytes(9, vec![segment(name, 4096, SEALED)]).unwrap();
        header[sealpass_proto::limits::PREAMBLE_LEN..].to_vec()
    };
    let (held, readers_left) = pipe_reader();
    send(
        &sender,
        &transfer_bytes(1, vec![segment("a", 4096, SEALED)]).unwrap(),
        &[memfd("a", 4096, SEALED).unwrap()],
    );
    send(&sender, &framed_exact(2, 0, &body("b")), &[]);
    send(
        &sender,
        &transfer_bytes(3, vec![segment("c", 1, SEALED)]).unwrap(),
        &[held],
    );
    let mut outcomes = Vec::new();
    while connection.is_open() {
        outcomes.extend(serve_batch(&mut connection, |_| Ok::<(), String>(())).unwrap());
    }
    assert_eq!(
        outcomes.iter().map(outcome_verdict).collect::<Vec<_>>(),
        [
            Expected::Ack(1),
            Expected::Reject(0, RejectReason::UnsupportedVersion)
        ]
    );
    drop(connection);
    assert!(
        !readers_left(),
        "the message after the closing reject is discarded, its fd closed"
    );
    let answers = answers_waiting(&sender);
    assert_eq!(
        answers.iter().map(verdict).collect::<Vec<_>>(),
        [
            Expected::Ack(1),
            Expected::Reject(0, RejectReason::UnsupportedVersion)
        ],
        "then the end of the connection"
    );
}

#[test]
fn a_handler_that_panics_mid_batch_loses_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut connection, sender) = connected(dir.path());
    send_valid_transfers(&sender, 1..=4);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_batch(&mut connection, |transfer| {
            if transfer.id() == 2 {
                panic!("handler bug");
            }
            Ok::<(), String>(())
        })
    }));
    assert!(panicked.is_err());
    // What the batch answered before the panic went out; the transfer whose
    // handler panicked was dropped unanswered, which rejects it.
    let mut answers: Vec<_> = answers_waiting(&sender).iter().map(verdict).collect();
    assert_eq!(
        answers,
        [
            Expected::Ack(1),
            Expected::Reject(2, RejectReason::ApplicationRejected)
        ]
    );
    // The rest of that batch is served next, before anything more is read.
    while answers.len() < 4 {
        let outcomes = serve_batch(&mut connection, |_| Ok::<(), String>(())).unwrap();
        assert!(!outcomes.is_empty());
        answers.extend(answers_waiting(&sender).iter().map(verdict));
    }
    assert_eq!(answers[2..], [Expected::Ack(3), Expected::Ack(4)]);
}

#[test]
fn serving_one_at_a_time_takes_what_a_panicked_batch_left_first() {
    let dir = tempfile::tempdir().unwrap();
    let (mut connection, sender) = connected(dir.path());
    send_valid_transfers(&sender, 1..=3);
    let slots = fdpass::batch_slots();
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_batch(&mut connection, |_| -> Result<(), String> {
            panic!("at the first")
        })
    }));
    // Ids 2 and 3 are in the batch where it holds them, else still queued:
    // either way they come next, in order.
    for id in 2..=3 {
        let transfer = connection.receive().unwrap().unwrap();
        assert_eq!(transfer.id(), id, "slots {slots}");
        transfer.accept().unwrap();
    }
    let answers: Vec<_> = answers_waiting(&sender).iter().map(verdict).collect();
    assert_eq!(
        answers,
        [
            Expected::Reject(1, RejectReason::ApplicationRejected),
            Expected::Ack(2),
            Expected::Ack(3)
        ]
    );
}
