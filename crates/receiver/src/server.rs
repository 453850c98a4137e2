//! Listening, and serving one connection message by message.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use memmap2::Mmap;
use nix::errno::Errno;
use sealpass_proto::fdpass::{self, ControlBuffer, TransportError};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::verify::{check_fd_count, check_segment};
use sealpass_proto::{
    Ack, Message, Policy, Reject, RejectReason, Seals, Segment, Version, codec, decode,
};

use crate::limits::{Limits, MappedBudget, Reservation};
use crate::{inspect, mapping};

/// Why the receiver could not start listening.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// Something that is not a socket is at the path; it is left alone.
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A receiver is listening at the path already.
    #[error("{path} is in use: another receiver accepts connections there")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Inspecting or removing the stale socket failed.
    #[error("inspecting or removing the old socket at {path} failed")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Binding or listening failed.
    #[error("listening at {path} failed")]
    Listen {
        /// The path.
        path: PathBuf,
        /// The failure.
        source: TransportError,
    },
}

/// Why serving a connection stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Accepting a connection failed.
    #[error("accepting a connection failed")]
    Accept(#[source] TransportError),
    /// Reading from the peer failed.
    #[error("receiving from the peer failed")]
    Receive(#[source] TransportError),
    /// Encoding an answer failed.
    #[error("encoding the {answer} failed")]
    Encode {
        /// `Ack` or `Reject`.
        answer: &'static str,
        /// The failure.
        source: sealpass_proto::EncodeError,
    },
    /// Answering the peer failed (it may have gone).
    #[error("answering {answer} to the peer failed")]
    Answer {
        /// `Ack` or `Reject`.
        answer: &'static str,
        /// The failure.
        source: TransportError,
    },
}

/// A listening socket. Dropping it removes the socket file, if the file at
/// the path is still the one it created.
#[derive(Debug)]
pub struct Listener {
    socket: OwnedFd,
    path: PathBuf,
    inode: Option<(u64, u64)>,
    policy: Policy,
    limits: Limits,
}

fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    let io_error = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_error(error)),
    };
    if !metadata.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_owned(),
        });
    }
    match fdpass::connect(path) {
        Ok(_) => Err(BindError::InUse {
            path: path.to_owned(),
        }),
        // Nobody listens: a socket left by a receiver that died.
        Err(error) if error.errno() == Some(Errno::ECONNREFUSED) => {
            fs::remove_file(path).map_err(io_error)
        }
        // A live listener of the other socket type.
        Err(error) if error.errno() == Some(Errno::EPROTOTYPE) => Err(BindError::InUse {
            path: path.to_owned(),
        }),
        Err(source) => Err(BindError::Listen {
            path: path.to_owned(),
            source,
        }),
    }
}

