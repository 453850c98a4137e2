//! Several transfers in flight on one connection: verdicts come back oldest
//! first, matched by id, and a window wider than the socket's queue neither
//! deadlocks nor loses an answer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use sealpass_proto::{RejectReason, Seals};
use sealpass_receiver::Listener;
use sealpass_sender::{SealedSegment, SendError, Sender, Verdict};

/// A receiver serving one connection until the sender closes it; returns
/// the ids it accepted, in order.
fn receiver(socket: &Path) -> JoinHandle<Vec<u64>> {
    let listener = Listener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let mut connection = listener.accept().unwrap();
        let mut accepted = Vec::new();
        while let Some(transfer) = connection.receive().unwrap() {
            accepted.push(transfer.id());
            transfer.accept().unwrap();
        }
        accepted
    })
}

/// Runs `body` on its own thread and fails the test if it takes longer
/// than 30 s: a pipelining bug shows up as a deadlock.
fn within_deadline<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || done.send(body()).unwrap());
    result
        .recv_timeout(Duration::from_secs(30))
        .expect("the sender thread panicked, or deadlocked (no result within 30 s)")
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("pipeline.sock")
}

const TRANSFERS: u64 = 3000;

#[test]
fn a_window_wider_than_the_socket_queue_gets_every_verdict_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let served = receiver(&socket);
    // Every fifth transfer lacks WRITE and is rejected: verdicts must still
    // line up with their ids.
    let verdicts = within_deadline(move || {
        let valid = SealedSegment::filled("ok", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
        let unsealed = SealedSegment::filled("bare", b'x', 4096, Seals::empty()).unwrap();
        let mut sender = Sender::connect(&socket).unwrap();
        let mut verdicts = Vec::new();
        // Up to 1000 in flight: more than either direction's socket buffer
        // holds, so the receiver blocks answering while the sender still
        // sends. A sender that only blocked in sendmsg would deadlock here.
        for round in 0..TRANSFERS {
            let segment = if round % 5 == 4 { &unsealed } else { &valid };
            let id = sender.submit(std::slice::from_ref(segment)).unwrap();
            assert_eq!(id, round + 1, "ids count up from 1");
            if sender.in_flight() == 1000 {
                verdicts.push(sender.next_verdict().unwrap());
            }
        }
        while sender.in_flight() > 0 {
            verdicts.push(sender.next_verdict().unwrap());
        }
        assert!(matches!(
            sender.next_verdict(),
            Err(SendError::NothingInFlight)
        ));
        verdicts
    });
    assert_eq!(verdicts.len(), TRANSFERS as usize);
    for (index, verdict) in verdicts.iter().enumerate() {
        let id = index as u64 + 1;
        if index % 5 == 4 {
            assert!(
                matches!(verdict, Verdict::Rejected { id: got, reason: RejectReason::MissingSeals, .. } if *got == id),
                "transfer {id}: {verdict:?}"
            );
        } else {
            assert_eq!(verdict, &Verdict::Accepted { id });
        }
    }
    let accepted = served.join().unwrap();
    assert_eq!(accepted.len(), TRANSFERS as usize / 5 * 4);
    assert!(accepted.windows(2).all(|pair| pair[0] < pair[1]));
}

#[test]
fn send_refuses_while_verdicts_are_pending() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let served = receiver(&socket);
    within_deadline(move || {
        let segment = SealedSegment::filled("ok", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
        let mut sender = Sender::connect(&socket).unwrap();
        sender.submit(std::slice::from_ref(&segment)).unwrap();
        match sender.send(std::slice::from_ref(&segment)) {
            Err(SendError::VerdictsPending { count: 1 }) => {}
            other => panic!("expected VerdictsPending {{ count: 1 }}, got {other:?}"),
        }
        assert_eq!(sender.next_verdict().unwrap(), Verdict::Accepted { id: 1 });
        // The refused send sent nothing: the next id is 2.
        assert_eq!(
            sender.send(std::slice::from_ref(&segment)).unwrap(),
            Verdict::Accepted { id: 2 }
        );
    });
    assert_eq!(served.join().unwrap(), vec![1, 2]);
}

#[test]
fn a_receiver_that_vanishes_leaves_every_transfer_in_flight_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let listener = Listener::bind(&socket).unwrap();
    let (queued, three_queued) = mpsc::channel();
    // Accepts, answers nothing, closes once three messages are queued.
    let vanishing = std::thread::spawn(move || {
        let connection = listener.accept().unwrap();
        three_queued.recv_timeout(Duration::from_secs(30)).unwrap();
        drop(connection);
    });
    let error = within_deadline(move || {
        let segment = SealedSegment::filled("ok", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
        let mut sender = Sender::connect(&socket).unwrap();
        for _ in 0..3 {
            sender.submit(std::slice::from_ref(&segment)).unwrap();
        }
        queued.send(()).unwrap();
        sender.next_verdict().unwrap_err()
    });
    vanishing.join().unwrap();
    match error {
        SendError::DeliveryUnknown {
            id: 1,
            in_flight: 3,
        } => {}
        other => panic!("expected DeliveryUnknown {{ id: 1, in_flight: 3 }}, got {other:?}"),
    }
}

