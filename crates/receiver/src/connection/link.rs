//! The link a connection's session lives behind, shared with the
//! responders of its transfers: the socket, the answers leaving in order
//! (held for a batch, sent in one `sendmmsg`), and releases under way.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use sealpass_kernel::fdpass::{self};
use sealpass_proto::session::Ticket;
use sealpass_proto::{Session, codec};

use crate::listener::AdmissionTicket;
use crate::transfer::VerifiedSegment;

use super::AnswerError;

/// How a connection's socket is waited on.
#[derive(Debug)]
pub(crate) enum Socket {
    /// Blocking calls, bounded by `SO_RCVTIMEO`/`SO_SNDTIMEO`.
    Blocking(OwnedFd),
    /// Non-blocking, registered with a tokio reactor.
    #[cfg(feature = "tokio")]
    Async(tokio::io::unix::AsyncFd<OwnedFd>),
}

impl Socket {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Blocking(fd) => fd.as_fd(),
            #[cfg(feature = "tokio")]
            Socket::Async(fd) => fd.get_ref().as_fd(),
        }
    }
}

/// The session and its socket, shared by the connection and the responders
/// of the transfers it delivered. Dropped with the last of them, it closes
/// the socket so that the peer reads every answer first.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) socket: Socket,
    state: Mutex<LinkState>,
    /// Transfers answered before their segments are released, whose release
    /// is under way: the blocking reader waits for them before it judges
    /// the next message, so that message meets budgets that no longer count
    /// them. A lock of its own, never held across a system call.
    releasing: Mutex<usize>,
    released: std::sync::Condvar,
    /// The connection's place among its listener's `max_connections`,
    /// held until the socket closes.
    _admission: Option<AdmissionTicket>,
    /// Woken when an answer could not go out at once (a non-blocking socket
    /// whose peer's queue is full): the async driver's flusher waits for room.
    #[cfg(feature = "tokio")]
    pub(crate) flusher: Option<Arc<tokio::sync::Notify>>,
}

#[derive(Debug)]
pub(crate) struct LinkState {
    pub(crate) session: Session,
    /// Answers taken from the session and encoded, reused buffers; those in
    /// `unsent` are still to go out, in order (on a non-blocking socket,
    /// the ones the peer had no room for yet).
    encoded: Vec<Vec<u8>>,
    /// `Ack` or `Reject`, for each of `encoded`.
    kinds: Vec<&'static str>,
    unsent: std::ops::Range<usize>,
    /// While set, due answers wait in the session: a batch is being served,
    /// and its answers leave together when it is done ([`AnswerHold`]).
    held: bool,
    /// Messages taken through the session so far; a transfer remembers the
    /// count at its delivery, so its answer can tell whether the connection
    /// has judged anything since ([`Link::answer_then_release`]).
    pub(crate) judged: u64,
}

impl LinkState {
    /// Takes up to [`fdpass::MAX_BATCH`] due answers from the session and
    /// encodes them as the next `unsent`.
    fn encode_due(&mut self) -> Result<(), AnswerError> {
        self.unsent = 0..0;
        let mut count = 0;
        while count < fdpass::MAX_BATCH {
            let Some(transmit) = self.session.poll_transmit() else {
                break;
            };
            let answer = transmit.message.kind();
            if self.encoded.len() <= count {
                self.encoded.push(Vec::new());
                self.kinds.push(answer);
            }
            if let (Some(buffer), Some(kind)) =
                (self.encoded.get_mut(count), self.kinds.get_mut(count))
            {
                // Answers the session made are valid: this fails only on a
                // bug, which ends the connection rather than skip an answer.
                if let Err(source) = codec::encode_into(&transmit.message, buffer) {
                    self.session.abort();
                    return Err(AnswerError::Encode { answer, source });
                }
                *kind = answer;
                count += 1;
            }
        }
        self.unsent = 0..count;
        Ok(())
    }

    /// What the unsent answers are, for an error: `Ack`, `Reject`, or both.
    fn unsent_kind(&self) -> &'static str {
        let mut kinds = self
            .kinds
            .get(self.unsent.clone())
            .unwrap_or_default()
            .iter();
        let first = kinds.next().copied().unwrap_or("answer");
        if kinds.all(|kind| *kind == first) {
            first
        } else {
            "Ack or Reject"
        }
    }
}

/// Most queued messages discarded when a connection closes, so the peer
/// reads its last answer rather than `ECONNRESET` (PROTOCOL.md section 2).
const DISCARD_ON_CLOSE: usize = 64;

impl Drop for Link {
    fn drop(&mut self) {
        fdpass::close_after_answer(self.socket.fd(), DISCARD_ON_CLOSE);
        #[cfg(feature = "tokio")]
        if let Some(flusher) = &self.flusher {
            // Lets the flusher see the link is gone, and end.
            flusher.notify_one();
        }
    }
}

