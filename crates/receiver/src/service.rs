//! A receiving service: many peers at once, each on its own thread, behind
//! access control and limits, stopped gracefully on request.
//!
//! Why a thread per connection: a connection's work is blocking syscalls
//! (`recvmsg`, `fstat`, `mmap`) and the application's handler, which may
//! itself block; threads keep a slow or silent peer from delaying anyone
//! else without an async runtime, and the connection cap bounds them.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sealpass_kernel::fdpass::{self, PeerCredentials};
use sealpass_proto::{MappedBudget, Reject, RejectReason};

use crate::connection::{Connection, Outcome, ServeError};
use crate::listener::{Admission, Listener, is_out_of_fds, out_of_fds, refuse};
use crate::mapping;
use crate::transfer::IncomingTransfer;

/// A verified transfer and who sent it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Delivery<'a> {
    /// The sender, as the kernel recorded it at `connect`.
    pub peer: PeerCredentials,
    /// The connection's number, counted from 1 in the order the service
    /// accepted them. With the transfer's id it names a transfer uniquely
    /// for the life of the service: ids are only unique per connection.
    pub connection: u64,
    /// The transfer, mapped read-only.
    pub transfer: &'a IncomingTransfer,
}

/// The accessors both services have, written once: each service holds
/// `shutdown`, `stats` and `budget`.
macro_rules! service_accessors {
    () => {
        /// A handle that stops [`Service::run`].
        pub fn shutdown_handle(&self) -> ShutdownHandle {
            self.shutdown.clone()
        }

        /// Counters, updated while the service runs.
        pub fn stats(&self) -> Arc<ServiceStats> {
            Arc::clone(&self.stats)
        }

        /// The bytes mapped by all connections right now.
        pub fn mapped_budget(&self) -> Arc<MappedBudget> {
            Arc::clone(&self.budget)
        }
    };
}
#[cfg(feature = "tokio")]
pub(crate) use service_accessors;

/// Stops a running [`Service`] (blocking or async): it stops accepting,
/// lets every connection finish (or reject) what it has received, answers,
/// and returns.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    writer: Arc<UnixStream>,
    /// The async service's stop flag, which its tasks wait on.
    #[cfg(feature = "tokio")]
    stop: Option<Arc<::tokio::sync::watch::Sender<bool>>>,
}

impl ShutdownHandle {
    /// The handle of a service woken through `writer` (the write end of
    /// its wake-up pair).
    pub(crate) fn new(writer: UnixStream) -> io::Result<ShutdownHandle> {
        writer.set_nonblocking(true)?;
        Ok(ShutdownHandle {
            writer: Arc::new(writer),
            #[cfg(feature = "tokio")]
            stop: None,
        })
    }

    /// The same, also setting `stop` (the async service's).
    #[cfg(feature = "tokio")]
    pub(crate) fn with_stop(
        writer: UnixStream,
        stop: Arc<::tokio::sync::watch::Sender<bool>>,
    ) -> io::Result<ShutdownHandle> {
        let mut handle = ShutdownHandle::new(writer)?;
        handle.stop = Some(stop);
        Ok(handle)
    }

    /// Asks the service to stop. Safe to call from any thread, many times.
    pub fn shutdown(&self) {
        // A full buffer already holds a wake-up: nothing is lost.
        let _ = (&*self.writer).write(&[1]);
        #[cfg(feature = "tokio")]
        if let Some(stop) = &self.stop {
            stop.send_replace(true);
        }
    }

    /// An fd that a signal handler may write to (signal-hook's
    /// `low_level::pipe::register`), to the same effect as [`Self::shutdown`].
    pub fn signal_fd(&self) -> io::Result<OwnedFd> {
        self.writer.as_fd().try_clone_to_owned()
    }
}

