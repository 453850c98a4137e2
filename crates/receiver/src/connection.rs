//! Serving one connection: the blocking driver of [`sealpass_proto::Session`].
//!
//! The driver moves bytes and fds and asks the kernel; every decision is the
//! session's. It holds the session behind a mutex shared with the
//! responders of the transfers it handed out, so an answer can be given from
//! any thread while this one waits for the next message, and answers still
//! leave in protocol order.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass::{self, ControlBuffer, PeerCredentials, ReceiveBatch, TransportError};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::session::{
    Datagram, Received, Ticket, Unverified, Verified, admit, unknown_fd_facts,
};
use sealpass_proto::verify::FdFacts;
use sealpass_proto::{Config, EncodeError, Reject, RejectReason, Session, codec};

use crate::listener::{Admission, AdmissionTicket, out_of_fds, refuse};
use crate::transfer::{IncomingTransfer, Responder, VerifiedSegment};
use crate::{inspect, mapping};

/// Why serving a connection stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Accepting a connection failed.
    #[error("accepting a connection failed")]
    Accept(#[source] TransportError),
    /// Setting the socket's timeouts failed.
    #[error("setting the socket's timeouts failed")]
    SetTimeout(#[source] TransportError),
    /// Reading from the peer failed.
    #[error("receiving from the peer failed")]
    Receive(#[source] TransportError),
    /// Answering the peer failed.
    #[error(transparent)]
    Answer(#[from] AnswerError),
    /// The configuration does not admit the peer (`NotAllowed`): it was
    /// answered so, and its connection closed.
    #[error("refused the connection: {0}")]
    Refused(Reject),
}

/// An admitted connection's parts, its session begun: what either driver
/// builds its link from.
pub(crate) struct Opened {
    pub(crate) socket: OwnedFd,
    pub(crate) session: Session,
    pub(crate) config: Arc<Config>,
    pub(crate) peer: Option<PeerCredentials>,
    pub(crate) admission: Option<AdmissionTicket>,
}

impl From<Admission> for Opened {
    fn from(admission: Admission) -> Opened {
        // Before the connection serves anything: the name checks read there.
        inspect::open_proc_fd_dir();
        Opened {
            session: Session::new(
                Arc::clone(&admission.config),
                admission.budget,
                Instant::now(),
            ),
            socket: admission.socket,
            config: admission.config,
            peer: Some(admission.peer),
            admission: admission.ticket,
        }
    }
}

/// Admits a connection served on its own ([`Connection::new`]) under
/// `config`'s access rules: a peer they refuse is answered and closed.
pub(crate) fn admit_alone(socket: OwnedFd, config: Config) -> Result<Admission, ServeError> {
    let peer = fdpass::peer_credentials(socket.as_fd()).ok();
    match (admit(&config, peer.as_ref(), 0), peer) {
        (Ok(()), Some(peer)) => Ok(Admission {
            socket,
            peer,
            config: Arc::new(config),
            budget: None,
            ticket: None,
        }),
        (Err(reject), _) => {
            refuse(socket, &reject);
            Err(ServeError::Refused(reject))
        }
        (Ok(()), None) => {
            let reject = out_of_fds();
            refuse(socket, &reject);
            Err(ServeError::Refused(reject))
        }
    }
}

/// Why an answer did not reach the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// Encoding the answer failed.
    #[error("encoding the {answer} failed")]
    Encode {
        /// `Ack` or `Reject`.
        answer: &'static str,
        /// The failure.
        source: EncodeError,
    },
    /// Sending it failed: the peer is gone, or did not make room within the
    /// idle timeout. The connection is over.
    #[error("answering {answer} to the peer failed")]
    Send {
        /// `Ack` or `Reject`.
        answer: &'static str,
        /// The failure.
        source: TransportError,
    },
}

/// What became of one message, for [`Connection::serve_one`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Verified, handled and acknowledged.
    Accepted {
        /// The transfer's id.
        id: u64,
        /// Its segments.
        segments: usize,
        /// Their total size.
        bytes: u64,
    },
    /// Refused; its fds are closed and the peer was told why.
    Rejected {
        /// The transfer's id, or 0 where PROTOCOL.md section 4.1 allows it.
        id: u64,
        /// The reason code.
        reason: RejectReason,
        /// The explanation sent.
        message: String,
    },
    /// The peer closed the connection, or it ended after a closing reject.
    Closed,
}

impl Outcome {
    pub(crate) fn refused(reject: Reject) -> Outcome {
        Outcome::Rejected {
            id: reject.id,
            reason: reject.reason,
            message: reject.message,
        }
    }
}

/// What the next message brought, for [`Connection::next_event`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A verified transfer, for the application to answer.
    Transfer(IncomingTransfer),
    /// A message the receiver refused; its fds are closed and the peer has
    /// its `Reject`.
    Refused(Reject),
    /// Nothing more will be read: the peer closed, or the connection ended
    /// after a closing reject (`UnsupportedVersion`, `Timeout`).
    Closed,
}

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
struct AnswerHold {
    link: Arc<Link>,
    released: bool,
}

