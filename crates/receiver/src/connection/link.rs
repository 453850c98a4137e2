//! The link a connection's session lives behind, shared with the
//! responders of its transfers: the socket, the answers leaving in order
//! (held for a batch, sent in one `sendmmsg`), and releases under way.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use sealpass_kernel::fdpass::{self};
use sealpass_proto::Session;
use sealpass_proto::session::Ticket;

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
    session: Mutex<Session>,
    /// Transfers answered before their segments are released, whose release
    /// is under way: the blocking reader waits for them before it judges
    /// the next message, so that message meets budgets that no longer count
    /// them. A lock of its own, never held across a system call.
    releasing: Mutex<Releases>,
    released: std::sync::Condvar,
    /// The connection's place among its listener's `max_connections`,
    /// held until the socket closes.
    _admission: Option<AdmissionTicket>,
    /// Woken when an answer could not go out at once (a non-blocking socket
    /// whose peer's queue is full): the async driver's flusher waits for room.
    #[cfg(feature = "tokio")]
    pub(crate) flusher: Option<Arc<tokio::sync::Notify>>,
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
            releasing: Mutex::new(Releases::default()),
            released: std::sync::Condvar::new(),
            _admission: admission,
            session: Mutex::new(session),
            #[cfg(feature = "tokio")]
            flusher: None,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a release under way until the guard drops.
    fn begin_release(self: &Arc<Self>) -> Releasing {
        self.releasing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .under_way += 1;
        Releasing(Arc::clone(self))
    }

    /// Waits until no release counted by [`Link::begin_release`] is under way.
    pub(crate) fn wait_released(&self) {
        let mut releasing = self
            .releasing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while releasing.under_way > 0 {
            releasing.waiting += 1;
            releasing = self
                .released
                .wait(releasing)
                .unwrap_or_else(PoisonError::into_inner);
            releasing.waiting -= 1;
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
        let mut session = self.lock();
        session.answer(ticket, verdict, now);
        self.flush(&mut session)
    }

    /// Answers a transfer and drops its `segments`. When the connection has
    /// read nothing since its delivery ([`Session::read_since`]; always so
    /// on the thread that reads it), the answer goes first and the segments
    /// are unmapped after: the sender does not wait for the unmapping and
    /// the pages to be freed, and a message the connection reads meanwhile
    /// is judged only once they are gone, against budgets that no longer
    /// count them: the blocking reader waits for releases under way before
    /// it judges ([`Link::wait_released`]), without holding the lock, which
    /// is never held across the unmapping. When the connection has read on,
    /// the segments are dropped first, and then it answers.
    pub(crate) fn answer_then_release(
        self: &Arc<Self>,
        ticket: Ticket,
        verdict: Result<(), String>,
        segments: Vec<VerifiedSegment>,
        now: Instant,
    ) -> Result<(), AnswerError> {
        let mut session = self.lock();
        if !session.read_since(&ticket) {
            // Counted while the session is locked, so the reader, which
            // counts its next message under the same lock, waits for it; and
            // before the answer goes, so whoever the answer reaches sees it too.
            let releasing = self.begin_release();
            session.answer(ticket, verdict, now);
            let sent = self.flush(&mut session);
            drop(session);
            crate::transfer::release_all(segments, Some(releasing));
            return sent;
        }
        drop(session);
        crate::transfer::release_all(segments, None);
        self.answer(ticket, verdict, now)
    }

    /// Sends every answer the session has due, in the runs it gives
    /// ([`Session::poll_send`]). On a blocking socket each send waits at
    /// most the idle timeout. On a non-blocking one, answers the peer has
    /// no room for stay in the session, the flusher is woken, and `Ok`
    /// returns: they go out, in order, once there is room.
    pub(crate) fn flush(&self, session: &mut Session) -> Result<(), AnswerError> {
        #[cfg(feature = "tokio")]
        if session.answers_held() {
            // An async connection's held answers go once its task yields:
            // the flusher runs then. (The blocking `Service` releases its
            // hold itself when the batch is done.)
            if let Some(flusher) = &self.flusher {
                flusher.notify_one();
            }
        }
        loop {
            let due = session.poll_send()?;
            if due.is_empty() {
                return Ok(());
            }
            let sent = match &self.socket {
                Socket::Blocking(fd) => fdpass::send_batch(fd.as_fd(), due).map(|()| due.len()),
                #[cfg(feature = "tokio")]
                Socket::Async(fd) => fdpass::try_send_batch(fd.get_ref().as_fd(), due),
            };
            match sent {
                Ok(count) => {
                    if !session.sent(count) {
                        #[cfg(feature = "tokio")]
                        if let Some(flusher) = &self.flusher {
                            flusher.notify_one();
                        }
                        return Ok(());
                    }
                }
                Err(source) => {
                    let answer = session.send_failed();
                    return Err(AnswerError::Send { answer, source });
                }
            }
        }
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
        link.lock().hold_answers();
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
        let mut session = self.link.lock();
        session.release_answers();
        self.link.flush(&mut session)
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

/// Releases under way, and readers waiting for them to end.
#[derive(Debug, Default)]
struct Releases {
    under_way: usize,
    waiting: usize,
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
        releasing.under_way = releasing.under_way.saturating_sub(1);
        // Only a waiter is woken: a wake-up is a system call, and on the
        // reading thread (where most answers are given) nobody waits.
        if releasing.under_way == 0 && releasing.waiting > 0 {
            self.0.released.notify_all();
        }
    }
}
