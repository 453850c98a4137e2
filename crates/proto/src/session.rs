//! The receiver's side of one connection, as a state machine that does no
//! I/O: no sockets, no clock, no file descriptors (quinn-proto's shape).
//!
//! A driver (the blocking `Connection` and `Service`, or an async one) moves
//! bytes and fds and asks the kernel; the [`Session`] decides everything
//! PROTOCOL.md section 6 leaves to a receiver:
//!
//! ```text
//! driver                                   Session
//!   recvmsg ─ Datagram ─────────────────▶  handle_datagram: framing, version,
//!                                          limits, field rules, fd count
//!          ◀──────────── Received::Inspect(Unverified) | Refused | End
//!   fstat, F_GET_SEALS, readlink ──────▶  judge: name, size, seals, holes,
//!     (a closure, per fd, in order)        memory budgets, reservation
//!          ◀──────────────────── Verified (the only key to mapping)
//!   mmap with the Grant ───────────────▶  map_failed, or deliver
//!          ◀──────────────────── Ticket: the answer's place in wire order
//!   the application decides ───────────▶  answer(ticket, verdict)
//!   poll_send ◀──────── Ack / Reject encoded, in the order the messages
//!   sent / send_failed   came; held for a batch, in runs of MAX_BATCH
//!   poll_timeout / handle_timeout: first-message deadline, idle timeout
//! ```
//!
//! Time is passed in as an [`Instant`], so tests drive every deadline with
//! simulated time:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::{Duration, Instant};
//! use sealpass_proto::session::{Datagram, Received, Session, unknown_fd_facts};
//! use sealpass_proto::{Config, FdFacts, FileKind, Message, Seals, Segment, Transfer, encode};
//!
//! let start = Instant::now();
//! let mut session = Session::new(Arc::new(Config::default()), None, start);
//! // The peer says nothing for 10 s: Reject(Timeout), and the connection closes.
//! assert_eq!(session.poll_timeout(), Some(start + Duration::from_secs(10)));
//!
//! // A transfer arrives at 1 s, with one fd.
//! let bytes = encode(&Message::Transfer(Transfer::new(1, vec![
//!     Segment::new("frame", 4096, Seals::SENDER_DEFAULT),
//! ])))?;
//! let now = start + Duration::from_secs(1);
//! let datagram = Datagram { bytes: &bytes, fds: 1, payload_truncated: false, control_truncated: false };
//! let Received::Inspect(unverified) = session.handle_datagram(now, &datagram) else { panic!() };
//! // What the kernel says of the fd (a driver asks fstat, F_GET_SEALS, readlink).
//! // The message's fds (here stand-ins): a verified transfer holds them.
//! let mut fds = vec![()];
//! let verified = session.judge(unverified, &mut fds, &mut unknown_fd_facts(), |_index, facts| {
//!     *facts = FdFacts {
//!         kind: FileKind::Regular,
//!         seals: Some(Seals::SENDER_DEFAULT),
//!         size: 4096,
//!         allocated: 4096,
//!         link: b"/memfd:frame (deleted)".to_vec(),
//!     };
//!     Ok::<(), std::io::Error>(())
//! })?;
//! // A driver maps each fd with its Grant here, then delivers.
//! assert_eq!(verified.grants().map(|grant| grant.size()).sum::<u64>(), 4096);
//! let delivered = session.deliver(verified);
//! assert_eq!(session.mapped(), 4096); // until the reservation (the mappings') drops
//! drop(delivered.reservation);
//! session.answer(delivered.ticket, Ok(()), now);
//! let ack = session.poll_transmit().expect("the Ack");
//! assert_eq!((ack.message.kind(), ack.message.id()), ("Ack", 1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Instant;

