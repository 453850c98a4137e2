//! Properties that must hold on any input, for the fuzz targets in `fuzz/`
//! (coverage-guided, `cargo xtask soak`) and the property tests that run
//! them briefly on random input in `cargo xtask test`. Each takes raw bytes,
//! panics when a property breaks, and returns otherwise. Feature `fuzzing`.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::session::{Datagram, Received, Ticket};
use crate::verify::{FdFacts, FileKind};
use crate::{Config, MappedBudget, Message, Reservation, Seals, Session, decode, encode};

/// Decoding arbitrary bytes never panics; whatever decodes obeys the field
/// rules when it is a transfer of this minor, and encodes back to a message
/// that decodes to the same value.
pub fn codec(data: &[u8]) {
    let Ok(decoded) = decode(data) else {
        return;
    };
    let encoded = encode(&decoded.message).expect("a decoded message encodes");
    let again = decode(&encoded).expect("an encoded message decodes");
    assert_eq!(
        again.message, decoded.message,
        "the round trip changes nothing"
    );
}

/// Reads the fuzzer's bytes as a script of choices, 0 once they run out.
struct Script<'a> {
    data: &'a [u8],
}

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&first, rest)) => {
                self.data = rest;
                first
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |value, _| value << 8 | u64::from(self.byte()))
    }

    fn bytes(&mut self, most: usize) -> &[u8] {
        let len = usize::from(self.byte()).min(most).min(self.data.len());
        let (taken, rest) = self.data.split_at(len);
        self.data = rest;
        taken
    }

    fn done(&self) -> bool {
        self.data.is_empty()
    }
}

/// A delivered transfer the "application" still holds.
struct Held {
    ticket: Ticket,
    reservation: Reservation,
}

