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

use memmap2::Mmap;
use sealpass_proto::fdpass::{self, ControlBuffer, PeerCredentials, TransportError};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::session::{Datagram, Received, Ticket, unknown_fd_facts};
use sealpass_proto::verify::FdFacts;
use sealpass_proto::{Config, EncodeError, MappedBudget, Reject, RejectReason, Session, codec};

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

/// The session and its socket, shared by the connection and the responders
/// of the transfers it delivered. Dropped with the last of them, it closes
/// the socket so that the peer reads every answer first.
#[derive(Debug)]
pub(crate) struct Link {
    socket: OwnedFd,
    state: Mutex<LinkState>,
}

#[derive(Debug)]
struct LinkState {
    session: Session,
    outgoing: Vec<u8>,
}

/// Most queued messages discarded when a connection closes, so the peer
/// reads its last answer rather than `ECONNRESET` (PROTOCOL.md section 2).
const DISCARD_ON_CLOSE: usize = 64;

impl Drop for Link {
    fn drop(&mut self) {
        fdpass::close_after_answer(self.socket.as_fd(), DISCARD_ON_CLOSE);
    }
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// Sends every answer that is due, in order.
    fn flush(&self, state: &mut LinkState) -> Result<(), AnswerError> {
        while let Some(transmit) = state.session.poll_transmit() {
            let answer = transmit.message.kind();
            codec::encode_into(&transmit.message, &mut state.outgoing)
                .map_err(|source| AnswerError::Encode { answer, source })?;
            if let Err(source) = fdpass::send(self.socket.as_fd(), &state.outgoing, &[]) {
                state.session.abort();
                return Err(AnswerError::Send { answer, source });
            }
        }
        Ok(())
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
    link: Arc<Link>,
    config: Arc<Config>,
    peer: Option<PeerCredentials>,
    incoming: Vec<u8>,
    control: Box<ControlBuffer>,
    // Reused from message to message, so serving one allocates only what the
    // transfer it delivers owns.
    spare_fds: Vec<OwnedFd>,
    spare_mappings: Vec<Option<Mmap>>,
    scratch: FdFacts,
    /// The receive timeout set on the socket (`None`: none).
    receive_timeout: Option<Duration>,
}

/// A receive timeout within this of the one wanted is left as it is: it
/// saves a `setsockopt` per message, and a wake-up at most this early or
/// late is corrected by the session's own deadline.
const TIMEOUT_SLACK: Duration = Duration::from_millis(10);

impl Connection {
    /// Serves a connected `SOCK_SEQPACKET` socket under `config` (its own
    /// mapped-bytes budget; no shared one).
    pub fn new(socket: OwnedFd, config: Config) -> Result<Connection, ServeError> {
        let peer = fdpass::peer_credentials(socket.as_fd()).ok();
        Connection::serving(socket, Arc::new(config), None, peer)
    }

    pub(crate) fn serving(
        socket: OwnedFd,
        config: Arc<Config>,
        total: Option<Arc<MappedBudget>>,
        peer: Option<PeerCredentials>,
    ) -> Result<Connection, ServeError> {
        inspect::open_proc_fd_dir();
        // The idle timeout also bounds how long an answer waits for room.
        fdpass::set_timeouts(socket.as_fd(), None, config.idle_timeout())
            .map_err(ServeError::SetTimeout)?;
        let session = Session::new(Arc::clone(&config), total, Instant::now());
        Ok(Connection {
            link: Arc::new(Link {
                socket,
                state: Mutex::new(LinkState {
                    session,
                    outgoing: Vec::new(),
                }),
            }),
            config,
            peer,
            incoming: vec![0; MAX_MESSAGE_LEN],
            control: ControlBuffer::new(),
            spare_fds: Vec::new(),
            spare_mappings: Vec::new(),
            scratch: unknown_fd_facts(),
            receive_timeout: None,
        })
    }

    /// The configuration it is served under.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The peer, as the kernel recorded it at `connect`, where known.
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.peer
    }

    /// Whether more messages may come: false once the peer closed, or after
    /// a reject that ends the connection (unsupported version, timeout).
    pub fn is_open(&self) -> bool {
        self.link.lock().session.wants_to_read()
    }