#[test]
fn an_answer_out_of_order_is_an_error_not_a_verdict() {
    use sealpass_kernel::fdpass::{self, ControlBuffer};
    use sealpass_proto::{Ack, Message, codec};
    use std::os::fd::AsFd;

    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let listener = fdpass::listen(&socket, 1).unwrap();
    // Takes two transfers, then acks the second before the first.
    let scripted = std::thread::spawn(move || {
        let connection = fdpass::accept(listener.as_fd()).unwrap();
        let mut buffer = vec![0u8; 4096];
        for _ in 0..2 {
            fdpass::receive(connection.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
        }
        let ack = |id| codec::encode(&Message::Ack(Ack::new(id))).unwrap();
        fdpass::send(connection.as_fd(), &ack(2), &[]).unwrap();
        // The sender may already have failed on the first answer and closed
        // (EPIPE): this one only has to be there if it reads on.
        let _ = fdpass::send(connection.as_fd(), &ack(1), &[]);
        connection
    });
    let error = within_deadline(move || {
        let segment = SealedSegment::filled("ok", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
        let mut sender = Sender::connect(&socket).unwrap();
        sender.submit(std::slice::from_ref(&segment)).unwrap();
        sender.submit(std::slice::from_ref(&segment)).unwrap();
        sender.next_verdict().unwrap_err()
    });
    drop(scripted.join().unwrap());
    match error {
        SendError::UnexpectedAnswer {
            id: 1,
            kind: "Ack",
            got_id: 2,
        } => {}
        other => panic!("expected UnexpectedAnswer for id 1 (got Ack 2), got {other:?}"),
    }
}

/// A raw receiver at `socket` that reads `BURST_AFTER` transfers, then
/// sends [`burst_of_answers`] in one `sendmmsg`.
struct BurstingReceiver {
    thread: JoinHandle<()>,
    /// Says once every answer is queued for the sender.
    answered: mpsc::Receiver<()>,
    /// Tells the receiver to close its end.
    close: mpsc::Sender<()>,
}

const BURST_AFTER: usize = 4;

impl BurstingReceiver {
    fn start(socket: &Path) -> BurstingReceiver {
        use std::os::fd::AsFd;
        let listener = sealpass_kernel::fdpass::listen(socket, 1).unwrap();
        let (answered_tx, answered) = mpsc::channel();
        let (close, closing) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let connection = sealpass_kernel::fdpass::accept(listener.as_fd()).unwrap();
            let mut buffer = vec![0; 4096];
            let mut control = sealpass_kernel::fdpass::ControlBuffer::new();
            for _ in 0..BURST_AFTER {
                sealpass_kernel::fdpass::receive(connection.as_fd(), &mut buffer, &mut control)
                    .unwrap();
            }
            let encoded: Vec<Vec<u8>> = burst_of_answers()
                .iter()
                .map(|answer| sealpass_proto::encode(answer).unwrap())
                .collect();
            sealpass_kernel::fdpass::send_batch(connection.as_fd(), &encoded).unwrap();
            answered_tx.send(()).unwrap();
            let _ = closing.recv_timeout(Duration::from_secs(30));
        });
        BurstingReceiver {
            thread,
            answered,
            close,
        }
    }
}

fn burst_of_answers() -> Vec<sealpass_proto::Message> {
    use sealpass_proto::{Ack, Message, Reject};
    vec![
        Message::Ack(Ack::new(1)),
        Message::Reject(Reject::new(2, RejectReason::MissingSeals, "no WRITE seal")),
        Message::Ack(Ack::new(3)),
    ]
}

fn is_burst(verdicts: &[Verdict]) -> bool {
    matches!(
        verdicts,
        [
            Verdict::Accepted { id: 1 },
            Verdict::Rejected {
                id: 2,
                reason: RejectReason::MissingSeals,
                ..
            },
            Verdict::Accepted { id: 3 },
        ]
    )
}

#[test]
fn answers_that_arrive_together_are_taken_one_by_one_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let BurstingReceiver {
        thread,
        answered,
        close,
    } = BurstingReceiver::start(&socket);
    let (verdicts, unknown) = within_deadline(move || {
        let segment = SealedSegment::filled("ok", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
        let mut sender = Sender::connect(&socket).unwrap();
        for _ in 0..BURST_AFTER {
            sender.submit(std::slice::from_ref(&segment)).unwrap();
        }
        // Every answer is queued before the first is read.
        answered.recv().unwrap();
        let mut verdicts = vec![sender.next_verdict().unwrap()];
        // The other two were read with the first: they are there at once,
        // without waiting on the socket (nothing more is queued on it).
        for _ in 0..2 {
            verdicts.push(sender.next_verdict_within(Duration::ZERO).unwrap().unwrap());
        }
        assert_eq!(sender.next_verdict_within(Duration::ZERO).unwrap(), None);
        close.send(()).unwrap();
        (verdicts, sender.next_verdict())
    });
    thread.join().unwrap();
    assert!(is_burst(&verdicts), "{verdicts:?}");
    assert!(
        matches!(
            unknown,
            Err(SendError::DeliveryUnknown {
                id: 4,
                in_flight: 1
            })
        ),
        "{unknown:?}"
    );
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_sender_takes_answers_that_arrive_together_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let receiver = BurstingReceiver::start(&socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (verdicts, unknown): (Vec<Verdict>, _) = runtime.block_on(async {
        let segment = SealedSegment::filled("ok", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
        let mut sender = sealpass_sender::tokio::Sender::connect(&socket)
            .await
            .unwrap();
        for _ in 0..BURST_AFTER {
            sender.submit(std::slice::from_ref(&segment)).await.unwrap();
        }
        receiver.answered.recv().unwrap();
        let mut verdicts = Vec::new();
        for _ in 0..3 {
            let verdict = tokio::time::timeout(Duration::from_secs(30), sender.next_verdict());
            verdicts.push(verdict.await.expect("no hang").unwrap());
        }
        receiver.close.send(()).unwrap();
        (verdicts, sender.next_verdict().await)
    });
    receiver.thread.join().unwrap();
    assert!(is_burst(&verdicts), "{verdicts:?}");
    assert!(
        matches!(unknown, Err(SendError::DeliveryUnknown { id: 4, .. })),
        "{unknown:?}"
    );
}