/// The session, driven by any sequence of events: datagrams (well-formed
/// transfers with any facts per fd, or any bytes), the application's
/// verdicts in any order, failed mappings, time passing, the peer closing.
/// Never a panic; answers leave in the order the messages came, each
/// message answered at most once, with the id it should carry; every byte
/// reserved is given back once nothing holds it.
pub fn session(data: &[u8]) {
    let mut script = Script { data };
    let limits = script.byte();
    let config = Config::builder()
        .max_mapped_per_connection(u64::from(limits & 0x0f) << 12)
        .max_mapped_total(u64::from(limits >> 4) << 13)
        .refuse_sparse(script.byte() & 1 == 1)
        .timeouts(Some(Duration::from_millis(u64::from(script.byte()) + 1)))
        .build()
        .expect("a valid configuration");
    let total = MappedBudget::new(config.max_mapped_total());
    let start = Instant::now();
    let mut now = start;
    let mut session = Session::new(Arc::new(config), Some(Arc::clone(&total)), now);
    let mut held: Vec<Held> = Vec::new();
    // For each message read, in order: the id its answer must carry (0 for
    // one refused before its id could be read), not yet seen on the wire.
    let mut expected: std::collections::VecDeque<Option<u64>> = Default::default();
    let mut scratch = crate::session::unknown_fd_facts();
    let mut steps = 0;
    while !script.done() && steps < 256 {
        steps += 1;
        match script.byte() % 6 {
            0 | 1 => {
                // A datagram: a well-formed transfer (choice 0) or any bytes.
                let transfer;
                let mut declared = Vec::new();
                let bytes = if script.byte() % 2 == 0 {
                    let count = usize::from(script.byte() % 4);
                    let segments: Vec<_> = (0..count)
                        .map(|index| {
                            let size = u64::from(script.byte()) << 8;
                            crate::Segment::new(format!("s{index}"), size, Seals::SENDER_DEFAULT)
                        })
                        .collect();
                    declared.clone_from(&segments);
                    let id = script.u64() % 4;
                    // The encoder refuses what breaks a field rule (id 0, no
                    // segments): the arbitrary bytes below reach those.
                    let Ok(encoded) =
                        encode(&Message::Transfer(crate::Transfer::new(id, segments)))
                    else {
                        continue;
                    };
                    transfer = encoded;
                    &transfer[..]
                } else {
                    transfer = script.bytes(64).to_vec();
                    &transfer[..]
                };
                let fds = usize::from(script.byte() % 5);
                let flags = script.byte();
                let datagram = Datagram {
                    bytes,
                    fds,
                    payload_truncated: flags & 1 == 1,
                    control_truncated: flags & 2 == 2,
                };
                if !session.wants_to_read() {
                    continue;
                }
                match session.handle_datagram(now, &datagram) {
                    Received::End => {}
                    Received::Refused(reject) => expected.push_back(Some(reject.id)),
                    Received::Inspect(unverified) => {
                        let id = unverified.id();
                        let mut handles = vec![(); fds];
                        let judged = session.judge(
                            unverified,
                            &mut handles,
                            &mut scratch,
                            |index, facts| {
                                *facts = fd_facts(&mut script, declared.get(index));
                                Ok::<(), &str>(())
                            },
                        );
                        match judged {
                            Err(reject) => {
                                assert_eq!(reject.id, id, "a refusal after decoding names the id");
                                expected.push_back(Some(id));
                            }
                            Ok(verified) => {
                                expected.push_back(Some(id));
                                if script.byte() % 8 == 0 && verified.grants().len() > 0 {
                                    let error = std::io::Error::from_raw_os_error(12);
                                    let reject = session.map_failed(verified, 0, &error);
                                    assert_eq!(reject.id, id);
                                } else {
                                    let delivered = session.deliver(verified);
                                    assert_eq!(delivered.id, id);
                                    held.push(Held {
                                        ticket: delivered.ticket,
                                        reservation: delivered.reservation,
                                    });
                                }
                            }
                        }
                    }
                }
            }
            2 if !held.is_empty() => {
                // The application answers one it holds, in any order, and
                // lets go of its pages now or later.
                let index = usize::from(script.byte()) % held.len();
                let Held {
                    ticket,
                    reservation,
                } = held.swap_remove(index);
                let verdict = if script.byte() % 2 == 0 {
                    Ok(())
                } else {
                    Err("no".to_owned())
                };
                session.answer(ticket, verdict, now);
                drop(reservation);
            }
            3 => {
                now += Duration::from_millis(u64::from(script.byte()));
                if let Some(reject) = session.handle_timeout(now) {
                    assert_eq!(reject.id, 0, "a timeout answers no message");
                    expected.push_back(Some(0));
                }
            }
            4 => {
                let end = Datagram {
                    bytes: &[],
                    fds: 0,
                    payload_truncated: false,
                    control_truncated: false,
                };
                if session.wants_to_read() {
                    assert!(matches!(session.handle_datagram(now, &end), Received::End));
                }
            }
            _ => {}
        }
        // What is due leaves now, in order.
        while let Some(transmit) = session.poll_transmit() {
            let id = match &transmit.message {
                Message::Ack(ack) => ack.id,
                Message::Reject(reject) => reject.id,
                Message::Transfer(_) => panic!("a receiver never sends a transfer"),
            };
            let owed = expected.pop_front().expect("an answer to a message read");
            if let (Message::Ack(_), Some(owed)) = (&transmit.message, owed) {
                assert_eq!(id, owed, "an Ack names its transfer");
            }
            if let Some(owed) = owed {
                assert!(id == owed || id == 0, "answer {id} where {owed} is owed");
            }
        }
    }
    drop(held);
    drop(session);
    assert_eq!(total.in_use(), 0, "every byte reserved is given back");
}

/// Facts for one fd, from the script: mostly a memfd that matches the
/// segment `declared` for it, sometimes anything.
fn fd_facts(script: &mut Script<'_>, declared: Option<&crate::Segment>) -> FdFacts {
    let choice = script.byte();
    let kind = if choice % 16 == 0 {
        FileKind::Fifo
    } else {
        FileKind::Regular
    };
    let seals = match choice % 7 {
        0 => None,
        1 => Some(Seals::empty()),
        _ => Some(Seals::SENDER_DEFAULT),
    };
    let (name, size) = match declared {
        Some(segment) if choice % 3 != 0 => (segment.name.clone(), segment.size),
        _ => (
            format!("s{}", script.byte() % 4),
            u64::from(script.byte()) << 8,
        ),
    };
    let allocated = if choice % 5 == 0 { 0 } else { size };
    let link = if choice % 11 == 0 {
        b"/tmp/x".to_vec()
    } else {
        format!("/memfd:{name} (deleted)").into_bytes()
    };
    FdFacts {
        kind,
        seals,
        size,
        allocated,
        link,
    }
}