/// What a service did, for logs and tests.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ServiceStats {
    /// Connections being served now.
    pub active_connections: AtomicUsize,
    /// Transfers acknowledged.
    pub accepted: AtomicUsize,
    /// Messages rejected, refusals at accept included.
    pub rejected: AtomicUsize,
}

/// The state shared by the accept loop and the connection threads.
struct Shared<H> {
    handler: H,
    stats: Arc<ServiceStats>,
    /// A duplicate of each open connection's socket, to stop reading on shutdown.
    open: Mutex<HashMap<u64, OwnedFd>>,
}

/// A connection's place in the service: counted in `active_connections`
/// and registered for shutdown while it lives. Dropping it gives both back,
/// on every path out of the connection's thread, unwinding included.
struct Slot<H> {
    shared: Arc<Shared<H>>,
    number: u64,
}

impl<H> Slot<H> {
    /// Takes a slot for connection `number`, registering `duplicate` (a
    /// duplicate of its socket) so shutdown can stop its reading.
    fn take(shared: &Arc<Shared<H>>, number: u64, duplicate: OwnedFd) -> Slot<H> {
        shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(number, duplicate);
        shared
            .stats
            .active_connections
            .fetch_add(1, Ordering::AcqRel);
        Slot {
            shared: Arc::clone(shared),
            number,
        }
    }
}

impl<H> Drop for Slot<H> {
    fn drop(&mut self) {
        self.shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.number);
        self.shared
            .stats
            .active_connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A receiving service: many peers at once, each on its own thread, behind
/// the access rules and limits of its listener's [`Config`](crate::Config).
///
/// ```
/// use sealpass_receiver::{Config, Listener, Service};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("service.sock");
/// let mut listener = Listener::bind(&socket)?;
/// listener.set_config(Config::builder().max_connections(16).build()?);
/// let service = Service::new(listener)?;
/// let shutdown = service.shutdown_handle(); // or signal_fd() for SIGTERM
/// let running = std::thread::spawn(move || {
///     service.run(|delivery| {
///         println!("connection {}: {} bytes from pid {}",
///             delivery.connection, delivery.transfer.total_bytes(), delivery.peer.pid);
///         Ok::<(), String>(()) // Err(..) or a panic: Reject(ApplicationRejected)
///     })
/// });
/// let verdict = sealpass_sender::send_bytes(&socket, "frame", b"hello")?;
/// assert!(verdict.is_accepted());
/// shutdown.shutdown(); // stop accepting, answer what was sent, remove the socket
/// running.join().expect("service")?;
/// assert!(!socket.exists());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Service {
    listener: Listener,
    budget: Arc<MappedBudget>,
    stats: Arc<ServiceStats>,
    wake_reader: UnixStream,
    shutdown: ShutdownHandle,
}

impl Service {
    /// A service on `listener`, whose [`Config`](crate::Config) supplies the policy, the
    /// limits and who may connect.
    pub fn new(mut listener: Listener) -> io::Result<Service> {
        // Made with the listener, before its socket: a receiver's fds are
        // all open by the time it listens.
        let (wake_reader, writer) = listener.take_wake_pair()?;
        wake_reader.set_nonblocking(true)?;
        let budget = listener.shared_budget();
        Ok(Service {
            listener,
            budget,
            stats: Arc::default(),
            wake_reader,
            shutdown: ShutdownHandle::new(writer)?,
        })
    }

    service_accessors!();