pub use crate::budget::{MappedBudget, Reservation};
use crate::codec::decode;
use crate::config::Config;
use crate::limits::MAX_MESSAGE_LEN;
use crate::message::{Ack, Message, Reject, RejectReason, Transfer};
use crate::outbox::Outbox;
pub use crate::outbox::UnencodableAnswer;
use crate::seals::Seals;
pub use crate::steps::{
    Datagram, Delivered, Grant, Received, Ticket, Transmit, Unverified, Verified,
};
pub use crate::verify::admit;
use crate::verify::{FdFacts, FileKind, check_fd_count, check_segment};

/// One message's place in the answer order.
#[derive(Debug)]
struct Slot {
    sequence: u64,
    answer: Option<Message>,
    closes: bool,
}

/// The connection's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading messages.
    Open,
    /// A closing `Reject` is queued; nothing more is read.
    Closing,
    /// The closing answer went out, or answering failed: done.
    Closed,
}

/// The receiver's state for one connection. See the module documentation.
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    own: Arc<MappedBudget>,
    /// The budget shared by every connection of a listener; a session on
    /// its own gets one of its own, so `max_mapped_total` always holds.
    total: Arc<MappedBudget>,
    phase: Phase,
    peer_closed: bool,
    greeted: bool,
    /// When silence becomes `Timeout`, counted from the connection's start
    /// until the first message, then from the last message or answer.
    deadline: Option<Instant>,
    answers: VecDeque<Slot>,
    next_sequence: u64,
    /// Delivered transfers whose answer the application still owes.
    owed: usize,
    /// Datagrams handled so far ([`Session::read_since`]).
    handled: u64,
    /// The answers taken from `answers`, encoded, on their way out.
    pub(crate) outbox: Outbox,
}

impl Session {
    /// A session for a connection accepted at `now`, under `config`, its
    /// mappings also counted in `total` (shared with other connections) if
    /// given, and otherwise in a budget of `config.max_mapped_total()` of
    /// its own.
    pub fn new(config: Arc<Config>, total: Option<Arc<MappedBudget>>, now: Instant) -> Session {
        let total = total.unwrap_or_else(|| MappedBudget::new(config.max_mapped_total()));
        let deadline = config
            .first_message_deadline()
            .or(config.idle_timeout())
            .and_then(|wait| now.checked_add(wait));
        Session {
            own: MappedBudget::new(config.max_mapped_per_connection()),
            config,
            total,
            phase: Phase::Open,
            peer_closed: false,
            greeted: false,
            deadline,
            answers: VecDeque::new(),
            next_sequence: 0,
            owed: 0,
            handled: 0,
            outbox: Outbox::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes this connection's transfers hold mapped right now.
    pub fn mapped(&self) -> u64 {
        self.own.in_use()
    }

    /// Whether to read another message: the connection is open and the
    /// peer has not closed its end.
    pub fn wants_to_read(&self) -> bool {
        self.phase == Phase::Open && !self.peer_closed
    }

    /// Whether the connection is over: closed after a closing answer or a
    /// failed one, or the peer closed and every answer it is owed went out.
    pub fn is_done(&self) -> bool {
        (self.phase == Phase::Closed && self.outbox.is_empty())
            || (self.peer_closed
                && self.owed == 0
                && self.answers.is_empty()
                && self.outbox.is_empty())
            || (self.phase == Phase::Closing && self.answers.is_empty() && self.outbox.is_empty())
    }

    /// Whether a datagram was handled since `ticket`'s transfer was
    /// delivered. If not, a driver may answer it and release its mappings
    /// before the next message is judged (which then meets budgets that no
    /// longer count them); if so, it releases them first.
    pub fn read_since(&self, ticket: &Ticket) -> bool {
        self.handled != ticket.handled
    }

    /// Answers the application still owes (delivered, not answered).
    pub fn owed(&self) -> usize {
        self.owed
    }

    /// When to call [`Session::handle_timeout`] if nothing arrives before:
    /// `None` while nothing can time out (no timeout configured, an answer
    /// is owed to the peer, or reading is over).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.wants_to_read() || self.owed > 0 {
            return None;
        }
        self.deadline
    }

