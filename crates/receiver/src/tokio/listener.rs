//! The async listener: the blocking one's admission, waited on by the reactor.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ::tokio::io::Interest;
use ::tokio::io::unix::AsyncFd;
use nix::errno::Errno;
use sealpass_kernel::fdpass::{self, TransportError};
use sealpass_proto::Config;

use crate::ErrorChain;
use crate::connection::ServeError;
use crate::listener::{Admitted, BindError, Listener as BlockingListener, is_out_of_fds};
use crate::service::ServiceStats;

use super::{Connection, transport};

/// A listening socket on tokio. It binds, replaces stale sockets and
/// removes its own socket file exactly as the blocking
/// [`Listener`](crate::Listener) does (it is one, inside).
#[derive(Debug)]
pub struct Listener {
    // Field order is drop order: deregistered from the reactor before the
    // inner listener closes the fd.
    socket: AsyncFd<ListeningFd>,
    pub(super) inner: BlockingListener,
}

/// The inner listener's fd, registered with the reactor without a
/// duplicate: a `dup` after `listen` would open an fd after the socket is
/// already listening, and a receiver's fds are to be fixed by then.
#[derive(Debug)]
struct ListeningFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for ListeningFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

impl Listener {
    /// Listens at `path` under [`Config::default`]. Call it within a tokio
    /// runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<Listener, BindError> {
        let path = path.as_ref();
        let inner = BlockingListener::bind(path)?;
        Listener::from_listener(inner).map_err(|error| BindError::Listen {
            path: path.to_owned(),
            source: transport(&error, fdpass::Op::Listen),
        })
    }

    /// The async side of a bound [`Listener`](crate::Listener).
    #[allow(unsafe_code)]
    pub fn from_listener(inner: BlockingListener) -> io::Result<Listener> {
        fdpass::set_nonblocking(inner.as_fd()).map_err(|error| {
            io::Error::from_raw_os_error(error.errno().unwrap_or(Errno::EIO) as i32)
        })?;
        let fd = ListeningFd(std::os::fd::AsRawFd::as_raw_fd(&inner.as_fd()));
        // SAFETY: the fd is `inner`'s, which stays in this struct, open and
        // the same, until after the AsyncFd is dropped (field order).
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Listener { socket, inner })
    }

    /// The policy, limits and access every accepted connection gets.
    pub fn set_config(&mut self, config: Config) {
        self.inner.set_config(config);
    }

    /// The configuration every accepted connection gets.
    pub fn config(&self) -> &Config {
        self.inner.config()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.inner.path()
    }

    /// Waits for the next connection and returns its socket, non-blocking,
    /// as it is: no access rule or limit is applied to it.
    pub async fn accept_socket(&self) -> Result<OwnedFd, TransportError> {
        self.inner.restore_reserve();
        loop {
            let mut ready = self
                .socket
                .readable()
                .await
                .map_err(|error| transport(&error, fdpass::Op::Accept))?;
            match fdpass::try_accept(self.inner.as_fd())? {
                Some(socket) => return Ok(socket),
                None => ready.clear_ready(),
            }
        }
    }

    /// Waits for the next connection that this listener's configuration
    /// admits, and serves it under that configuration, as
    /// [`crate::Listener::accept`] does: refused peers are answered and
    /// closed meanwhile, and when the process is out of fds a waiting
    /// peer is answered `ResourceExhausted`.
    pub async fn accept(&self) -> Result<Connection, ServeError> {
        loop {
            if let Some(admitted) = self.accept_admitted(&ServiceStats::default()).await {
                return Connection::admitted(self.inner.admission(admitted));
            }
        }
    }

    /// One accepted connection the configuration admits, or `None` when it
    /// was refused (counted in `stats`) or accepting failed.
    pub(super) async fn accept_admitted(&self, stats: &ServiceStats) -> Option<Admitted> {
        let socket = match self.accept_socket().await {
            Ok(socket) => socket,
            Err(error) if is_out_of_fds(&error) => {
                if self.inner.refuse_for_want_of_fds() {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
                // Let connections finish and free fds before trying again.
                ::tokio::time::sleep(Duration::from_millis(10)).await;
                return None;
            }
            Err(error) => {
                tracing::warn!("accept failed: {}", ErrorChain(&error));
                return None;
            }
        };
        self.inner
            .admit(socket)
            .inspect_err(|_| {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
            })
            .ok()
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}