    /// Serves until shut down. Each verified transfer goes to `handler` on
    /// its connection's thread; the peer gets `Ack` once it returns `Ok`,
    /// `Reject(ApplicationRejected)` with its error otherwise. Returns once
    /// every connection has finished; the socket file is removed.
    pub fn run<H, E>(mut self, handler: H) -> io::Result<()>
    where
        H: Fn(&Delivery<'_>) -> Result<(), E> + Send + Sync + 'static,
        E: Display,
    {
        let shared = Arc::new(Shared {
            handler,
            stats: Arc::clone(&self.stats),
            open: Mutex::new(HashMap::new()),
        });
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next_connection = 0u64;
        loop {
            let mut fds = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake_reader.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
                Ok(_) => {}
            }
            let [listening, woken] = fds;
            if woken.any().unwrap_or(false) {
                break;
            }
            if !listening.any().unwrap_or(false) {
                continue;
            }
            threads.retain(|thread| !thread.is_finished());
            let Some(socket) = self.accept() else {
                continue;
            };
            next_connection += 1;
            self.start_connection(next_connection, socket, &shared, &mut threads);
        }

        // Stop accepting first: the socket file goes with the listener.
        drop(self.listener);
        for socket in shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = fdpass::shut_down_reading(socket.as_fd());
        }
        finish_within(&shared, threads, SHUTDOWN_GRACE);
        let mut drain = [0u8; 64];
        while matches!((&self.wake_reader).read(&mut drain), Ok(n) if n > 0) {}
        Ok(())
    }

    /// Accepts one connection; when fds have run out, frees the reserve to
    /// accept and refuse it, so the peer hears why instead of waiting.
    fn accept(&mut self) -> Option<OwnedFd> {
        match self.listener.accept_socket() {
            Ok(socket) => Some(socket),
            Err(error) if is_out_of_fds(&error) => {
                if self.listener.refuse_for_want_of_fds() {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
                // Let connections finish and free fds before trying again.
                std::thread::sleep(Duration::from_millis(10));
                None
            }
            Err(error) => {
                tracing::warn!("accept failed: {error}");
                None
            }
        }
    }

    fn start_connection<H, E>(
        &self,
        number: u64,
        socket: OwnedFd,
        shared: &Arc<Shared<H>>,
        threads: &mut Vec<JoinHandle<()>>,
    ) where
        H: Fn(&Delivery<'_>) -> Result<(), E> + Send + Sync + 'static,
        E: Display,
    {
        let Ok(admitted) = self.listener.admit(socket) else {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(duplicate) = admitted.socket.try_clone() else {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return refuse(admitted.socket, &out_of_fds());
        };
        // The thread's stacks are mappings: taken from the budget first, so
        // that the process never makes a thread it cannot map (which aborts).
        let stacks = match mapping::Counted::take(mapping::THREAD_MAPPINGS) {
            Ok(stacks) => stacks,
            Err((held, limit)) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("out of mappings ({held} of {limit}): refusing a connection");
                return refuse(admitted.socket, &out_of_mappings(held, limit));
            }
        };
        let peer = admitted.peer;
        // Shared with the thread, so that a thread that cannot be made
        // leaves the socket here, to be answered.
        let handed = Arc::new(Mutex::new(Some(self.listener.admission(admitted))));
        let handed_over = Arc::clone(&handed);
        let slot = Slot::take(shared, number, duplicate);
        let spawned = std::thread::Builder::new()
            .name(format!("sealpass-conn-{number}"))
            .spawn(move || {
                let admission = handed_over
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if let Some(admission) = admission {
                    serve_connection(&slot.shared, admission, number);
                }
                drop(slot);
                drop(stacks);
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                tracing::warn!("cannot start a thread for {peer}: {error}");
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                let admission = handed.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some(admission) = admission {
                    refuse(
                        admission.socket,
                        &Reject::new(
                            0,
                            RejectReason::ResourceExhausted,
                            format!(
                                "the receiver cannot start a thread ({error}); try again later"
                            ),
                        ),
                    );
                }
            }
        }
    }
}

/// The refusal of a connection the receiver has no mappings to spare for.
fn out_of_mappings(held: usize, limit: usize) -> Reject {
    Reject::new(
        0,
        RejectReason::ResourceExhausted,
        format!(
            "the receiver holds {held} of the {limit} mappings vm.max_map_count leaves it; \
             try again later"
        ),
    )
}

/// How long a stopping service waits for its connections to answer what
/// they read before it closes them: a peer that does not read its answers
/// (with no idle timeout to bound the wait) cannot hold the stop up longer.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Waits for the connections' threads to end, saying what it waits for; those
/// still running after `grace` have their sockets shut down both ways, which
/// ends a send blocked on a peer that does not read, and are then joined
/// (a handler still running is waited for: it is the application's).
fn finish_within<H>(shared: &Shared<H>, threads: Vec<JoinHandle<()>>, grace: Duration) {
    let running = || {
        threads
            .iter()
            .filter(|thread| !thread.is_finished())
            .count()
    };
    if running() > 0 {
        tracing::info!(
            "stopping: finishing {} connection(s): answering what they read (at most {} s)",
            running(),
            grace.as_secs()
        );
    }
    let deadline = Instant::now() + grace;
    while running() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = running();
    if left > 0 {
        tracing::warn!(
            "stopping: {left} connection(s) still not done after {} s (a peer that does not read \
             its answers?): closing them",
            grace.as_secs()
        );
        for socket in shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(socket),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
    for thread in threads {
        let _ = thread.join();
    }
}

/// Runs the application's handler on one transfer. A panic in it is caught
/// here and becomes an error, answered `Reject(ApplicationRejected)` like any
/// other; the connection goes on being served.
fn run_handler<H, E>(handler: &H, delivery: &Delivery<'_>) -> Result<(), String>
where
    H: Fn(&Delivery<'_>) -> Result<(), E>,
    E: Display,
{
    match panic::catch_unwind(AssertUnwindSafe(|| handler(delivery))) {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a non-string payload");
            tracing::error!(peer = %delivery.peer, id = delivery.transfer.id(), "the handler panicked: {what}");
            Err(format!(
                "the receiving application failed (it panicked: {what})"
            ))
        }
    }
}

fn serve_connection<H, E>(shared: &Shared<H>, admission: Admission, number: u64)
where
    H: Fn(&Delivery<'_>) -> Result<(), E>,
    E: Display,
{
    let peer = admission.peer;
    let mut connection = match Connection::admitted(admission) {
        Ok(connection) => connection,
        Err(error) => {
            tracing::warn!(%peer, "cannot serve the connection: {}", crate::ErrorChain(&error));
            return;
        }
    };
    // Whether the peer's identity is pinned by a pidfd (SO_PEERPIDFD, 6.5+).
    let pidfd = connection.peer_pidfd().is_some();
    tracing::debug!(%peer, pidfd, "connected");
    // Messages already queued are served together and answered in one
    // `sendmmsg` (`serve_batch`); each still gets its own log line.
    let mut outcomes = Vec::new();
    'serving: while connection.is_open() {
        let started = Instant::now();
        outcomes.clear();
        let served = connection.serve_batch(
            |transfer| {
                run_handler(
                    &shared.handler,
                    &Delivery {
                        peer,
                        connection: number,
                        transfer,
                    },
                )
            },
            &mut outcomes,
        );
        let micros = started.elapsed().as_micros() as u64;
        let batch = match served {
            Ok(batch) => batch,
            Err(error @ ServeError::Answer { .. }) => {
                tracing::info!(%peer, "connection ended: {}", crate::ErrorChain(&error));
                break;
            }
            Err(error) => {
                tracing::warn!(%peer, "connection failed: {}", crate::ErrorChain(&error));
                break;
            }
        };
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Accepted {
                    id,
                    segments,
                    bytes,
                } => {
                    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, pidfd, id, segments, bytes, verdict = "Ack", micros, batch, "transfer");
                }
                Outcome::Rejected {
                    id,
                    reason,
                    message,
                } => {
                    shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, id, verdict = %reason, micros, batch, "transfer rejected: {message}");
                }
                Outcome::Closed => break 'serving,
            }
        }
    }
    tracing::debug!(%peer, "disconnected");
}
