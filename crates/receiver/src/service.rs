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
use std::fs::File;
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
use sealpass_proto::fdpass::{self, PeerCredentials};
use sealpass_proto::{Message, Policy, Reject, RejectReason, encode};

use crate::limits::{Limits, MappedBudget};
use crate::server::{Connection, Listener, Outcome, ServeError, VerifiedTransfer};

/// Who may connect. Empty lists allow everyone; otherwise a peer is allowed
/// if its uid or its gid is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Allowed user ids.
    pub uids: Vec<u32>,
    /// Allowed group ids.
    pub gids: Vec<u32>,
}

impl Access {
    /// Whether `peer` may connect.
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        (self.uids.is_empty() && self.gids.is_empty())
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
    }
}

/// A verified transfer and who sent it.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// The sender, as the kernel recorded it at `connect`.
    pub peer: PeerCredentials,
    /// The connection's number, counted from 1 in the order the service
    /// accepted them. With the transfer's id it names a transfer uniquely
    /// for the life of the service: ids are only unique per connection.
    pub connection: u64,
    /// The transfer, mapped read-only.
    pub transfer: &'a VerifiedTransfer,
}

/// Stops a running [`Service`]: it stops accepting, lets every connection
/// finish (or reject) what it has received, answers, and returns.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    writer: Arc<UnixStream>,
}

impl ShutdownHandle {
    /// Asks the service to stop. Safe to call from any thread, many times.
    pub fn shutdown(&self) {
        // A full buffer already holds a wake-up: nothing is lost.
        let _ = (&*self.writer).write(&[1]);
    }

    /// An fd that a signal handler may write to (signal-hook's
    /// `low_level::pipe::register`), to the same effect as [`Self::shutdown`].
    pub fn signal_fd(&self) -> io::Result<OwnedFd> {
        self.writer.as_fd().try_clone_to_owned()
    }
}

/// What a service did, for logs and tests.
#[derive(Debug, Default)]
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
    policy: Policy,
    limits: Limits,
    budget: Arc<MappedBudget>,
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

/// A receiving service. See the module documentation.
#[derive(Debug)]
pub struct Service {
    listener: Listener,
    access: Access,
    budget: Arc<MappedBudget>,
    stats: Arc<ServiceStats>,
    wake_reader: UnixStream,
    shutdown: ShutdownHandle,
    /// Held open so that, when fds run out, one can be freed to accept and
    /// refuse a peer rather than leave it hanging in the backlog.
    reserve_fd: Option<File>,
}

fn reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Answers a connection we will not serve, then closes it so that the peer
/// reads the `Reject` before the end of the connection.
fn refuse(socket: OwnedFd, reason: RejectReason, message: impl Display, stats: &ServiceStats) {
    stats.rejected.fetch_add(1, Ordering::Relaxed);
    let _ = fdpass::set_timeouts(socket.as_fd(), None, Some(Duration::from_secs(1)));
    if let Ok(bytes) = encode(&Message::Reject(Reject::new(
        0,
        reason,
        message.to_string(),
    ))) {
        let _ = fdpass::send(socket.as_fd(), &bytes, &[]);
    }
    fdpass::close_after_answer(socket.as_fd(), REFUSED_DISCARD);
}

/// Most messages a refused peer already queued that are discarded before
/// its connection closes (see [`fdpass::close_after_answer`]).
const REFUSED_DISCARD: usize = 16;