    /// Time has come to `now`: past the deadline, the peer gets
    /// `Reject(Timeout)` with id 0 and the connection closes. Returns the
    /// reject if so.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Reject> {
        let deadline = self.poll_timeout()?;
        if now < deadline {
            return None;
        }
        let (what, waited) = if self.greeted {
            ("no message", self.config.idle_timeout())
        } else {
            (
                "no complete first message",
                self.config
                    .first_message_deadline()
                    .or(self.config.idle_timeout()),
            )
        };
        let reject = Reject::new(
            0,
            RejectReason::Timeout,
            format!(
                "{what} within {:?}; closing the connection",
                waited.unwrap_or_default()
            ),
        );
        self.queue_refusal(reject.clone(), true);
        Some(reject)
    }

    /// Judges one datagram, up to what needs the fds themselves. Call it
    /// only while [`Session::wants_to_read`].
    pub fn handle_datagram(&mut self, now: Instant, datagram: &Datagram<'_>) -> Received {
        self.handled += 1;
        if !self.wants_to_read() {
            return Received::End;
        }
        if datagram.is_end_of_stream() {
            self.peer_closed = true;
            return Received::End;
        }
        self.greeted = true;
        self.rearm(now);
        match self.screen(datagram) {
            Ok(unverified) => Received::Inspect(unverified),
            Err((reject, closes)) => {
                self.queue_refusal(reject.clone(), closes);
                Received::Refused(reject)
            }
        }
    }

    /// Steps 2 to 7 of PROTOCOL.md section 6.
    fn screen(&self, datagram: &Datagram<'_>) -> Result<Unverified, (Reject, bool)> {
        let refuse = |id, reason, message: &dyn Display| {
            (Reject::new(id, reason, message.to_string()), false)
        };
        if datagram.payload_truncated {
            return Err(refuse(
                0,
                RejectReason::TooLarge,
                &format_args!(
                    "message over {MAX_MESSAGE_LEN} bytes; expected at most {MAX_MESSAGE_LEN}"
                ),
            ));
        }
        if datagram.control_truncated {
            // The control buffer has room for SCM_MAX_FD fds, so the kernel
            // could not install them all: this process is short of fds.
            return Err(refuse(
                0,
                RejectReason::ControlTruncated,
                &format_args!(
                    "control data was truncated (MSG_CTRUNC) after {} fds; the receiver may be out of file descriptors",
                    datagram.fds
                ),
            ));
        }
        let decoded = decode(datagram.bytes).map_err(|error| {
            (
                Reject::new(error.reject_id(), error.reject_reason(), error.to_string()),
                error.closes_connection(),
            )
        })?;
        let version = decoded.version;
        let Message::Transfer(Transfer {
            id,
            segments,
            metadata,
        }) = decoded.message
        else {
            return Err(refuse(
                decoded.message.id(),
                RejectReason::UnexpectedMessage,
                &format_args!("got {}; expected Transfer", decoded.message.kind()),
            ));
        };
        if segments.len() > self.config.max_segments() {
            return Err(refuse(
                id,
                RejectReason::TooManySegments,
                &format_args!(
                    "{} segments; this receiver accepts at most {} per message",
                    segments.len(),
                    self.config.max_segments()
                ),
            ));
        }
        check_fd_count(datagram.fds, segments.len())
            .map_err(|error| refuse(id, RejectReason::FdCountMismatch, &error))?;
        Ok(Unverified {
            id,
            version,
            segments,
            metadata,
        })
    }

    /// Step 8 and 9: judges each fd, in order, from the facts `inspect`
    /// gathers for it from the kernel into the `FdFacts` it is given (its
    /// `link` buffer is reused from fd to fd), then reserves the transfer's
    /// bytes in the budgets. `fds` are the message's fds, in order (the
    /// facts of fd `index` are `inspect`'s for that index): a verified
    /// transfer takes them, and a refused one closes them (`fds` is left
    /// empty, its capacity kept) before the refusal is queued for the
    /// driver to transmit.
    pub fn judge<F, E: Display>(
        &mut self,
        unverified: Unverified,
        fds: &mut Vec<F>,
        scratch: &mut FdFacts,
        mut inspect: impl FnMut(usize, &mut FdFacts) -> Result<(), E>,
    ) -> Result<Verified<F>, Reject> {
        let result = self.check(unverified, fds, scratch, &mut inspect);
        result.inspect_err(|reject| {
            fds.clear();
            self.queue_refusal(reject.clone(), false);
        })
    }

    fn check<F, E: Display>(
        &self,
        unverified: Unverified,
        fds: &mut Vec<F>,
        scratch: &mut FdFacts,
        inspect: &mut impl FnMut(usize, &mut FdFacts) -> Result<(), E>,
    ) -> Result<Verified<F>, Reject> {
        let Unverified {
            id,
            version,
            segments,
            metadata,
        } = unverified;
        // The datagram's fd count was checked against the header; the fds
        // given here must be those, one per segment.
        check_fd_count(fds.len(), segments.len())
            .map_err(|error| Reject::new(id, RejectReason::FdCountMismatch, error.to_string()))?;
        let policy = self.config.policy();
        let mut total = 0u64;
        let mut confirmed = segments;
        for (index, declared) in confirmed.iter_mut().enumerate() {
            inspect(index, scratch).map_err(|error| {
                Reject::new(
                    id,
                    RejectReason::NotMemfd,
                    format!("segment {index}: inspecting the fd failed: {error}"),
                )
            })?;
            check_segment(index, declared, scratch, &policy)
                .map_err(|error| Reject::new(id, error.reject_reason(), error.to_string()))?;
            // What the kernel reports: all its seals, and the size to map.
            declared.seals = scratch.seals.unwrap_or(Seals::empty());
            declared.size = scratch.size;
            total = total.saturating_add(scratch.size);
        }
        let reservation = self.reserve(id, total)?;
        Ok(Verified {
            id,
            version,
            confirmed,
            fds: std::mem::take(fds),
            metadata,
            reservation,
        })
    }

    /// Takes `bytes` from this connection's budget and the shared one.
    fn reserve(&self, id: u64, bytes: u64) -> Result<Reservation, Reject> {
        let memory_limit = |message: String| Reject::new(id, RejectReason::MemoryLimit, message);
        self.own.take(bytes).ok_or_else(|| {
            memory_limit(format!(
                "transfer of {bytes} bytes does not fit: this connection holds {} of the {} bytes it may map",
                self.own.in_use(),
                self.own.limit()
            ))
        })?;
        if self.total.take(bytes).is_none() {
            self.own.give_back(bytes);
            return Err(memory_limit(format!(
                "transfer of {bytes} bytes does not fit: {} of {} bytes already mapped by all connections",
                self.total.in_use(),
                self.total.limit()
            )));
        }
        Ok(Reservation {
            budgets: [Some(Arc::clone(&self.own)), Some(Arc::clone(&self.total))],
            bytes,
        })
    }

    /// Step 10 failed: segment `index` of `verified` could not be mapped.
    /// Queues the refusal (`ResourceExhausted` when memory or address space
    /// ran out, `MapFailed` otherwise) and gives the reservation back.
    pub fn map_failed<F>(
        &mut self,
        verified: Verified<F>,
        index: usize,
        error: &std::io::Error,
    ) -> Reject {
        // `ENOMEM` is `OutOfMemory`; the driver reports a size no address
        // space can map (`EOVERFLOW`) as that too.
        let out_of_memory = error.kind() == std::io::ErrorKind::OutOfMemory;
        let reason = if out_of_memory {
            RejectReason::ResourceExhausted
        } else {
            RejectReason::MapFailed
        };
        let (name, size) = verified
            .confirmed
            .get(index)
            .map(|segment| (segment.name.as_str(), segment.size))
            .unwrap_or_default();
        let reject = Reject::new(
            verified.id,
            reason,
            format!("segment {index} ({name:?}): mapping {size} bytes failed: {error}"),
        );
        drop(verified);
        self.queue_refusal(reject.clone(), false);
        reject
    }

    /// Step 11: every fd is mapped; the transfer goes to the application,
    /// whose answer takes the next place in the answer order.
    pub fn deliver<F>(&mut self, verified: Verified<F>) -> Delivered<F> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.answers.push_back(Slot {
            sequence,
            answer: None,
            closes: false,
        });
        self.owed += 1;
        Delivered {
            ticket: Ticket {
                sequence,
                id: verified.id,
                handled: self.handled,
            },
            id: verified.id,
            version: verified.version,
            segments: verified.confirmed,
            fds: verified.fds,
            metadata: verified.metadata,
            reservation: verified.reservation,
        }
    }

    /// The application's verdict on a delivered transfer: `Ok` is `Ack`,
    /// `Err` is `Reject(ApplicationRejected)` with its text. The answer
    /// goes out once every earlier one has ([`Session::poll_transmit`]).
    pub fn answer(&mut self, ticket: Ticket, verdict: Result<(), String>, now: Instant) {
        let message = match verdict {
            Ok(()) => Message::Ack(Ack { id: ticket.id }),
            Err(text) => Message::Reject(Reject::new(
                ticket.id,
                RejectReason::ApplicationRejected,
                text,
            )),
        };
        // Slots are in sequence order, one per message, so a ticket's slot
        // is found by its distance from the oldest: O(1) per answer.
        let index = self
            .answers
            .front()
            .and_then(|oldest| ticket.sequence.checked_sub(oldest.sequence))
            .and_then(|distance| usize::try_from(distance).ok());
        if let Some(slot) = index
            .and_then(|index| self.answers.get_mut(index))
            .filter(|slot| slot.sequence == ticket.sequence && slot.answer.is_none())
        {
            slot.answer = Some(message);
            self.owed = self.owed.saturating_sub(1);
        }
        // Silence is counted again once nothing is owed.
        self.rearm(now);
    }

    /// The next answer to send, in the order the messages came; `None` when
    /// the oldest is still owed by the application (or none is queued).
    /// After one that `closes`, the connection is done.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.phase == Phase::Closed {
            self.answers.clear();
            return None;
        }
        let slot = self.answers.front()?;
        slot.answer.as_ref()?;
        let slot = self.answers.pop_front()?;
        if slot.closes {
            self.phase = Phase::Closed;
        }
        slot.answer.map(|message| Transmit {
            message,
            closes: slot.closes,
        })
    }

    /// The connection broke (sending an answer or receiving failed: the
    /// peer is gone or does not read): it is over; answers still owed are
    /// dropped.
    pub fn abort(&mut self) {
        self.phase = Phase::Closed;
        self.answers.clear();
        self.outbox.clear();
    }

    fn queue_refusal(&mut self, reject: Reject, closes: bool) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.answers.push_back(Slot {
            sequence,
            answer: Some(Message::Reject(reject)),
            closes,
        });
        if closes {
            self.phase = Phase::Closing;
        }
    }

    /// Restarts the idle clock at `now`. Before the first message the
    /// first-message deadline stands, counted from the start.
    fn rearm(&mut self, now: Instant) {
        if self.greeted {
            self.deadline = self
                .config
                .idle_timeout()
                .and_then(|wait| now.checked_add(wait));
        }
    }
}

/// Facts for an fd that could not be inspected at all: judged not a memfd.
pub fn unknown_fd_facts() -> FdFacts {
    FdFacts {
        kind: FileKind::Other,
        seals: None,
        size: 0,
        allocated: 0,
        link: Vec::new(),
    }
}

#[cfg(test)]
#[path = "session_tests/mod.rs"]
mod tests;