impl AnswerHold {
    fn new(link: &Arc<Link>) -> AnswerHold {
        link.lock().held = true;
        AnswerHold {
            link: Arc::clone(link),
            released: false,
        }
    }

    fn release(mut self) -> Result<(), AnswerError> {
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

/// What a driver needs to take messages through the session, whatever it
/// waits with: the link, the buffers it reuses, the kernel-facts scratch.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) link: Arc<Link>,
    pub(crate) config: Arc<Config>,
    pub(crate) peer: Option<PeerCredentials>,
    /// The peer's pidfd (`SO_PEERPIDFD`, Linux 6.5+), shared with the
    /// transfers it delivers.
    pub(crate) peer_pidfd: Option<Arc<OwnedFd>>,
    pub(crate) incoming: Vec<u8>,
    pub(crate) control: Box<ControlBuffer>,
    // Reused from message to message, so serving one allocates only what the
    // transfer it delivers owns.
    pub(crate) spare_fds: Vec<OwnedFd>,
    pub(crate) spare_mappings: Vec<Option<mapping::Mapping>>,
    scratch: FdFacts,
    /// What the kernel said of each fd of the message being judged, asked
    /// before the session's lock is taken; reused from message to message.
    pub(crate) gathered: Gathered,
    /// The messages of the last `recvmmsg` (`serve_batch`), with its
    /// buffers; made by the first batch, or lent per batch by its driver.
    pub(crate) batch: Option<ReceiveBatch>,
    /// Where big mappings are released, off the async runtime's threads.
    #[cfg(feature = "tokio")]
    pub(crate) release: Option<tokio::runtime::Handle>,
}

impl Core {
    /// A core whose receive buffer is its own (`own_buffer`), or lent per
    /// message by its driver.
    pub(crate) fn new(
        link: Arc<Link>,
        config: Arc<Config>,
        peer: Option<PeerCredentials>,
        own_buffer: bool,
    ) -> Core {
        let peer_pidfd = match fdpass::peer_pidfd(link.socket.fd()) {
            Ok(pidfd) => pidfd.map(Arc::new),
            Err(error) => {
                // Out of fds, or the peer is gone already: the credentials
                // still stand, and the connection is served without it.
                tracing::debug!("no pidfd for the peer: {error}");
                None
            }
        };
        Core {
            link,
            config,
            peer,
            peer_pidfd,
            incoming: if own_buffer {
                vec![0; MAX_MESSAGE_LEN]
            } else {
                Vec::new()
            },
            control: ControlBuffer::new(),
            spare_fds: Vec::new(),
            spare_mappings: Vec::new(),
            scratch: unknown_fd_facts(),
            gathered: Vec::new(),
            batch: None,
            #[cfg(feature = "tokio")]
            release: None,
        }
    }

    /// Whether more messages may come.
    pub(crate) fn is_open(&self) -> bool {
        self.link.lock().session.wants_to_read()
    }

    /// Bytes the connection's transfers hold mapped.
    /// Bytes mapped now; on a blocking socket, once the releases under way
    /// of transfers already answered are done, as a message judged now
    /// would count them.
    pub(crate) fn mapped(&self) -> u64 {
        if matches!(self.link.socket, Socket::Blocking(_)) {
            self.link.wait_released();
        }
        self.link.lock().session.mapped()
    }

    /// The deadline to wait to (`Some(None)`: none), or `None` when nothing
    /// more is to be read.
    pub(crate) fn deadline(&self) -> Option<Option<Instant>> {
        let state = self.link.lock();
        state
            .session
            .wants_to_read()
            .then(|| state.session.poll_timeout())
    }