fn inode_of(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Listener {
    /// Listens at `path`, first removing a stale socket left there (and
    /// refusing to touch anything that is not a socket, or a live one).
    pub fn bind(path: impl AsRef<Path>) -> Result<Listener, BindError> {
        Self::bind_with(path.as_ref(), fdpass::listen)
    }

    /// Listens at `path` on `SOCK_STREAM`, for bare fd-passing peers; accept
    /// with [`Listener::accept_bare`].
    pub fn bind_compat(path: impl AsRef<Path>) -> Result<Listener, BindError> {
        Self::bind_with(path.as_ref(), fdpass::listen_stream)
    }

    fn bind_with(
        path: &Path,
        listen: fn(&Path, i32) -> Result<OwnedFd, TransportError>,
    ) -> Result<Listener, BindError> {
        remove_stale_socket(path)?;
        // Before the socket exists: no message can be served without it.
        inspect::open_proc_fd_dir();
        let socket = listen(path, 128).map_err(|source| BindError::Listen {
            path: path.to_owned(),
            source,
        })?;
        Ok(Listener {
            socket,
            path: path.to_owned(),
            inode: inode_of(path),
            policy: Policy::default(),
            limits: Limits::default(),
        })
    }

    /// The seals every segment must carry (default: SHRINK, GROW, WRITE).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// How long a connection may stay silent, before its first message or
    /// between messages, before it is closed (`None`: forever).
    pub fn set_idle_timeout(&mut self, timeout: Option<Duration>) {
        self.limits.first_message_deadline = timeout;
        self.limits.idle_timeout = timeout;
    }

    /// The limits each accepted connection gets (default: [`Limits::default`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The limits each accepted connection gets.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The policy each accepted connection gets.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The listening socket.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection and returns its bare socket.
    pub fn accept_socket(&self) -> Result<OwnedFd, TransportError> {
        fdpass::accept(self.socket.as_fd())
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Connection, ServeError> {
        let socket = fdpass::accept(self.socket.as_fd()).map_err(ServeError::Accept)?;
        let mut connection = Connection::new(socket, self.policy);
        connection
            .set_limits(self.limits.clone(), None)
            .map_err(ServeError::Accept)?;
        Ok(connection)
    }
}

impl Listener {
    /// Waits for the next bare peer (on a listener from [`Listener::bind_compat`]).
    pub fn accept_bare(&self) -> Result<crate::compat::BareConnection, ServeError> {
        let socket = fdpass::accept(self.socket.as_fd()).map_err(ServeError::Accept)?;
        fdpass::set_timeouts(
            socket.as_fd(),
            self.limits.idle_timeout,
            self.limits.idle_timeout,
        )
        .map_err(ServeError::Accept)?;
        Ok(crate::compat::BareConnection::new(socket))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only our own socket: another receiver may have replaced it since.
        if self.inode.is_some() && inode_of(&self.path) == self.inode {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// One verified memfd, mapped read-only.
#[derive(Debug)]
pub struct VerifiedSegment {
    /// Confirmed by the kernel: its name, its size, and all its seals (which
    /// may be more than were declared).
    confirmed: Segment,
    mapping: Option<Mmap>,
}

impl VerifiedSegment {
    /// The memfd's name, as the kernel reports it.
    pub fn name(&self) -> &str {
        &self.confirmed.name
    }

    /// The size in bytes, as the kernel reports it.
    pub fn size(&self) -> u64 {
        self.confirmed.size
    }

    /// The seals the kernel reports.
    pub fn seals(&self) -> Seals {
        self.confirmed.seals
    }

    /// All three, as one protocol `Segment`.
    pub fn segment(&self) -> &Segment {
        &self.confirmed
    }

    /// The bytes. They cannot change: the memfd is sealed against writes.
    pub fn bytes(&self) -> &[u8] {
        self.mapping.as_deref().unwrap_or_default()
    }
}

/// A transfer whose every segment the kernel vouched for.
#[derive(Debug)]
pub struct VerifiedTransfer {
    id: u64,
    version: Version,
    segments: Vec<VerifiedSegment>,
    /// Counts the mapped bytes against the service's budget while alive.
    _reservation: Option<Reservation>,
}

impl VerifiedTransfer {
    /// The sender's id for it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The protocol version the sender wrote.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The segments, in the order sent.
    pub fn segments(&self) -> &[VerifiedSegment] {
        &self.segments
    }

    /// The sum of the segment sizes.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(VerifiedSegment::size).sum()
    }
}

/// What became of one message.
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
        /// The transfer's id, or 0 if it could not be read.
        id: u64,
        /// The reason code.
        reason: RejectReason,
        /// The explanation sent.
        message: String,
    },
    /// The peer closed the connection.
    Closed,
}

/// A refusal on its way to the peer.
struct Refusal {
    id: u64,
    reason: RejectReason,
    message: String,
}

impl Refusal {
    fn new(id: u64, reason: RejectReason, message: impl Display) -> Refusal {
        Refusal {
            id,
            reason,
            message: message.to_string(),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        fdpass::close_after_answer(self.socket.as_fd(), Connection::DISCARD_ON_CLOSE);
    }
}

/// One peer's connection. Dropping it closes the socket: writing stops
/// first, then messages already queued (unanswered) are discarded, so the
/// peer reads every answer it was sent and then the end of the connection.
#[derive(Debug)]
pub struct Connection {
    socket: OwnedFd,
    policy: Policy,
    limits: Limits,
    budget: Option<Arc<MappedBudget>>,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    control: Box<ControlBuffer>,
    open: bool,
    /// Whether a first complete message arrived (the deadline gave way to
    /// the idle timeout).
    greeted: bool,
    /// Fault every page in at mapping time (`MAP_POPULATE`).
    populate: bool,
    // Reused from message to message, so serving one allocates only what the
    // decoded transfer owns (its segment list and names).
    spare_fds: Vec<OwnedFd>,
    spare_link: Vec<u8>,
    judged: Vec<(u64, Seals)>,
    spare_segments: Vec<VerifiedSegment>,
}

impl Connection {
    /// Serves a connected `SOCK_SEQPACKET` socket under `policy`, with no
    /// limits beyond the protocol's and no timeouts.
    pub fn new(socket: OwnedFd, policy: Policy) -> Connection {
        inspect::open_proc_fd_dir();
        Connection {
            socket,
            policy,
            limits: Limits {
                first_message_deadline: None,
                idle_timeout: None,
                ..Limits::default()
            },
            budget: None,
            incoming: vec![0; MAX_MESSAGE_LEN],
            outgoing: Vec::new(),
            control: ControlBuffer::new(),
            open: true,
            greeted: false,
            populate: false,
            spare_fds: Vec::new(),
            spare_link: Vec::new(),
            judged: Vec::new(),
            spare_segments: Vec::new(),
        }
    }

    /// Whether to fault every page of a mapping in when it is made
    /// (`MAP_POPULATE`): faster for handlers that read every byte, wasted
    /// work for those that read little. Off by default.
    pub fn set_populate(&mut self, populate: bool) {
        self.populate = populate;
    }

    /// Applies `limits`, and `budget` (shared with other connections) if any.
    pub fn set_limits(
        &mut self,
        limits: Limits,
        budget: Option<Arc<MappedBudget>>,
    ) -> Result<(), TransportError> {
        self.limits = limits;
        self.budget = budget;
        fdpass::set_timeouts(
            self.socket.as_fd(),
            self.current_wait(),
            self.limits.idle_timeout,
        )
    }

    /// How long the next message may take: the first-message deadline until
    /// one arrived, the idle timeout after.
    fn current_wait(&self) -> Option<Duration> {
        if self.greeted {
            self.limits.idle_timeout
        } else {
            self.limits
                .first_message_deadline
                .or(self.limits.idle_timeout)
        }
    }

    /// How long the peer may stay silent (`None`: forever), before its first
    /// message and after. Also bounds how long an answer may wait for room in
    /// the peer's queue.
    pub fn set_idle_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        let limits = Limits {
            first_message_deadline: timeout,
            idle_timeout: timeout,
            ..self.limits.clone()
        };
        self.set_limits(limits, self.budget.clone())
    }

    /// The socket.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Whether the connection can carry more messages: false once the peer
    /// closed it, or after a reject that ends it (unsupported version,
    /// timeout).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Receives one message, verifies it, hands a valid transfer to `handler`
    /// and answers: `Ack` once `handler` returns `Ok`, `Reject` with the
    /// reason otherwise. The fds of a refused message are closed before the
    /// `Reject` goes out; the mappings of an accepted one are gone before
    /// the `Ack` does. A peer that sends nothing within the deadline or the
    /// idle timeout gets `Reject(Timeout)` and the connection closes.
    pub fn serve_one<E: Display>(
        &mut self,
        handler: impl FnOnce(&VerifiedTransfer) -> Result<(), E>,
    ) -> Result<Outcome, ServeError> {
        if !self.open {
            return Ok(Outcome::Closed);
        }
        let received = match fdpass::receive_reusing(
            self.socket.as_fd(),
            &mut self.incoming,
            &mut self.control,
            std::mem::take(&mut self.spare_fds),
        ) {
            Ok(received) => received,
            Err(TransportError::TimedOut { .. }) => {
                let waited = self.current_wait();
                let what = if self.greeted {
                    "no message"
                } else {
                    "no complete first message"
                };
                self.open = false;
                return self.refuse(Refusal::new(
                    0,
                    RejectReason::Timeout,
                    format_args!(
                        "{what} within {:?}; closing the connection",
                        waited.unwrap_or_default()
                    ),
                ));
            }
            Err(error) => {
                self.open = false;
                return Err(ServeError::Receive(error));
            }
        };
        if received.is_end_of_stream() {
            self.open = false;
            return Ok(Outcome::Closed);
        }
        if !self.greeted {
            self.greeted = true;
            fdpass::set_timeouts(
                self.socket.as_fd(),
                self.current_wait(),
                self.limits.idle_timeout,
            )
            .map_err(ServeError::Receive)?;
        }
        // `received.fds` is moved into `verify`, which drops (closes) every fd
        // on every path: mapped segments keep the file alive on their own.
        match self.verify(received, handler) {
            Ok((id, segments, bytes)) => {
                self.answer(Message::Ack(Ack { id }))?;
                Ok(Outcome::Accepted {
                    id,
                    segments,
                    bytes,
                })
            }
            Err(refusal) => self.refuse(refusal),
        }
    }

    fn refuse(&mut self, refusal: Refusal) -> Result<Outcome, ServeError> {
        let reject = Reject::new(refusal.id, refusal.reason, refusal.message);
        let outcome = Outcome::Rejected {
            id: reject.id,
            reason: reject.reason,
            message: reject.message.clone(),
        };
        self.answer(Message::Reject(reject))?;
        Ok(outcome)
    }

    fn verify<E: Display>(
        &mut self,
        received: fdpass::Received,
        handler: impl FnOnce(&VerifiedTransfer) -> Result<(), E>,
    ) -> Result<(u64, usize, u64), Refusal> {
        let fds = received.fds;
        if received.payload_truncated {
            return Err(Refusal::new(
                0,
                RejectReason::TooLarge,
                format_args!(
                    "message over {MAX_MESSAGE_LEN} bytes; expected at most {MAX_MESSAGE_LEN}"
                ),
            ));
        }
        if received.control_truncated {
            // The buffer has room for SCM_MAX_FD fds, so the kernel could not
            // install them all: most likely this process is out of fds.
            return Err(Refusal::new(
                0,
                RejectReason::ControlTruncated,
                format_args!(
                    "control data was truncated (MSG_CTRUNC) after {} fds; the receiver may be out of file descriptors",
                    fds.len()
                ),
            ));
        }
        let bytes = self.incoming.get(..received.len).unwrap_or_default();
        let decoded = decode(bytes).map_err(|error| {
            if error.closes_connection() {
                self.open = false;
            }
            Refusal::new(error.reject_id(), error.reject_reason(), &error)
        })?;
        let Message::Transfer(transfer) = decoded.message else {
            return Err(Refusal::new(
                decoded.message.id(),
                RejectReason::UnexpectedMessage,
                format_args!("got {}; expected Transfer", decoded.message.kind()),
            ));
        };
        let id = transfer.id;
        if transfer.segments.len() > self.limits.max_segments {
            return Err(Refusal::new(
                id,
                RejectReason::TooManySegments,
                format_args!(
                    "{} segments; this receiver accepts at most {} per message",
                    transfer.segments.len(),
                    self.limits.max_segments
                ),
            ));
        }
        check_fd_count(fds.len(), transfer.segments.len())
            .map_err(|e| Refusal::new(id, RejectReason::FdCountMismatch, e))?;

        // Judge every fd before mapping any, so limits see the whole transfer.
        let mut sizes = std::mem::take(&mut self.judged);
        sizes.clear();
        let mut link = std::mem::take(&mut self.spare_link);
        for (index, (declared, fd)) in transfer.segments.iter().zip(&fds).enumerate() {
            let facts = inspect::facts_reusing(fd.as_fd(), link).map_err(|errno| {
                Refusal::new(
                    id,
                    RejectReason::NotMemfd,
                    format_args!("segment {index}: inspecting the fd failed: {errno}"),
                )
            })?;
            check_segment(index, declared, &facts, &self.policy)
                .map_err(|e| Refusal::new(id, e.reject_reason(), &e))?;
            sizes.push((facts.size, facts.seals.unwrap_or(Seals::empty())));
            link = facts.link;
        }
        self.spare_link = link;
        let total: u64 = sizes.iter().map(|(size, _)| size).sum();
        if total > self.limits.max_mapped_per_connection {
            return Err(Refusal::new(
                id,
                RejectReason::MemoryLimit,
                format_args!(
                    "transfer of {total} bytes; this receiver maps at most {} per connection",
                    self.limits.max_mapped_per_connection
                ),
            ));
        }
        let reservation = match &self.budget {
            Some(budget) => Some(budget.reserve(total).ok_or_else(|| {
                Refusal::new(
                    id,
                    RejectReason::MemoryLimit,
                    format_args!(
                        "transfer of {total} bytes does not fit: {} of {} bytes already mapped by all connections",
                        budget.in_use(),
                        budget.limit()
                    ),
                )
            })?),
            None => None,
        };

        let mut segments = std::mem::take(&mut self.spare_segments);
        segments.clear();
        for (index, ((declared, fd), &(size, seals))) in transfer
            .segments
            .into_iter()
            .zip(&fds)
            .zip(&sizes)
            .enumerate()
        {
            let mapping =
                mapping::map_verified(fd.as_fd(), size, self.populate).map_err(|error| {
                    let reason = match error.kind() {
                        io::ErrorKind::OutOfMemory => RejectReason::ResourceExhausted,
                        _ => RejectReason::MapFailed,
                    };
                    Refusal::new(
                        id,
                        reason,
                        format_args!(
                            "segment {index} ({:?}): mapping {size} bytes failed: {error}",
                            declared.name
                        ),
                    )
                })?;
            segments.push(VerifiedSegment {
                confirmed: Segment {
                    name: declared.name,
                    size,
                    seals,
                },
                mapping,
            });
        }
        self.judged = sizes;
        let mut fds = fds;
        fds.clear(); // closes them: the mappings hold the files
        self.spare_fds = fds;
        let transfer = VerifiedTransfer {
            id,
            version: decoded.version,
            segments,
            _reservation: reservation,
        };
        let handled = handler(&transfer);
        let (count, bytes) = (transfer.segments.len(), transfer.total_bytes());
        // Before answering: unmap, then give the bytes back to the budget
        // (the Ack promises the receiver holds nothing of the transfer).
        // Keep the emptied list for the next message.
        let VerifiedTransfer {
            mut segments,
            _reservation: reservation,
            ..
        } = transfer;
        segments.clear();
        drop(reservation);
        self.spare_segments = segments;
        handled.map_err(|e| Refusal::new(id, RejectReason::ApplicationRejected, e))?;
        Ok((id, count, bytes))
    }

    /// Most queued messages discarded when a connection closes, so the peer
    /// reads its last answer rather than `ECONNRESET` (PROTOCOL.md section 2).
    const DISCARD_ON_CLOSE: usize = 64;

    fn answer(&mut self, message: Message) -> Result<(), ServeError> {
        let answer = message.kind();
        codec::encode_into(&message, &mut self.outgoing)
            .map_err(|source| ServeError::Encode { answer, source })?;
        fdpass::send(self.socket.as_fd(), &self.outgoing, &[]).map_err(|source| {
            self.open = false;
            ServeError::Answer { answer, source }
        })
    }
}
