//! The outbox against the state machine alone: each case is a script of
//! what happens on a connection (deliveries, answers, holds, sends that go
//! out whole, in part or not at all, time passing) and the runs of answers
//! that reach the wire. Time is simulated.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{decode, encode};
use crate::config::Config;
use crate::limits::MAX_BATCH;
use crate::message::{Message, Segment, Transfer};
use crate::seals::Seals;
use crate::session::{Datagram, Received, Session, Ticket, unknown_fd_facts};
use crate::verify::{FdFacts, FileKind};

/// One thing that happens on the connection.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// A valid one-segment transfer of this id arrives and is delivered.
    Deliver(u64),
    /// A message that is not one of the protocol arrives: `Reject` id 0.
    Garbage,
    /// The application accepts the transfer of this id.
    Accept(u64),
    Hold,
    Release,
    /// The driver sends what is due while the peer has room for this many
    /// answers; the runs that went out (whole or in part) are recorded.
    Send {
        room: usize,
    },
    /// The driver's send fails; the kind it reports is recorded.
    SendFails,
    /// Time passes to this many seconds after the start.
    At(u64),
}

/// What the wire saw: runs of (kind, id), one `sendmmsg` each, and what the
/// session said along the way.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Run(Vec<(&'static str, u64)>),
    Failed(&'static str),
}

use Seen::{Failed, Run};
use Step::*;

fn delivered_transfer(session: &mut Session, now: Instant, id: u64) -> Ticket {
    let name = format!("s{id}");
    let bytes = encode(&Message::Transfer(Transfer::new(
        id,
        vec![Segment::new(&name, 4096, Seals::SENDER_DEFAULT)],
    )))
    .expect("a valid transfer");
    let datagram = Datagram {
        bytes: &bytes,
        fds: 1,
        payload_truncated: false,
        control_truncated: false,
    };
    let Received::Inspect(unverified) = session.handle_datagram(now, &datagram) else {
        panic!("transfer {id} was not taken");
    };
    let verified = session
        .judge(
            unverified,
            &mut vec![()],
            &mut unknown_fd_facts(),
            |_, facts| {
                *facts = FdFacts {
                    kind: FileKind::Regular,
                    seals: Some(Seals::SENDER_DEFAULT),
                    size: 4096,
                    allocated: 4096,
                    link: format!("/memfd:{name} (deleted)").into_bytes(),
                };
                Ok::<(), std::io::Error>(())
            },
        )
        .expect("transfer verified");
    let delivered = session.deliver(verified);
    drop(delivered.reservation);
    delivered.ticket
}

/// Runs `steps` on a session with a 10 s idle timeout, and checks that the
/// wire saw `expected`, and that the session is done at the end or not.
fn check(name: &str, steps: &[Step], expected: &[Seen], done: bool) {
    let start = Instant::now();
    let config = Config::builder()
        .idle_timeout(Some(Duration::from_secs(10)))
        .first_message_deadline(None)
        .build()
        .expect("config");
    let mut session = Session::new(Arc::new(config), None, start);
    let mut now = start;
    let mut tickets = HashMap::new();
    let mut seen = Vec::new();
    for step in steps {
        match *step {
            Deliver(id) => {
                tickets.insert(id, delivered_transfer(&mut session, now, id));
            }
            Garbage => {
                let datagram = Datagram {
                    bytes: b"not sealpass",
                    fds: 0,
                    payload_truncated: false,
                    control_truncated: false,
                };
                assert!(matches!(
                    session.handle_datagram(now, &datagram),
                    Received::Refused(_)
                ));
            }
            Accept(id) => {
                let ticket = tickets.remove(&id).expect("a delivered id");
                session.answer(ticket, Ok(()), now);
            }
            Hold => session.hold_answers(),
            Release => session.release_answers(),
            Send { room } => {
                let mut room = room;
                loop {
                    let due = session.poll_send().expect("encodable answers");
                    if due.is_empty() {
                        break;
                    }
                    let count = due.len().min(room);
                    let run = due
                        .iter()
                        .take(count)
                        .map(|bytes| {
                            let message = decode(bytes).expect("a valid answer").message;
                            (message.kind(), message.id())
                        })
                        .collect();
                    seen.push(Run(run));
                    room -= count;
                    if !session.sent(count) {
                        assert!(session.has_unsent(), "{name}: unsent answers are kept");
                        break;
                    }
                }
            }
            SendFails => {
                assert!(!session.poll_send().expect("encodable").is_empty());
                seen.push(Failed(session.send_failed()));
            }
            At(seconds) => {
                now = start + Duration::from_secs(seconds);
                session.handle_timeout(now);
            }
        }
    }
    assert_eq!(seen, expected, "{name}");
    assert_eq!(session.is_done(), done, "{name}: done at the end");
}