impl Service {
    /// A service on `listener`, which supplies the policy and the limits.
    pub fn new(listener: Listener, access: Access) -> io::Result<Service> {
        let (wake_reader, writer) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        wake_reader.set_nonblocking(true)?;
        let budget = MappedBudget::new(listener.limits().max_mapped_total);
        Ok(Service {
            listener,
            access,
            budget,
            stats: Arc::default(),
            wake_reader,
            shutdown: ShutdownHandle {
                writer: Arc::new(writer),
            },
            reserve_fd: reserve(),
        })
    }

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
            policy: self.listener.policy(),
            limits: self.listener.limits().clone(),
            budget: Arc::clone(&self.budget),
            handler,
            stats: Arc::clone(&self.stats),
            open: Mutex::new(HashMap::new()),
        });
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next_connection = 0u64;
        loop {
            let mut fds = [
                PollFd::new(self.listener.socket(), PollFlags::POLLIN),
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
        for thread in threads {
            let _ = thread.join();
        }
        let mut drain = [0u8; 64];
        while matches!((&self.wake_reader).read(&mut drain), Ok(n) if n > 0) {}
        Ok(())
    }

    /// Accepts one connection; when fds have run out, frees the reserve to
    /// accept and refuse it, so the peer hears why instead of waiting.
    fn accept(&mut self) -> Option<OwnedFd> {
        match self.listener.accept_socket() {
            Ok(socket) => Some(socket),
            Err(error) if matches!(error.errno(), Some(Errno::EMFILE | Errno::ENFILE)) => {
                self.reserve_fd = None;
                if let Ok(socket) = self.listener.accept_socket() {
                    tracing::warn!("out of file descriptors: refusing a connection");
                    refuse(
                        socket,
                        RejectReason::ResourceExhausted,
                        "the receiver is out of file descriptors; try again later",
                        &self.stats,
                    );
                }
                self.reserve_fd = reserve();
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
        let peer = match fdpass::peer_credentials(socket.as_fd()) {
            Ok(peer) => peer,
            Err(error) => {
                tracing::warn!("peer credentials unavailable, refusing: {error}");
                return refuse(
                    socket,
                    RejectReason::NotAllowed,
                    "peer credentials unavailable",
                    &self.stats,
                );
            }
        };
        if !self.access.allows(&peer) {
            tracing::info!(%peer, verdict = "NotAllowed", "refused connection");
            return refuse(
                socket,
                RejectReason::NotAllowed,
                format_args!("{peer} is not allowed to send to this receiver"),
                &self.stats,
            );
        }
        let active = shared.stats.active_connections.load(Ordering::Acquire);
        if active >= shared.limits.max_connections {
            tracing::info!(%peer, verdict = "TooManyConnections", "refused connection");
            return refuse(
                socket,
                RejectReason::TooManyConnections,
                format_args!(
                    "the receiver serves its limit of {} connections; try again later",
                    shared.limits.max_connections
                ),
                &self.stats,
            );
        }
        let Ok(duplicate) = socket.try_clone() else {
            return refuse(
                socket,
                RejectReason::ResourceExhausted,
                "the receiver is out of file descriptors",
                &self.stats,
            );
        };
        let slot = Slot::take(shared, number, duplicate);
        let spawned = std::thread::Builder::new()
            .name(format!("sealpass-conn-{number}"))
            .spawn(move || {
                serve_connection(&slot.shared, socket, peer, number);
                drop(slot);
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            // The socket and the slot went down with the closure: the peer
            // sees a close, and the slot is free again.
            Err(error) => tracing::warn!("cannot start a thread for {peer}: {error}"),
        }
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

fn serve_connection<H, E>(shared: &Shared<H>, socket: OwnedFd, peer: PeerCredentials, number: u64)
where
    H: Fn(&Delivery<'_>) -> Result<(), E>,
    E: Display,
{
    let mut connection = Connection::new(socket, shared.policy);
    if let Err(error) =
        connection.set_limits(shared.limits.clone(), Some(Arc::clone(&shared.budget)))
    {
        tracing::warn!(%peer, "cannot set socket timeouts: {error}");
        return;
    }
    tracing::debug!(%peer, "connected");
    while connection.is_open() {
        let started = Instant::now();
        let outcome = connection.serve_one(|transfer| {
            run_handler(
                &shared.handler,
                &Delivery {
                    peer,
                    connection: number,
                    transfer,
                },
            )
        });
        let micros = started.elapsed().as_micros() as u64;
        match outcome {
            Ok(Outcome::Accepted {
                id,
                segments,
                bytes,
            }) => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, id, segments, bytes, verdict = "Ack", micros, "transfer");
            }
            Ok(Outcome::Rejected {
                id,
                reason,
                message,
            }) => {
                shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, id, verdict = %reason, micros, "transfer rejected: {message}");
            }
            Ok(Outcome::Closed) => break,
            Err(error @ ServeError::Answer { .. }) => {
                tracing::info!(%peer, "connection ended: {}", crate::ErrorChain(&error));
                break;
            }
            Err(error) => {
                tracing::warn!(%peer, "connection failed: {}", crate::ErrorChain(&error));
                break;
            }
        }
    }
    tracing::debug!(%peer, "disconnected");
}