    /// The deadline passed: the session may answer `Timeout` and close.
    pub(crate) fn timed_out(&mut self, now: Instant) -> Result<Option<Reject>, ServeError> {
        let mut state = self.link.lock();
        let reject = state.session.handle_timeout(now);
        if reject.is_some() {
            self.link.flush(&mut state)?;
        }
        Ok(reject)
    }

    /// Reading failed: the connection is over.
    pub(crate) fn receive_failed(&self, error: TransportError) -> ServeError {
        self.link.lock().session.abort();
        ServeError::Receive(error)
    }

    /// Takes one received message through the session: header, each fd's
    /// facts, mapping, delivery. Every fd of a refused message is closed
    /// before its `Reject` goes out.
    pub(crate) fn judge(
        &mut self,
        received: fdpass::Received,
        now: Instant,
    ) -> Result<Event, ServeError> {
        let incoming = std::mem::take(&mut self.incoming);
        let bytes = incoming.get(..received.len).unwrap_or_default();
        let event = self.judge_bytes(received, bytes, now);
        self.incoming = incoming;
        event
    }

    /// [`Core::judge`], of a message whose payload is `bytes`: the three
    /// phases one after the other, with the system calls between them made
    /// on this thread.
    pub(crate) fn judge_bytes(
        &mut self,
        received: fdpass::Received,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Event, ServeError> {
        let inspecting = match self.judge_header(received, bytes, now) {
            Judging::Done(event) => return event,
            Judging::Inspect(inspecting) => inspecting,
        };
        gather_facts(&inspecting.fds, &mut self.gathered);
        let mapping = match self.judge_facts(inspecting) {
            Ok(mapping) => mapping,
            Err(event) => return event,
        };
        let mut mappings = std::mem::take(&mut self.spare_mappings);
        let failed = map_all(&mapping, self.config.populate(), &mut mappings);
        self.judge_mapped(mapping, mappings, failed)
    }

    /// The first phase of judging a message: its header, through the
    /// session. The link's lock is taken for each phase, briefly, and never
    /// across a system call: the answers other threads give, and the async
    /// flusher, wait on it. Between the phases the kernel is asked about
    /// every fd ([`gather_facts`]) and the verified ones are mapped
    /// ([`map_all`]), on this thread or (async) off the runtime's.
    pub(crate) fn judge_header(
        &mut self,
        received: fdpass::Received,
        bytes: &[u8],
        now: Instant,
    ) -> Judging {
        let fds = received.fds;
        let datagram = Datagram {
            bytes,
            fds: fds.len(),
            payload_truncated: received.payload_truncated,
            control_truncated: received.control_truncated,
        };
        let link = Arc::clone(&self.link);
        let mut state = link.lock();
        state.judged += 1;
        let judged = state.judged;
        let unverified = match state.session.handle_datagram(now, &datagram) {
            Received::End => return Judging::Done(Ok(Event::Closed)),
            Received::Refused(reject) => {
                return Judging::Done(self.refused(fds, &mut state, reject));
            }
            Received::Inspect(unverified) => unverified,
        };
        drop(state);
        // A transfer answered before this message was counted may still be
        // unmapping: this message is judged against budgets without it. (On
        // tokio, big ones are released on the blocking pool and stay
        // counted until that is done: the runtime never waits here.)
        if matches!(link.socket, Socket::Blocking(_)) {
            link.wait_released();
        }
        Judging::Inspect(Inspecting {
            fds,
            unverified,
            judged,
        })
    }

    /// The second phase: the session judges the facts gathered into
    /// `self.gathered`. A refusal is answered here.
    pub(crate) fn judge_facts(
        &mut self,
        inspecting: Inspecting,
    ) -> Result<Mapping, Result<Event, ServeError>> {
        let Inspecting {
            fds,
            unverified,
            judged,
        } = inspecting;
        let gathered = &mut self.gathered;
        let link = Arc::clone(&self.link);
        let mut state = link.lock();
        let verified = state
            .session
            .judge(unverified, &mut self.scratch, |index, facts| {
                let (known, inspected) = gathered.get_mut(index).ok_or(nix::errno::Errno::EBADF)?;
                // Swapped, not cloned: no allocation for the link's bytes;
                // the next message's facts overwrite what is left here.
                std::mem::swap(facts, known);
                *inspected
            });
        match verified {
            Ok(verified) => Ok(Mapping {
                fds,
                verified,
                judged,
            }),
            Err(reject) => Err(self.refused(fds, &mut state, reject)),
        }
    }

    /// The last phase: the mapped transfer goes to the application, or the
    /// mapping that failed refuses it.
    pub(crate) fn judge_mapped(
        &mut self,
        mapping: Mapping,
        mut mappings: Vec<Option<mapping::Mapping>>,
        failed: Option<(usize, std::io::Error)>,
    ) -> Result<Event, ServeError> {
        let Mapping {
            mut fds,
            verified,
            judged,
        } = mapping;
        let link = Arc::clone(&self.link);
        let mut state = link.lock();
        if let Some((index, error)) = failed {
            mappings.clear();
            self.spare_mappings = mappings;
            let reject = state.session.map_failed(verified, index, &error);
            return self.refused(fds, &mut state, reject);
        }
        let delivered = state.session.deliver(verified);
        drop(state);
        let mut reservation = delivered.reservation;
        let segments = delivered
            .segments
            .into_iter()
            .zip(mappings.drain(..))
            .zip(fds.drain(..))
            .map(|((confirmed, mapping), fd)| {
                let share = reservation.split_off(confirmed.size);
                let segment = VerifiedSegment::new(confirmed, mapping, fd, share);
                #[cfg(feature = "tokio")]
                let segment = segment.released_on(self.release.as_ref());
                segment
            })
            .collect();
        self.spare_mappings = mappings;
        self.spare_fds = fds;
        let responder = Responder::new(delivered.ticket, link, judged);
        Ok(Event::Transfer(IncomingTransfer::new(
            delivered.version,
            self.peer,
            self.peer_pidfd.clone(),
            segments,
            responder,
        )))
    }

    /// Judges the next untaken message of the batch, if there is one. Once
    /// the connection stopped reading (the end, or an answer that closes
    /// it), the rest are discarded and their fds closed, as messages still
    /// queued are when the socket closes.
    pub(crate) fn judge_next_in_batch(&mut self) -> Option<Result<Event, ServeError>> {
        let mut batch = self.batch.take()?;
        let event = loop {
            let Some((received, bytes)) = batch.take_next() else {
                break None;
            };
            if !self.is_open() {
                batch.recycle(received.fds);
                continue;
            }
            let event = self.judge_bytes(received, bytes, Instant::now());
            batch.recycle(std::mem::take(&mut self.spare_fds));
            break Some(event);
        };
        self.batch = Some(batch);
        event
    }

    /// Whether a batch holds messages not yet judged.
    pub(crate) fn has_untaken(&self) -> bool {
        self.batch.as_ref().is_some_and(|batch| batch.untaken() > 0)
    }

    /// Takes every message of the batch through the session in order,
    /// `handler` deciding each valid transfer, with the answers held until
    /// the last and then sent together; appends the outcomes.
    pub(crate) fn serve_received<E: Display>(
        &mut self,
        mut handler: impl FnMut(&IncomingTransfer) -> Result<(), E>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<usize, ServeError> {
        let hold = AnswerHold::new(&self.link);
        let before = outcomes.len();
        // The last transfer's mappings, dropped before the next message is
        // judged (so it is judged against a budget that no longer counts
        // them) or, for the batch's last, after the answers went out: as
        // with `serve_one`, unmapping is not on the sender's path.
        let mut handled_last: Vec<VerifiedSegment> = Vec::new();
        while self.has_untaken() {
            handled_last.clear();
            let Some(event) = self.judge_next_in_batch() else {
                break;
            };
            outcomes.push(match event? {
                Event::Transfer(transfer) => {
                    let handled = handler(&transfer);
                    let (outcome, mappings) = answer_keeping_mappings(transfer, handled);
                    handled_last = mappings;
                    outcome?
                }
                Event::Refused(reject) => Outcome::refused(reject),
                Event::Closed => Outcome::Closed,
            });
        }
        hold.release()?;
        drop(handled_last);
        Ok(outcomes.len() - before)
    }

    /// Closes the fds of a refused message, then sends what is due.
    fn refused(
        &mut self,
        mut fds: Vec<OwnedFd>,
        state: &mut LinkState,
        reject: Reject,
    ) -> Result<Event, ServeError> {
        fds.clear();
        self.spare_fds = fds;
        self.link.flush(state)?;
        Ok(Event::Refused(reject))
    }
}

/// Answers a transfer by `handled`, as [`Connection::serve_one`] does, then
/// drops its mappings. The answer goes first: an `Ack` promises nothing
/// about the mappings (PROTOCOL.md section 6), and unmapping big segments
/// takes milliseconds the sender need not wait for. The connection reads
/// its next message only after they are gone, so that message is judged
/// against a budget that no longer counts them.
pub(crate) fn answer_by<E: Display>(
    transfer: IncomingTransfer,
    handled: Result<(), E>,
) -> Result<Outcome, ServeError> {
    let (outcome, mappings) = answer_keeping_mappings(transfer, handled);
    drop(mappings);
    outcome
}

/// [`answer_by`], handing back the transfer's mappings for the caller to
/// drop when it is time.
fn answer_keeping_mappings<E: Display>(
    transfer: IncomingTransfer,
    handled: Result<(), E>,
) -> (Result<Outcome, ServeError>, Vec<VerifiedSegment>) {
    let (id, segments, bytes) = (
        transfer.id(),
        transfer.segments().len(),
        transfer.total_bytes(),
    );
    let (mappings, responder) = transfer.into_parts();
    (answer(id, segments, bytes, responder, handled), mappings)
}

fn answer<E: Display>(
    id: u64,
    segments: usize,
    bytes: u64,
    responder: Responder,
    handled: Result<(), E>,
) -> Result<Outcome, ServeError> {
    match handled {
        Ok(()) => {
            responder.accept()?;
            Ok(Outcome::Accepted {
                id,
                segments,
                bytes,
            })
        }
        Err(error) => {
            let reject = Reject::new(id, RejectReason::ApplicationRejected, error.to_string());
            responder.reject(&reject.message)?;
            Ok(Outcome::Rejected {
                id,
                reason: reject.reason,
                message: reject.message,
            })
        }
    }
}

/// What the kernel said of each fd of a message, in order.
pub(crate) type Gathered = Vec<(FdFacts, Result<(), nix::errno::Errno>)>;

/// A message whose header the session took, its fds still to be asked
/// about ([`gather_facts`]).
#[derive(Debug)]
pub(crate) struct Inspecting {
    pub(crate) fds: Vec<OwnedFd>,
    unverified: Unverified,
    judged: u64,
}

/// A message whose fds the session verified, still to be mapped
/// ([`map_all`]).
#[derive(Debug)]
pub(crate) struct Mapping {
    fds: Vec<OwnedFd>,
    verified: Verified,
    judged: u64,
}

/// Where judging a message stands after its header.
#[derive(Debug)]
pub(crate) enum Judging {
    /// Decided already: refused, or the end.
    Done(Result<Event, ServeError>),
    /// Its fds are to be asked about.
    Inspect(Inspecting),
}

/// Asks the kernel about each of `fds`, in order, into `gathered`.
pub(crate) fn gather_facts(fds: &[OwnedFd], gathered: &mut Gathered) {
    gathered.resize_with(fds.len(), || (unknown_fd_facts(), Ok(())));
    for (fd, (facts, inspected)) in fds.iter().zip(gathered.iter_mut()) {
        *inspected = inspect::facts_into(fd.as_fd(), facts);
    }
}

/// Maps every verified segment of `mapping` into `mappings` (emptied
/// first), stopping at the first that fails: its index and error.
pub(crate) fn map_all(
    mapping: &Mapping,
    populate: bool,
    mappings: &mut Vec<Option<mapping::Mapping>>,
) -> Option<(usize, std::io::Error)> {
    mappings.clear();
    for (index, (grant, fd)) in mapping.verified.grants().zip(&mapping.fds).enumerate() {
        match mapping::map_verified(fd.as_fd(), grant, populate) {
            Ok(mapped) => mappings.push(mapped),
            Err(error) => return Some((index, error)),
        }
    }
    None
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

/// One peer's connection, served message by message on the calling thread.
///
/// [`Connection::receive`] returns owned transfers; [`Connection::serve_one`]
/// runs a handler on one and answers for it. Dropping the connection closes
/// the socket once every transfer it handed out has been answered: writing
/// stops first, then messages already queued are discarded, so the peer
/// reads every answer it was sent and then the end of the connection.
#[derive(Debug)]
pub struct Connection {
    core: Core,
    /// The receive timeout set on the socket (`None`: none).
    receive_timeout: Option<Duration>,
}

/// A receive timeout within this of the one wanted is left as it is: it
/// saves a `setsockopt` per message, and a wake-up at most this early or
/// late is corrected by the session's own deadline.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);

impl Connection {
    /// Serves a connected `SOCK_SEQPACKET` socket under `config`, with a
    /// mapped-bytes budget of its own (`max_mapped_total` and
    /// `max_mapped_per_connection` both bound it). A peer that `config`'s
    /// access rules do not admit is answered `NotAllowed` and closed:
    /// [`ServeError::Refused`].
    pub fn new(socket: OwnedFd, config: Config) -> Result<Connection, ServeError> {
        Connection::admitted(admit_alone(socket, config)?)
    }

    /// Serves a connection admitted by its listener or on its own.
    pub(crate) fn admitted(admission: Admission) -> Result<Connection, ServeError> {
        let opened = Opened::from(admission);
        // The idle timeout also bounds how long an answer waits for room.
        fdpass::set_timeouts(opened.socket.as_fd(), None, opened.config.idle_timeout())
            .map_err(ServeError::SetTimeout)?;
        let socket = Socket::Blocking(opened.socket);
        let link = Arc::new(Link::new(socket, opened.session, opened.admission));
        Ok(Connection {
            core: Core::new(link, opened.config, opened.peer, true),
            receive_timeout: None,
        })
    }

    /// The configuration it is served under.
    pub fn config(&self) -> &Config {
        &self.core.config
    }

    /// The peer, as the kernel recorded it at `connect`, where known.
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.core.peer
    }

    /// A pidfd for the peer (`SO_PEERPIDFD`, Linux 6.5+; `None` before, or
    /// when it could not be had): see [`IncomingTransfer::peer_pidfd`].
    pub fn peer_pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.core.peer_pidfd.as_deref().map(AsFd::as_fd)
    }

    /// Whether more messages may come: false once the peer closed, or after
    /// a reject that ends the connection (unsupported version, timeout).
    pub fn is_open(&self) -> bool {
        self.core.is_open()
    }

    /// Bytes this connection's transfers hold mapped right now.
    pub fn mapped(&self) -> u64 {
        self.core.mapped()
    }

    /// The next verified transfer, waiting for it; messages refused on the
    /// way are answered and skipped. `None` once nothing more will come.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let socket = dir.path().join("doc.sock");
    /// # let listener = sealpass_receiver::Listener::bind(&socket)?;
    /// # let sender = std::thread::spawn(move || sealpass_sender::send_bytes(&socket, "frame", b"hello"));
    /// # let mut connection = listener.accept()?;
    /// while let Some(transfer) = connection.receive()? {
    ///     let first = transfer.segments().first().map(|s| s.bytes().len());
    ///     println!("transfer {}: first segment {first:?} bytes", transfer.id());
    ///     transfer.accept()?;
    /// }
    /// # assert!(sender.join().expect("sender")?.is_accepted());
    /// # Ok(())
    /// # }
    /// ```
    pub fn receive(&mut self) -> Result<Option<IncomingTransfer>, ServeError> {
        loop {
            match self.next_event()? {
                Event::Transfer(transfer) => return Ok(Some(transfer)),
                Event::Refused(_) => {}
                Event::Closed => return Ok(None),
            }
        }
    }

    /// Receives one message, verifies it and hands a valid transfer to
    /// `handler`; then answers and drops its mappings: `Ack` once `handler`
    /// returns `Ok`, `Reject(ApplicationRejected)` with its error otherwise.
    /// The mappings are gone when it returns.
    /// A refused message is answered and reported as such.
    pub fn serve_one<E: Display>(
        &mut self,
        handler: impl FnOnce(&IncomingTransfer) -> Result<(), E>,
    ) -> Result<Outcome, ServeError> {
        let transfer = match self.next_event()? {
            Event::Transfer(transfer) => transfer,
            Event::Refused(reject) => return Ok(Outcome::refused(reject)),
            Event::Closed => return Ok(Outcome::Closed),
        };
        let handled = handler(&transfer);
        answer_by(transfer, handled)
    }

    /// What the next message brings, waiting for it: a transfer, a refusal
    /// (already answered), or the end. A peer that stays silent past the
    /// deadline or the idle timeout gets `Reject(Timeout)` and the
    /// connection closes.
    pub fn next_event(&mut self) -> Result<Event, ServeError> {
        loop {
            if let Some(event) = self.next_event_within(None)? {
                return Ok(event);
            }
        }
    }

    /// [`Connection::next_event`], waiting at most `limit`: `Ok(None)` when
    /// no message came within it. The connection's own deadlines still
    /// apply. A caller that must stay responsive (to a signal, a stop flag)
    /// waits in slices. (An interrupted wait restarts, so a signal is noticed
    /// within two slices.)
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let socket = dir.path().join("doc.sock");
    /// # let listener = sealpass_receiver::Listener::bind(&socket)?;
    /// # let sender = std::thread::spawn(move || sealpass_sender::send_bytes(&socket, "frame", b"hello"));
    /// # let mut connection = listener.accept()?;
    /// use std::time::Duration;
    /// use sealpass_receiver::Event;
    ///
    /// let stop = std::sync::atomic::AtomicBool::new(false);
    /// let event = loop {
    ///     if stop.load(std::sync::atomic::Ordering::Relaxed) {
    ///         return Ok(());
    ///     }
    ///     if let Some(event) = connection.next_event_within(Duration::from_millis(100))? {
    ///         break event;
    ///     }
    /// };
    /// let Event::Transfer(transfer) = event else { panic!("expected a transfer") };
    /// transfer.accept()?;
    /// # assert!(sender.join().expect("sender")?.is_accepted());
    /// # Ok(())
    /// # }
    /// ```
    pub fn next_event_within(
        &mut self,
        limit: impl Into<Option<Duration>>,
    ) -> Result<Option<Event>, ServeError> {
        // Messages a panicking `serve_batch` handler left come first.
        if let Some(event) = self.core.judge_next_in_batch() {
            return event.map(Some);
        }
        let received = self.wait_for(limit.into(), |connection| {
            let core = &mut connection.core;
            fdpass::receive_reusing(
                core.link.socket.fd(),
                &mut core.incoming,
                &mut core.control,
                std::mem::take(&mut core.spare_fds),
            )
        })?;
        match received {
            None => Ok(None),
            Some(Err(event)) => Ok(Some(event)),
            Some(Ok(received)) => self.core.judge(received, Instant::now()).map(Some),
        }
    }

    /// Serves every message already queued, up to a batch, as
    /// [`Connection::serve_one`] serves one, and answers them together.
    ///
    /// It waits for the first message as `serve_one` does, then takes those
    /// already queued behind it in the same `recvmmsg` (up to
    /// [`fdpass::MAX_BATCH`], fewer where `RLIMIT_NOFILE` is low: see
    /// [`fdpass::batch_slots`]; after batches of one message, a few receives
    /// ask for one only: see [`fdpass::NARROW_AFTER_SINGLES`]). Each is judged on its own, in order, and a
    /// valid one is handed to `handler` and its mappings dropped before the
    /// next is judged, so each is judged against a budget that no longer
    /// counts the last (the batch's last transfer is unmapped after the
    /// answers are sent, off the sender's path). The answers wait until the
    /// batch is done and then leave in order in one `sendmmsg`, waking the
    /// sender once rather than once per message; every answer is sent
    /// before it returns, so none waits on a later call. A handler that
    /// takes long delays the answers of the messages before it in the
    /// batch: such an application serves one at a time.
    ///
    /// Appends each message's outcome to `outcomes`, in order
    /// ([`Outcome::Closed`] at the end), and returns how many it appended: a
    /// caller that clears and reuses one list allocates nothing per batch.
    /// An error sending the answers ends the connection, and is returned
    /// instead; outcomes appended before it stand for messages whose answers
    /// may not have reached the peer.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let socket = dir.path().join("doc.sock");
    /// # let listener = sealpass_receiver::Listener::bind(&socket)?;
    /// # let sender = std::thread::spawn(move || sealpass_sender::send_bytes(&socket, "frame", b"hello"));
    /// # let mut connection = listener.accept()?;
    /// use sealpass_receiver::Outcome;
    ///
    /// let mut outcomes = Vec::new();
    /// let mut accepted = 0;
    /// while connection.is_open() {
    ///     outcomes.clear();
    ///     connection.serve_batch(
    ///         |transfer| {
    ///             let bytes: usize = transfer.segments().iter().map(|s| s.bytes().len()).sum();
    ///             if bytes == 0 { Err("empty") } else { Ok(()) }
    ///         },
    ///         &mut outcomes,
    ///     )?;
    ///     accepted += outcomes.iter().filter(|o| matches!(o, Outcome::Accepted { .. })).count();
    /// }
    /// assert_eq!(accepted, 1);
    /// # assert!(sender.join().expect("sender")?.is_accepted());
    /// # Ok(())
    /// # }
    /// ```
    pub fn serve_batch<E: Display>(
        &mut self,
        handler: impl FnMut(&IncomingTransfer) -> Result<(), E>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<usize, ServeError> {
        // A handler that panicked part-way through the last batch left the
        // rest of it: that is served before anything more is read.
        if !self.core.has_untaken() {
            match self.wait_for(None, |connection| {
                let core = &mut connection.core;
                let batch = core.batch.get_or_insert_with(|| {
                    ReceiveBatch::new(fdpass::batch_slots(), MAX_MESSAGE_LEN)
                });
                fdpass::receive_batch(core.link.socket.fd(), batch)
            })? {
                Some(Ok(_)) => {}
                Some(Err(Event::Refused(reject))) => {
                    outcomes.push(Outcome::refused(reject));
                    return Ok(1);
                }
                Some(Err(_)) | None => {
                    outcomes.push(Outcome::Closed);
                    return Ok(1);
                }
            }
        }
        self.core.serve_received(handler, outcomes)
    }

    /// Waits under the connection's deadlines, and at most `limit`, for
    /// `receive` to bring something: `Some(Ok(_))` what it brought;
    /// `Some(Err(_))` a deadline's refusal, or the end; `None` once `limit`
    /// passed.
    fn wait_for<R>(
        &mut self,
        limit: Option<Duration>,
        mut receive: impl FnMut(&mut Connection) -> Result<R, TransportError>,
    ) -> Result<Option<Result<R, Event>>, ServeError> {
        let started = Instant::now();
        loop {
            let Some(deadline) = self.core.deadline() else {
                return Ok(Some(Err(Event::Closed)));
            };
            let now = Instant::now();
            let wait = match deadline {
                Some(deadline) if deadline <= now => {
                    if let Some(reject) = self.core.timed_out(now)? {
                        return Ok(Some(Err(Event::Refused(reject))));
                    }
                    continue;
                }
                Some(deadline) => Some(deadline - now),
                None => None,
            };
            // What is left of the caller's limit, if that comes first.
            let left = limit.map(|limit| limit.saturating_sub(now - started));
            if left == Some(Duration::ZERO) {
                return Ok(None);
            }
            let wait = match (wait, left) {
                (Some(wait), Some(left)) => Some(wait.min(left)),
                (wait, left) => wait.or(left),
            };
            self.set_receive_timeout(wait)?;
            match receive(self) {
                Ok(received) => return Ok(Some(Ok(received))),
                Err(TransportError::TimedOut { .. }) => {
                    if let Some(reject) = self.core.timed_out(Instant::now())? {
                        return Ok(Some(Err(Event::Refused(reject))));
                    }
                }
                Err(error) => return Err(self.core.receive_failed(error)),
            }
        }
    }

    fn set_receive_timeout(&mut self, wanted: Option<Duration>) -> Result<(), ServeError> {
        let close_enough = match (wanted, self.receive_timeout) {
            (None, None) => true,
            (Some(wanted), Some(set)) => wanted.abs_diff(set) <= TIMEOUT_SLACK,
            _ => false,
        };
        if !close_enough {
            fdpass::set_timeouts(
                self.core.link.socket.fd(),
                wanted,
                self.core.config.idle_timeout(),
            )
            .map_err(ServeError::SetTimeout)?;
            self.receive_timeout = wanted;
        }
        Ok(())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.core.link.socket.fd()
    }
}