#[test]
fn answers_leave_in_order_held_in_runs_and_across_partial_sends() {
    let many: Vec<Step> = (1..=40)
        .map(Deliver)
        .chain((1..=40).map(Accept))
        .chain([Send { room: usize::MAX }])
        .collect();
    let many_seen = [
        Run((1..=32).map(|id| ("Ack", id)).collect()),
        Run((33..=40).map(|id| ("Ack", id)).collect()),
    ];
    assert_eq!(MAX_BATCH, 32, "the case below counts on runs of 32");
    let cases: &[(&str, &[Step], &[Seen], bool)] = &[
        (
            "an answer given early waits for the earlier ones",
            &[
                Deliver(1),
                Deliver(2),
                Accept(2),
                Send { room: 9 },
                Accept(1),
                Send { room: 9 },
            ],
            &[Run(vec![("Ack", 1), ("Ack", 2)])],
            false,
        ),
        (
            "held answers wait for the release, then leave in one run",
            &[
                Hold,
                Deliver(1),
                Accept(1),
                Garbage,
                Deliver(2),
                Accept(2),
                Send { room: 9 },
                Release,
                Send { room: 9 },
            ],
            &[Run(vec![("Ack", 1), ("Reject", 0), ("Ack", 2)])],
            false,
        ),
        (
            "the rest of a run the peer had no room for goes first",
            &[
                Deliver(1),
                Deliver(2),
                Deliver(3),
                Accept(1),
                Accept(2),
                Accept(3),
                Send { room: 1 },
                Deliver(4),
                Accept(4),
                Send { room: 9 },
            ],
            &[
                Run(vec![("Ack", 1)]),
                Run(vec![("Ack", 2), ("Ack", 3)]),
                Run(vec![("Ack", 4)]),
            ],
            false,
        ),
        (
            "a peer with no room at all keeps every answer",
            &[
                Deliver(1),
                Accept(1),
                Send { room: 0 },
                Send { room: 0 },
                Send { room: 5 },
            ],
            &[Run(vec![]), Run(vec![]), Run(vec![("Ack", 1)])],
            false,
        ),
        (
            "answers go out in runs of at most MAX_BATCH",
            &many,
            &many_seen,
            false,
        ),
        (
            "a failed send says what it was sending and ends the connection",
            &[Deliver(1), Accept(1), Garbage, SendFails],
            &[Failed("Ack or Reject")],
            true,
        ),
        (
            "a send that fails part-way reports what was left",
            &[
                Deliver(1),
                Deliver(2),
                Accept(1),
                Accept(2),
                Send { room: 1 },
                SendFails,
            ],
            &[Run(vec![("Ack", 1)]), Failed("Ack")],
            true,
        ),
        (
            "silence past the idle timeout is answered after the held answers, and closes",
            &[
                Hold,
                Deliver(1),
                Accept(1),
                At(5),
                At(14),
                Send { room: 9 },
                Release,
                Send { room: 9 },
            ],
            &[Run(vec![("Ack", 1), ("Reject", 0)])],
            true,
        ),
        (
            "nothing times out while an answer is owed, however long",
            &[
                Deliver(1),
                At(100),
                Send { room: 9 },
                Accept(1),
                At(105),
                Send { room: 9 },
                At(116),
            ],
            &[Run(vec![("Ack", 1)])],
            false,
        ),
        (
            "a closing answer not yet sent keeps the session from being done",
            &[Deliver(1), Accept(1), At(11), Send { room: 1 }],
            &[Run(vec![("Ack", 1)])],
            false,
        ),
    ];
    for (name, steps, expected, done) in cases {
        check(name, steps, expected, *done);
    }
}

#[test]
fn a_driver_knows_whether_the_connection_read_on_since_a_delivery() {
    let start = Instant::now();
    let mut session = Session::new(Arc::new(Config::default()), None, start);
    let first = delivered_transfer(&mut session, start, 1);
    assert!(!session.read_since(&first), "nothing read since");
    let second = delivered_transfer(&mut session, start, 2);
    assert!(
        session.read_since(&first),
        "the second was read since the first"
    );
    assert!(!session.read_since(&second));
    session.answer(first, Ok(()), start);
    session.answer(second, Ok(()), start);
}
