//! Serving one connection: the blocking driver of [`sealpass_proto::Session`].
//!
//! The driver moves bytes and fds and asks the kernel; every decision is the
//! session's. It holds the session behind a mutex shared with the
//! responders of the transfers it handed out, so an answer can be given from
//! any thread while this one waits for the next message, and answers still
//! leave in protocol order.
#![forbid(unsafe_code)]

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

pub(crate) use self::core::{Core, Opened, admit_alone, answer_by};
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

        /// The peer, as the kernel recorded it at `connect`, where known.
        pub fn peer(&self) -> Option<PeerCredentials> {
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
