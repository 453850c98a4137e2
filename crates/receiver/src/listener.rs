//! Listening at a socket path: stale-socket handling, cleanup, accepting.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sealpass_proto::Config;
use sealpass_proto::fdpass::{self, Op, TransportError};

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
    /// An fd held in reserve, opened before the socket: when fds run out, a
    /// service frees it to accept and refuse a peer rather than leave it
    /// hanging in the backlog. Opening it first keeps the fds a receiver
    /// holds while listening fixed from the moment the socket exists.
    reserve: Option<fs::File>,
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
        let wake = UnixStream::pair().ok();
        let socket = listen(path, 128).map_err(|source| BindError::Listen {
            path: path.to_owned(),
            source,
        })?;
        Ok(Listener {
            socket,
            path: path.to_owned(),
            inode: inode_of(path),
            config: Arc::new(Config::default()),
            reserve,
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

    /// Runs `accept_and_refuse` with the reserve fd freed, then takes a new
    /// one: how a service answers a peer when the process is out of fds.
    pub(crate) fn with_reserve_freed<T>(
        &mut self,
        accept_and_refuse: impl FnOnce(&Self) -> T,
    ) -> T {
        self.reserve = None;
        let result = accept_and_refuse(self);
        self.reserve = fs::File::open("/dev/null").ok();
        result
    }

    /// The policy, limits and access every accepted connection gets.
    pub fn set_config(&mut self, config: Config) {
        self.config = Arc::new(config);
    }

    /// The configuration every accepted connection gets.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn shared_config(&self) -> Arc<Config> {
        Arc::clone(&self.config)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection and returns its bare socket.
    pub fn accept_socket(&self) -> Result<OwnedFd, TransportError> {
        fdpass::accept(self.socket.as_fd())
    }

    /// Waits for the next connection, and serves it under this listener's
    /// configuration. Access control and the connection limit are the
    /// [`Service`](crate::Service)'s: a single connection is served whoever
    /// it is.
    pub fn accept(&self) -> Result<Connection, ServeError> {
        let socket = self.accept_socket().map_err(ServeError::Accept)?;
        let peer = fdpass::peer_credentials(socket.as_fd()).ok();
        Connection::serving(socket, self.shared_config(), None, peer)
    }

    /// [`Listener::accept`], waiting at most `limit` for a peer: `Ok(None)`
    /// when none came (or a signal interrupted the wait). A caller that must
    /// stay responsive waits in slices.
    pub fn accept_within(&self, limit: Duration) -> Result<Option<Connection>, ServeError> {
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
        let Some(socket) = fdpass::try_accept(self.socket.as_fd()).map_err(ServeError::Accept)?
        else {
            return Ok(None);
        };
        // Served by blocking calls, as `accept` gives it.
        fdpass::set_blocking(socket.as_fd()).map_err(ServeError::Accept)?;
        let peer = fdpass::peer_credentials(socket.as_fd()).ok();
        Connection::serving(socket, self.shared_config(), None, peer).map(Some)
    }
}

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
