//! Every way of accepting a connection enforces every rule its listener's
//! configuration carries: who may connect, how many connections at once,
//! how many bytes all of them may hold mapped. Each way is driven by the
//! same table of cases; the receiving side holds every transfer it gets,
//! unanswered, so that what it holds counts against the limits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use sealpass_proto::RejectReason;
use sealpass_receiver::{Access, Config, Connection, IncomingTransfer, Listener};
use sealpass_sender::{SealedSegment, Seals, Sender, Verdict};

/// How the receiving side takes its connections.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// `Listener::accept`.
    Accept,
    /// `Listener::accept_within`, in slices.
    AcceptWithin,
    /// `tokio::Listener::accept`.
    TokioAccept,
    /// `Listener::accept_socket`, then `Connection::new` with the
    /// listener's configuration: a connection served on its own.
    ConnectionNew,
}

/// Runs a receiver on its own thread: it takes connections `way`, and on
/// each connection holds every transfer it receives, unanswered, reporting
/// each on `received`. Runs until the test process ends.
fn run_receiver(way: Way, socket: PathBuf, config: Config, received: mpsc::Sender<u64>) {
    let (bound, is_bound) = mpsc::channel();
    std::thread::spawn(move || match way {
        Way::TokioAccept => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut listener = sealpass_receiver::tokio::Listener::bind(&socket).unwrap();
                listener.set_config(config);
                bound.send(()).unwrap();
                loop {
                    let mut connection = listener.accept().await.unwrap();
                    let received = received.clone();
                    tokio::spawn(async move {
                        let mut held = Vec::new();
                        while let Ok(Some(transfer)) = connection.receive().await {
                            let _ = received.send(transfer.total_bytes());
                            held.push(transfer);
                        }
                        // Held until the peer is gone.
                        drop(held);
                    });
                }
            });
        }
        _ => {
            let mut listener = Listener::bind(&socket).unwrap();
            listener.set_config(config);
            bound.send(()).unwrap();
            loop {
                let connection = match way {
                    Way::Accept => listener.accept().unwrap(),
                    Way::AcceptWithin => {
                        match listener.accept_within(Duration::from_millis(50)).unwrap() {
                            Some(connection) => connection,
                            None => continue,
                        }
                    }
                    Way::ConnectionNew => {
                        let socket = listener.accept_socket().unwrap();
                        match Connection::new(socket, listener.config().clone()) {
                            Ok(connection) => connection,
                            // Refused, and told so.
                            Err(_) => continue,
                        }
                    }
                    Way::TokioAccept => unreachable!(),
                };
                let received = received.clone();
                std::thread::spawn(move || hold_transfers(connection, &received));
            }
        }
    });
    is_bound.recv().unwrap();
}

fn hold_transfers(mut connection: Connection, received: &mpsc::Sender<u64>) {
    let mut held: Vec<IncomingTransfer> = Vec::new();
    while let Ok(Some(transfer)) = connection.receive() {
        let _ = received.send(transfer.total_bytes());
        held.push(transfer);
    }
}

fn segments(sizes: &[u64]) -> Vec<SealedSegment> {
    (0..sizes.len())
        .map(|index| {
            SealedSegment::filled(
                &format!("frame{index}"),
                b'x',
                sizes[index],
                Seals::SENDER_DEFAULT,
            )
            .unwrap()
        })
        .collect()
}

fn connect(socket: &Path) -> Sender {
    let mut sender = Sender::connect(socket).unwrap();
    sender
        .set_answer_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sender
}

/// What the last sender of a case hears.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    Refused(RejectReason),
    Held,
}

/// A case: `held` transfers of one segment of these sizes, each on a
/// connection of its own, are sent and held by the receiver first; then one
/// more, on a new connection, of segments of the `last` sizes, whose fate
/// is `expected`. (On one connection, an answer waits for those before it:
/// a refusal behind a held transfer would not be heard.)
struct Case {
    name: &'static str,
    config: Config,
    held: &'static [u64],
    last: &'static [u64],
    expected: Heard,
}

fn check(way: Way, case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admission.sock");
    let (received, held_by_receiver) = mpsc::channel();
    run_receiver(way, socket.clone(), case.config.clone(), received);

    let mut senders = Vec::new();
    for &size in case.held {
        let mut sender = connect(&socket);
        sender.submit(&segments(&[size])).unwrap();
        senders.push(sender);
        assert_eq!(
            held_by_receiver.recv_timeout(Duration::from_secs(20)),
            Ok(size),
            "{way:?} {}: the receiver holds the transfer sent first",
            case.name
        );
    }
    let mut last = connect(&socket);
    last.submit(&segments(case.last)).ok();
    let heard = match last.next_verdict_within(Duration::from_secs(2)) {
        Ok(Some(Verdict::Rejected { reason, .. })) => Heard::Refused(reason),
        Ok(None) => Heard::Held,
        other => panic!("{way:?} {}: unexpected {other:?}", case.name),
    };
    assert_eq!(heard, case.expected, "{way:?} {}", case.name);
    drop(senders);
}

fn cases() -> Vec<Case> {
    let config =
        |build: fn(sealpass_receiver::ConfigBuilder) -> sealpass_receiver::ConfigBuilder| {
            build(Config::builder()).build().unwrap()
        };
    vec![
        Case {
            name: "a uid not listed is refused",
            config: config(|c| c.access(Access::default().allow_uid(12345))),
            held: &[],
            last: &[4096],
            expected: Heard::Refused(RejectReason::NotAllowed),
        },
        Case {
            name: "a listed uid is served",
            config: config(|c| c.access(Access::default().allow_uid(12345).allow_uid(0))),
            held: &[],
            last: &[4096],
            expected: Heard::Held,
        },
        Case {
            name: "a connection past max_connections is refused",
            config: config(|c| c.max_connections(1)),
            held: &[4096],
            last: &[4096],
            expected: Heard::Refused(RejectReason::TooManyConnections),
        },
        Case {
            name: "max_mapped_total holds across connections",
            config: config(|c| c.max_mapped_total(1 << 20)),
            held: &[768 << 10],
            last: &[768 << 10],
            expected: Heard::Refused(RejectReason::MemoryLimit),
        },
        Case {
            name: "max_mapped_total holds on one connection",
            config: config(|c| c.max_mapped_total(1 << 20)),
            held: &[],
            last: &[768 << 10, 768 << 10],
            expected: Heard::Refused(RejectReason::MemoryLimit),
        },
        Case {
            name: "within the limits, all are served",
            config: config(|c| c.max_connections(3).max_mapped_total(3 << 20)),
            held: &[768 << 10, 768 << 10],
            last: &[768 << 10],
            expected: Heard::Held,
        },
    ]
}

#[test]
fn listener_accept_enforces_the_whole_config() {
    for case in cases() {
        check(Way::Accept, &case);
    }
}

#[test]
fn listener_accept_within_enforces_the_whole_config() {
    for case in cases() {
        check(Way::AcceptWithin, &case);
    }
}

#[test]
fn tokio_listener_accept_enforces_the_whole_config() {
    for case in cases() {
        check(Way::TokioAccept, &case);
    }
}

#[test]
fn a_connection_served_alone_enforces_access_and_its_mapped_total() {
    // Alone, a connection is its own total: the cross-connection cases do
    // not apply to it.
    for case in cases().iter().filter(|case| {
        !case.name.contains("across connections") && !case.name.contains("max_connections")
    }) {
        check(Way::ConnectionNew, case);
    }
}
