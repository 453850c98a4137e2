//! Listening at a socket path: stale-socket handling, cleanup, accepting.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sealpass_kernel::fdpass::{self, Op, PeerCredentials, TransportError};
use sealpass_proto::session::admit;
use sealpass_proto::{Config, MappedBudget, Message, Reject, RejectReason, encode};

use crate::connection::{Connection, ServeError};
use crate::inspect;

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

/// A listening socket. Dropping it removes the socket file, if the file at
/// the path is still the one it created.
///
/// ```
/// use sealpass_receiver::{Config, Listener};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("doc.sock");
/// # let path = socket.clone();
/// # let sender = std::thread::spawn(move || -> Result<sealpass_sender::Verdict, sealpass_sender::SendError> {
/// #     // The listener may not be bound yet: wait for it.
/// #     let mut sender = sealpass_sender::Sender::connect_with_retry(&path, std::time::Duration::from_secs(20))?;
/// #     sender.send(&[sealpass_sender::SealedSegment::from_bytes("frame", b"hello", sealpass_sender::Seals::SENDER_DEFAULT)?])
/// # });
/// let mut listener = Listener::bind(&socket)?;
/// listener.set_config(Config::builder().max_segments(8).build()?);
/// let mut connection = listener.accept()?;
/// while let Some(transfer) = connection.receive()? {
///     println!("{} segments from {:?}", transfer.segments().len(), transfer.peer());
///     transfer.accept()?;
/// }
/// # assert!(sender.join().expect("sender")?.is_accepted());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Listener {
    socket: OwnedFd,
    path: PathBuf,
    inode: Option<(u64, u64)>,
    config: Arc<Config>,
    /// The mapped bytes of every connection accepted under `config`,
    /// against its `max_mapped_total`.
    budget: Arc<MappedBudget>,
    /// Connections accepted and not yet closed, against `max_connections`.
    active: Arc<AtomicUsize>,
    /// An fd held in reserve, opened before the socket: when fds run out, it
    /// is freed to accept and refuse a peer rather than leave it hanging in
    /// the backlog. Opening it first keeps the fds a receiver holds while
    /// listening fixed from the moment the socket exists. Lost when fds ran
    /// out as it was reopened, it is opened again at the next accept.
    reserve: Mutex<Option<fs::File>>,
    /// The wake-up pair a [`Service`](crate::Service) stops on, made before
    /// the socket for the same reason; taken by the service.
    wake: Option<(UnixStream, UnixStream)>,
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

/// Grows this process's fd table, by opening and closing a high-numbered
/// duplicate of `fd`, to hold a full message of fds and more. The kernel
/// grows it on demand, and a growth while the process has other threads
/// waits for an RCU grace period, milliseconds on a VM: without this it
/// falls on the first big message, on whatever thread receives it (an
/// async runtime's: a 253-fd message stalled one for 7 ms more).
fn grow_fd_table(fd: &fs::File) {
    // The lowest numbers asked for, highest first; the soft RLIMIT_NOFILE
    // refuses those at or past it (EINVAL).
    for lowest in [1023, 511] {
        if let Ok(high) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(lowest)) {
            let _ = nix::unistd::close(high);
            return;
        }
    }
}