impl Link {
    pub(crate) fn new(
        socket: Socket,
        session: Session,
        admission: Option<AdmissionTicket>,
    ) -> Link {
        Link {
            socket,
            releasing: Mutex::new(0),
            released: std::sync::Condvar::new(),
            _admission: admission,
            state: Mutex::new(LinkState {
                session,
                encoded: Vec::new(),
                kinds: Vec::new(),
                unsent: 0..0,
                held: false,
                judged: 0,
            }),
            #[cfg(feature = "tokio")]
            flusher: None,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a release under way until the guard drops.
    fn begin_release(self: &Arc<Self>) -> Releasing {
        *self
            .releasing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        Releasing(Arc::clone(self))
    }

    /// Waits until no release counted by [`Link::begin_release`] is under way.
    pub(crate) fn wait_released(&self) {
        let mut releasing = self
            .releasing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *releasing > 0 {
            releasing = self
                .released
                .wait(releasing)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The application's verdict on a delivered transfer; sends every
    /// answer that is then due.
    pub(crate) fn answer(
        &self,
        ticket: Ticket,
        verdict: Result<(), String>,
        now: Instant,
    ) -> Result<(), AnswerError> {
        let mut state = self.lock();
        state.session.answer(ticket, verdict, now);
        self.flush(&mut state)
    }

    /// Answers a transfer delivered when `judged` messages had been judged,
    /// and drops its `segments`. When the connection has judged nothing
    /// since (always so on the thread that reads it), the answer goes first
    /// and the segments are unmapped before the lock is let go: the sender
    /// does not wait for the unmapping and the pages to be freed, and a
    /// message the connection reads meanwhile is judged (under this lock)
    /// only once they are gone, against budgets that no longer count them:
    /// the blocking reader waits for releases under way before it judges
    /// ([`Link::wait_released`]), without holding the lock, which is never
    /// held across the unmapping. When the connection has read on, the
    /// segments are dropped first, and then it answers.
    pub(crate) fn answer_then_release(
        self: &Arc<Self>,
        ticket: Ticket,
        verdict: Result<(), String>,
        judged: u64,
        segments: Vec<VerifiedSegment>,
        now: Instant,
    ) -> Result<(), AnswerError> {
        let mut state = self.lock();
        if state.judged == judged {
            // Counted while the state is locked, so the reader, which counts
            // its next message under the same lock, waits for it; and before
            // the answer goes, so whoever the answer reaches sees it too.
            let releasing = self.begin_release();
            state.session.answer(ticket, verdict, now);
            let sent = self.flush(&mut state);
            drop(state);
            crate::transfer::release_all(segments, Some(releasing));
            return sent;
        }
        drop(state);
        crate::transfer::release_all(segments, None);
        self.answer(ticket, verdict, now)
    }

    /// Sends every answer that is due, in order, unless answers are held
    /// ([`AnswerHold`]), up to [`fdpass::MAX_BATCH`] per `sendmmsg`. On a
    /// blocking socket each send waits at most the idle timeout. On a
    /// non-blocking one, answers the peer has no room for stay pending, the
    /// flusher is woken, and `Ok` returns: they go out, in order, once there
    /// is room.
    pub(crate) fn flush(&self, state: &mut LinkState) -> Result<(), AnswerError> {
        if state.held {
            return Ok(());
        }
        loop {
            if state.unsent.is_empty() {
                state.encode_due()?;
                if state.unsent.is_empty() {
                    return Ok(());
                }
            }
            let due = state.encoded.get(state.unsent.clone()).unwrap_or_default();
            let sent = match &self.socket {
                Socket::Blocking(fd) => fdpass::send_batch(fd.as_fd(), due).map(|()| due.len()),
                #[cfg(feature = "tokio")]
                Socket::Async(fd) => fdpass::try_send_batch(fd.get_ref().as_fd(), due),
            };
            match sent {
                Ok(sent) => {
                    let all = sent >= due.len();
                    state.unsent.start = (state.unsent.start + sent).min(state.unsent.end);
                    if !all {
                        #[cfg(feature = "tokio")]
                        if let Some(flusher) = &self.flusher {
                            flusher.notify_one();
                        }
                        return Ok(());
                    }
                }
                Err(source) => {
                    let answer = state.unsent_kind();
                    state.unsent = 0..0;
                    state.session.abort();
                    return Err(AnswerError::Send { answer, source });
                }
            }
        }
    }

    /// Whether an answer waits for room in the peer's queue.
    #[cfg(feature = "tokio")]
    pub(crate) fn has_pending(state: &LinkState) -> bool {
        !state.unsent.is_empty()
    }
}

/// Holds a link's answers back while a batch of already-received messages
/// is served, so they leave in one `sendmmsg` and the sender is woken once.
/// Dropping it, on any path (an error, a handler's panic), releases them;
/// [`AnswerHold::release`] does so and reports a failure to send.
#[derive(Debug)]
pub(super) struct AnswerHold {
    link: Arc<Link>,
    released: bool,
}

impl AnswerHold {
    pub(super) fn new(link: &Arc<Link>) -> AnswerHold {
        link.lock().held = true;
        AnswerHold {
            link: Arc::clone(link),
            released: false,
        }
    }

    pub(super) fn release(mut self) -> Result<(), AnswerError> {
        self.released = true;
        self.send_held()
    }

    /// Stops holding and sends what is due.
    fn send_held(&self) -> Result<(), AnswerError> {
        let mut state = self.link.lock();
        state.held = false;
        self.link.flush(&mut state)
    }
}

impl Drop for AnswerHold {
    fn drop(&mut self) {
        if !self.released {
            // The path out is already an error or a panic; a failed send
            // ends the session, and the next call reports that.
            let _ = self.send_held();
        }
    }
}

/// A release under way ([`Link::begin_release`]); its end is counted when
/// this drops, wherever the segments were unmapped.
#[derive(Debug)]
pub(crate) struct Releasing(Arc<Link>);

impl Drop for Releasing {
    fn drop(&mut self) {
        let mut releasing = self
            .0
            .releasing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *releasing = releasing.saturating_sub(1);
        if *releasing == 0 {
            self.0.released.notify_all();
        }
    }
}
