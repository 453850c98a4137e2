//! Serving one connection: the blocking driver of [`sealpass_proto::Session`].
//!
//! The driver moves bytes and fds and asks the kernel; every decision is the
//! session's. It holds the session behind a mutex shared with the
//! responders of the transfers it handed out, so an answer can be given from
//! any thread while this one waits for the next message, and answers still
//! leave in protocol order.
#![forbid(unsafe_code)]

#[cfg(all(test, feature = "conformance"))]
#[path = "batch_tests.rs"]
mod batch_tests;
mod core;
mod link;

use std::fmt::Display;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass::{self, PeerCredentials, ReceiveBatch, TransportError};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::session::UnencodableAnswer;
use sealpass_proto::{Config, Reject, RejectReason};

use crate::listener::Admission;
use crate::transfer::IncomingTransfer;

pub(crate) use self::core::{Core, Opened, admit_alone};
// The async driver's off-runtime judging.
#[cfg(feature = "tokio")]
pub(crate) use self::core::{Gathered, Inspecting, Judging, Mapping, gather_facts, map_all};
pub(crate) use self::link::{Link, Releasing, Socket};

/// The accessors both drivers' `Connection`s have, over their `Core`.
macro_rules! connection_accessors {
    () => {
        /// The configuration it is served under.
        pub fn config(&self) -> &Config {
            &self.core.config
        }

        /// The peer, as the kernel recorded it at `connect` (`SO_PEERCRED`).
        pub fn peer(&self) -> PeerCredentials {
            self.core.peer
        }

        /// A pidfd for the peer (`SO_PEERPIDFD`, Linux 6.5+; `None` before,
        /// or when it could not be had): see
        /// [`IncomingTransfer::peer_pidfd`](crate::IncomingTransfer::peer_pidfd).
        pub fn peer_pidfd(&self) -> Option<BorrowedFd<'_>> {
            self.core.peer_pidfd.as_deref().map(AsFd::as_fd)
        }

        /// Whether more messages may come: false once the peer closed, or
        /// after a reject that ends the connection (unsupported version,
        /// timeout).
        pub fn is_open(&self) -> bool {
            self.core.is_open()
        }

        /// Bytes this connection's transfers hold mapped right now.
        pub fn mapped(&self) -> u64 {
            self.core.mapped()
        }

        /// Messages refused on this connection so far, each answered with
        /// its reason: what `receive`, which skips them, does not show.
        pub fn refused(&self) -> u64 {
            self.core.refused
        }
    };
}
#[cfg(feature = "tokio")]
pub(crate) use connection_accessors;

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
    /// [`Connection::receive_within`]: no transfer came within the limit.
    /// The connection is as it was; call again.
    #[error("no transfer came within {0:?}")]
    NothingWithin(Duration),
}