    /// Bytes this connection's transfers hold mapped right now.
    pub fn mapped(&self) -> u64 {
        self.link.lock().session.mapped()
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
    /// `handler`; then drops its mappings and answers: `Ack` once `handler`
    /// returns `Ok`, `Reject(ApplicationRejected)` with its error otherwise.
    /// A refused message is answered and reported as such.
    pub fn serve_one<E: Display>(
        &mut self,
        handler: impl FnOnce(&IncomingTransfer) -> Result<(), E>,
    ) -> Result<Outcome, ServeError> {
        let transfer = match self.next_event()? {
            Event::Transfer(transfer) => transfer,
            Event::Refused(reject) => {
                return Ok(Outcome::Rejected {
                    id: reject.id,
                    reason: reject.reason,
                    message: reject.message,
                });
            }
            Event::Closed => return Ok(Outcome::Closed),
        };
        let handled = handler(&transfer).map_err(|error| error.to_string());
        let (id, segments, bytes) = (
            transfer.id(),
            transfer.segments().len(),
            transfer.total_bytes(),
        );
        let (mappings, responder) = transfer.into_parts();
        // The Ack promises the receiver holds nothing of the transfer.
        drop(mappings);
        match handled {
            Ok(()) => {
                responder.accept()?;
                Ok(Outcome::Accepted {
                    id,
                    segments,
                    bytes,
                })
            }
            Err(message) => {
                let reject = Reject::new(id, RejectReason::ApplicationRejected, message);
                responder.reject(&reject.message)?;
                Ok(Outcome::Rejected {
                    id,
                    reason: reject.reason,
                    message: reject.message,
                })
            }
        }
    }

    /// What the next message brings, waiting for it: a transfer, a refusal
    /// (already answered), or the end. A peer that stays silent past the
    /// deadline or the idle timeout gets `Reject(Timeout)` and the
    /// connection closes.
    pub fn next_event(&mut self) -> Result<Event, ServeError> {
        loop {
            let deadline = {
                let state = self.link.lock();
                if !state.session.wants_to_read() {
                    return Ok(Event::Closed);
                }
                state.session.poll_timeout()
            };
            let now = Instant::now();
            let wait = match deadline {
                Some(deadline) if deadline <= now => {
                    if let Some(reject) = self.timed_out(now)? {
                        return Ok(Event::Refused(reject));
                    }
                    continue;
                }
                Some(deadline) => Some(deadline - now),
                None => None,
            };
            self.set_receive_timeout(wait)?;
            let received = match fdpass::receive_reusing(
                self.link.socket.as_fd(),
                &mut self.incoming,
                &mut self.control,
                std::mem::take(&mut self.spare_fds),
            ) {
                Ok(received) => received,
                Err(TransportError::TimedOut { .. }) => {
                    if let Some(reject) = self.timed_out(Instant::now())? {
                        return Ok(Event::Refused(reject));
                    }
                    continue;
                }
                Err(error) => {
                    self.link.lock().session.abort();
                    return Err(ServeError::Receive(error));
                }
            };
            return self.judge(received, Instant::now());
        }
    }

    fn timed_out(&mut self, now: Instant) -> Result<Option<Reject>, ServeError> {
        let mut state = self.link.lock();
        let reject = state.session.handle_timeout(now);
        if reject.is_some() {
            self.link.flush(&mut state)?;
        }
        Ok(reject)
    }

    fn set_receive_timeout(&mut self, wanted: Option<Duration>) -> Result<(), ServeError> {
        let close_enough = match (wanted, self.receive_timeout) {
            (None, None) => true,
            (Some(wanted), Some(set)) => wanted.abs_diff(set) <= TIMEOUT_SLACK,
            _ => false,
        };
        if !close_enough {
            fdpass::set_timeouts(self.link.socket.as_fd(), wanted, self.config.idle_timeout())
                .map_err(ServeError::SetTimeout)?;
            self.receive_timeout = wanted;
        }
        Ok(())
    }

    /// Takes one received message through the session: header, each fd's
    /// facts, mapping, delivery. Every fd of a refused message is closed
    /// before its `Reject` goes out.
    fn judge(&mut self, received: fdpass::Received, now: Instant) -> Result<Event, ServeError> {
        let mut fds = received.fds;
        let datagram = Datagram {
            bytes: self.incoming.get(..received.len).unwrap_or_default(),
            fds: fds.len(),
            payload_truncated: received.payload_truncated,
            control_truncated: received.control_truncated,
        };
        let link = Arc::clone(&self.link);
        let mut state = link.lock();
        let unverified = match state.session.handle_datagram(now, &datagram) {
            Received::End => return Ok(Event::Closed),
            Received::Refused(reject) => {
                return self.refused(fds, &mut state, reject);
            }
            Received::Inspect(unverified) => unverified,
        };
        let verified = state
            .session
            .judge(unverified, &mut self.scratch, |index, facts| {
                let fd = fds.get(index).ok_or(nix::errno::Errno::EBADF)?;
                inspect::facts_into(fd.as_fd(), facts)
            });
        let verified = match verified {
            Ok(verified) => verified,
            Err(reject) => return self.refused(fds, &mut state, reject),
        };
        let mut mappings = std::mem::take(&mut self.spare_mappings);
        mappings.clear();
        let mut failed = None;
        for (index, (grant, fd)) in verified.grants().zip(&fds).enumerate() {
            match mapping::map_verified(fd.as_fd(), grant, self.config.populate()) {
                Ok(mapping) => mappings.push(mapping),
                Err(error) => {
                    failed = Some((index, error));
                    break;
                }
            }
        }
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
                VerifiedSegment::new(confirmed, mapping, fd, share)
            })
            .collect();
        self.spare_mappings = mappings;
        self.spare_fds = fds;
        let responder = Responder::new(delivered.ticket, link);
        Ok(Event::Transfer(IncomingTransfer::new(
            delivered.version,
            self.peer,
            segments,
            responder,
        )))
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

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.socket.as_fd()
    }
}