fn inode_of(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Listener {
    /// Listens at `path` under [`Config::default`], first removing a stale
    /// socket left there (and refusing to touch anything that is not a
    /// socket, or a live one). The socket file is owner-only (0600).
    pub fn bind(path: impl AsRef<Path>) -> Result<Listener, BindError> {
        Self::bind_with(path.as_ref(), fdpass::listen)
    }

    pub(crate) fn bind_with(
        path: &Path,
        listen: fn(&Path, i32) -> Result<OwnedFd, TransportError>,
    ) -> Result<Listener, BindError> {
        remove_stale_socket(path)?;
        // Before the socket exists: no message can be served without it.
        inspect::open_proc_fd_dir();
        let reserve = fs::File::open("/dev/null").ok();
        if let Some(reserve) = &reserve {
            grow_fd_table(reserve);
        }
        let wake = UnixStream::pair().ok();
        let socket = listen(path, 128).map_err(|source| BindError::Listen {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::default();
        Ok(Listener {
            socket,
            path: path.to_owned(),
            inode: inode_of(path),
            budget: MappedBudget::new(config.max_mapped_total()),
            config: Arc::new(config),
            active: Arc::default(),
            reserve: Mutex::new(reserve),
            wake,
        })
    }

    /// The wake-up pair made before the socket, for a service (once).
    pub(crate) fn take_wake_pair(&mut self) -> io::Result<(UnixStream, UnixStream)> {
        match self.wake.take() {
            Some(pair) => Ok(pair),
            None => UnixStream::pair(),
        }
    }

    /// Refuses one waiting peer with `ResourceExhausted` when the process
    /// is out of fds, through the reserve fd: freed, the peer accepted and
    /// answered, the reserve opened again. `true` when a peer was refused.
    pub(crate) fn refuse_for_want_of_fds(&self) -> bool {
        let mut reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        *reserve = None;
        let refused = match fdpass::try_accept(self.socket.as_fd()) {
            Ok(Some(socket)) => {
                tracing::warn!("out of file descriptors: refusing a connection");
                refuse(socket, &out_of_fds());
                true
            }
            _ => false,
        };
        *reserve = fs::File::open("/dev/null").ok();
        refused
    }

    /// Opens the reserve fd again if an earlier burst left it closed.
    pub(crate) fn restore_reserve(&self) {
        let mut reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        if reserve.is_none() {
            *reserve = fs::File::open("/dev/null").ok();
        }
    }

    /// Admits `socket` under this listener's configuration: a peer whose
    /// credentials it allows, within `max_connections`. A refused peer is
    /// answered (`NotAllowed`, `TooManyConnections`) and closed here, and
    /// the refusal returned.
    pub(crate) fn admit(&self, socket: OwnedFd) -> Result<Admitted, Reject> {
        let peer = fdpass::peer_credentials(socket.as_fd())
            .inspect_err(|error| tracing::warn!("peer credentials unavailable: {error}"))
            .ok();
        // The count is checked and taken in one step: `accept` takes `&self`,
        // so two threads may admit at once.
        let admitted = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                admit(&self.config, peer.as_ref(), active)
                    .is_ok()
                    .then_some(active + 1)
            });
        match (admitted, peer) {
            (Ok(_), Some(peer)) => Ok(Admitted {
                socket,
                peer,
                ticket: AdmissionTicket(Arc::clone(&self.active)),
            }),
            (Err(active), peer) => {
                let reject = match admit(&self.config, peer.as_ref(), active) {
                    Err(reject) => reject,
                    // Another connection closed meanwhile: refuse as full,
                    // which is what was seen.
                    Ok(()) => Reject::new(
                        0,
                        RejectReason::TooManyConnections,
                        "the receiver serves its limit of connections; try again later",
                    ),
                };
                let who =
                    peer.map_or_else(|| "an unknown peer".to_owned(), |peer| peer.to_string());
                tracing::info!(peer = %who, verdict = %reject.reason, "refused connection: {}", reject.message);
                refuse(socket, &reject);
                Err(reject)
            }
            // `admit` refuses a peer without credentials.
            (Ok(_), None) => {
                self.active.fetch_sub(1, Ordering::AcqRel);
                let reject = out_of_fds();
                refuse(socket, &reject);
                Err(reject)
            }
        }
    }

    /// The configuration, budget and admission of a connection admitted here.
    pub(crate) fn admission(&self, admitted: Admitted) -> Admission {
        Admission {
            socket: admitted.socket,
            peer: admitted.peer,
            config: Arc::clone(&self.config),
            budget: Some(Arc::clone(&self.budget)),
            ticket: Some(admitted.ticket),
        }
    }

    /// The policy, limits and access every connection accepted from now on
    /// gets: whoever `config` does not admit, or one connection past
    /// `max_connections`, is refused at accept, and the mapped bytes of
    /// the connections accepted under it together stay within
    /// `max_mapped_total`.
    pub fn set_config(&mut self, config: Config) {
        self.budget = MappedBudget::new(config.max_mapped_total());
        self.config = Arc::new(config);
    }

    /// The configuration every accepted connection gets.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The mapped bytes of the connections accepted under the
    /// configuration, shared by all of them.
    pub(crate) fn shared_budget(&self) -> Arc<MappedBudget> {
        Arc::clone(&self.budget)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection and returns its bare socket, as it
    /// is: no access rule or limit is applied to it.
    pub fn accept_socket(&self) -> Result<OwnedFd, TransportError> {
        self.restore_reserve();
        fdpass::accept(self.socket.as_fd())
    }

    /// Waits for the next connection that this listener's configuration
    /// admits, and serves it under that configuration. Peers it does not
    /// allow, and peers past `max_connections`, are answered
    /// (`NotAllowed`, `TooManyConnections`) and closed meanwhile; when the
    /// process is out of fds, a waiting peer is answered
    /// `ResourceExhausted`.
    pub fn accept(&self) -> Result<Connection, ServeError> {
        loop {
            if let Some(connection) = self.accept_within(Duration::MAX)? {
                return Ok(connection);
            }
        }
    }

    /// [`Listener::accept`], waiting at most `limit` for a peer: `Ok(None)`
    /// when none came, when the one that came was refused, or when a signal
    /// interrupted the wait. A caller that must stay responsive waits in
    /// slices.
    pub fn accept_within(&self, limit: Duration) -> Result<Option<Connection>, ServeError> {
        self.restore_reserve();
        let timeout = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => return Ok(None),
            Err(errno) => {
                return Err(ServeError::Accept(TransportError::Sys {
                    op: Op::Poll,
                    errno,
                }));
            }
            Ok(_) => {}
        }
        // A peer that gave up between the poll and here leaves nothing to
        // accept: wait again rather than block.
        let socket = match fdpass::try_accept(self.socket.as_fd()) {
            Ok(Some(socket)) => socket,
            Ok(None) => return Ok(None),
            Err(error) if is_out_of_fds(&error) => {
                self.refuse_for_want_of_fds();
                return Ok(None);
            }
            Err(error) => return Err(ServeError::Accept(error)),
        };
        let Ok(admitted) = self.admit(socket) else {
            return Ok(None);
        };
        // Served by blocking calls, as `accept` gives it.
        fdpass::set_blocking(admitted.socket.as_fd()).map_err(ServeError::Accept)?;
        Connection::admitted(self.admission(admitted)).map(Some)
    }
}

/// Whether accepting failed for want of fds (`EMFILE`, `ENFILE`).
pub(crate) fn is_out_of_fds(error: &TransportError) -> bool {
    matches!(error.errno(), Some(Errno::EMFILE | Errno::ENFILE))
}

/// A peer the listener's configuration admits, counted against
/// `max_connections` while its ticket lives.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) socket: OwnedFd,
    pub(crate) peer: PeerCredentials,
    pub(crate) ticket: AdmissionTicket,
}