/// Why an answer did not reach the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// Encoding the answer failed (a bug; the connection is over).
    #[error(transparent)]
    Encode(#[from] UnencodableAnswer),
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

/// What became of one message a batch served (the [`crate::Service`]'s way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
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

/// What the next message brought.
#[derive(Debug)]
pub(crate) enum Event {
    /// A verified transfer, for the application to answer.
    Transfer(IncomingTransfer),
    /// A message the receiver refused; its fds are closed and the peer has
    /// its `Reject`.
    Refused(Reject),
    /// Nothing more will be read: the peer closed, or the connection ended
    /// after a closing reject (`UnsupportedVersion`, `Timeout`).
    Closed,
}

/// One peer's connection, served message by message on the calling thread.
///
/// [`Connection::receive`] returns owned transfers, each answered when the
/// application says ([`IncomingTransfer::accept`], `reject`, or dropping it);
/// [`crate::Service::run`] is the way to serve many peers with a handler.
/// Dropping the connection closes
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
            core: Core::new(link, opened.config, opened.peer),
            receive_timeout: None,
        })
    }

    connection_accessors!();

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

    /// [`Connection::receive`], waiting at most `limit`:
    /// [`ServeError::NothingWithin`] when no transfer came within it, and
    /// the connection is as it was. Its own deadlines still apply. A caller
    /// that must stay responsive (to a signal, a stop flag) waits in
    /// slices; an interrupted wait restarts, so a signal is noticed within
    /// two slices.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let socket = dir.path().join("doc.sock");
    /// # let listener = sealpass_receiver::Listener::bind(&socket)?;
    /// # let sender = std::thread::spawn(move || sealpass_sender::send_bytes(&socket, "frame", b"hello"));
    /// # let mut connection = listener.accept()?;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::time::Duration;
    /// use sealpass_receiver::ServeError;
    ///
    /// let stop = AtomicBool::new(false);
    /// while !stop.load(Ordering::Relaxed) {
    ///     match connection.receive_within(Duration::from_millis(100)) {
    ///         Ok(Some(transfer)) => transfer.accept()?,
    ///         Ok(None) => break, // the sender closed
    ///         Err(ServeError::NothingWithin(_)) => continue,
    ///         Err(error) => return Err(error.into()),
    ///     }
    /// }
    /// # assert!(sender.join().expect("sender")?.is_accepted());
    /// # Ok(())
    /// # }
    /// ```
    pub fn receive_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<IncomingTransfer>, ServeError> {
        let started = Instant::now();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match self.next_event_within(left)? {
                Some(Event::Transfer(transfer)) => return Ok(Some(transfer)),
                Some(Event::Refused(_)) => {}
                Some(Event::Closed) => return Ok(None),
                None => return Err(ServeError::NothingWithin(limit)),
            }
        }
    }

    /// What the next message brings, waiting for it: a transfer, a refusal
    /// (already answered), or the end. A peer that stays silent past the
    /// deadline or the idle timeout gets `Reject(Timeout)` and the
    /// connection closes.
    pub(crate) fn next_event(&mut self) -> Result<Event, ServeError> {
        loop {
            if let Some(event) = self.next_event_within(None)? {
                return Ok(event);
            }
        }
    }

    /// [`Connection::next_event`], waiting at most `limit`: `Ok(None)` when
    /// no message came within it. Messages are read with `recvmmsg`, as
    /// many as are queued (up to a batch), and judged one per call.
    pub(crate) fn next_event_within(
        &mut self,
        limit: impl Into<Option<Duration>>,
    ) -> Result<Option<Event>, ServeError> {
        // Messages read with an earlier one come first (and those a
        // panicking batch handler left).
        if let Some(event) = self.core.judge_next_in_batch() {
            return event.map(Some);
        }
        match self.wait_for(limit.into(), Connection::read_batch)? {
            None => Ok(None),
            Some(Err(event)) => Ok(Some(event)),
            Some(Ok(_)) => match self.core.judge_next_in_batch() {
                Some(event) => event.map(Some),
                None => Ok(None),
            },
        }
    }

    /// Serves every message already queued, up to a batch (the
    /// [`crate::Service`]'s way): waits for the first, judges each in order
    /// and hands each valid transfer to `handler`, dropping its mappings
    /// before the next is judged; the answers wait until the batch is done
    /// and then leave in one `sendmmsg`. Appends each message's outcome to
    /// `outcomes` and returns how many it appended.
    pub(crate) fn serve_batch<E: Display>(
        &mut self,
        handler: impl FnMut(&IncomingTransfer) -> Result<(), E>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<usize, ServeError> {
        // A handler that panicked part-way through the last batch left the
        // rest of it: that is served before anything more is read.
        if !self.core.has_untaken() {
            match self.wait_for(None, Connection::read_batch)? {
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

    /// Reads the messages queued, up to a batch, with one `recvmmsg`.
    fn read_batch(&mut self) -> Result<usize, TransportError> {
        let core = &mut self.core;
        let batch = core
            .batch
            .get_or_insert_with(|| ReceiveBatch::new(fdpass::batch_slots(), MAX_MESSAGE_LEN));
        fdpass::receive_batch(core.link.socket.fd(), batch)
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