/// Everything a connection is served with: its socket and peer, the
/// configuration it was admitted under, and, when a listener admitted it,
/// the budget its connections share and its place among them.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) socket: OwnedFd,
    pub(crate) peer: PeerCredentials,
    pub(crate) config: Arc<Config>,
    pub(crate) budget: Option<Arc<MappedBudget>>,
    pub(crate) ticket: Option<AdmissionTicket>,
}

/// One connection's place among its listener's `max_connections`, given
/// back when dropped: the connection's link holds it until its socket closes.
#[derive(Debug)]
pub(crate) struct AdmissionTicket(Arc<AtomicUsize>);

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a connection that will not be served, then closes it so that
/// the peer reads the `Reject` before the end of the connection.
pub(crate) fn refuse(socket: OwnedFd, reject: &Reject) {
    let _ = fdpass::set_timeouts(socket.as_fd(), None, Some(Duration::from_secs(1)));
    if let Ok(bytes) = encode(&Message::Reject(reject.clone())) {
        let _ = fdpass::send(socket.as_fd(), &bytes, &[]);
    }
    fdpass::close_after_answer(socket.as_fd(), REFUSED_DISCARD);
}

/// The refusal of a connection the receiver has no fd to spare for.
pub(crate) fn out_of_fds() -> Reject {
    Reject::new(
        0,
        RejectReason::ResourceExhausted,
        "the receiver is out of file descriptors; try again later",
    )
}

/// Most messages a refused peer already queued that are discarded before
/// its connection closes (see [`fdpass::close_after_answer`]).
const REFUSED_DISCARD: usize = 16;

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn holds_reserve(listener: &Listener) -> bool {
        listener
            .reserve
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// A reserve fd lost in a burst (its reopening found no fd free) is
    /// opened again by the next accept, so the next time fds run out a
    /// waiting peer is still answered at once.
    #[test]
    fn a_lost_reserve_fd_is_restored_by_the_next_accept() {
        let dir = tempfile::tempdir().unwrap();
        let listener = Listener::bind(dir.path().join("reserve.sock")).unwrap();
        assert!(holds_reserve(&listener));
        *listener.reserve.lock().unwrap() = None;
        assert!(
            listener
                .accept_within(Duration::from_millis(1))
                .unwrap()
                .is_none()
        );
        assert!(holds_reserve(&listener), "restored by accept_within");
        *listener.reserve.lock().unwrap() = None;
        let peer = fdpass::connect(listener.path()).unwrap();
        let _socket = listener.accept_socket().unwrap();
        assert!(holds_reserve(&listener), "restored by accept_socket");
        drop(peer);
    }
}
