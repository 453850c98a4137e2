//! The receiver on tokio (feature `tokio`): a listener, a connection and a
//! service that drive the same [`sealpass_proto::Session`] as the blocking
//! ones, through [`AsyncFd`] on non-blocking sockets. No rule is restated
//! here: every decision is the session's, and taking a message through it
//! (facts, grants, mappings, delivery) is the same code as the blocking
//! driver's. Only the waiting differs: for readiness instead of in
//! `recvmsg`, and for the session's deadline with the runtime's timer.
//!
//! Answers are sent without blocking. Those the peer has no room for wait in
//! the connection (at most one batch of them), and a small task per
//! connection sends them, in order, once there is room (at most the idle
//! timeout; then the connection ends). A message of 16 fds or more is
//! inspected and mapped, and a transfer of 4 MiB or 16 segments unmapped,
//! on the runtime's blocking pool: those system calls cost milliseconds.
//!
//! ```
//! use sealpass_receiver::tokio::Listener;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let socket = dir.path().join("doc.sock");
//! let listener = Listener::bind(&socket)?;
//! # let path = socket.clone();
//! # let sender = tokio::spawn(async move {
//! #     let mut sender = sealpass_sender::tokio::Sender::connect(&path).await?;
//! #     let frame = sealpass_sender::SealedSegment::from_bytes("frame", b"hello", sealpass_sender::Seals::SENDER_DEFAULT)?;
//! #     sender.send(&[frame]).await
//! # });
//! let mut connection = listener.accept().await?;
//! while let Some(transfer) = connection.receive().await? {
//!     println!("{}: {:?}", transfer.id(), transfer.segments()[0].bytes());
//!     transfer.accept()?; // never blocks: sent now, or as soon as there is room
//! }
//! # assert!(sender.await??.is_accepted());
//! # Ok(())
//! # }
//! ```

mod listener;
mod service;

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::tokio::io::Interest;
use ::tokio::io::unix::AsyncFd;
use ::tokio::sync::Notify;
use nix::errno::Errno;
use sealpass_kernel::fdpass::{self, PeerCredentials, ReceiveBatch, TransportError};
use sealpass_proto::Config;
use sealpass_proto::limits::MAX_MESSAGE_LEN;

use crate::connection::{
    Core, Event, Gathered, Inspecting, Judging, Link, Mapping as JudgedMapping, Opened, ServeError,
    Socket, admit_alone, gather_facts, map_all,
};
use crate::listener::Admission;
use crate::transfer::IncomingTransfer;

pub use self::listener::Listener;
pub use self::service::{OwnedDelivery, Service};
pub use crate::service::ShutdownHandle;

/// Registers `fd` with the runtime's reactor, for reading and writing.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `register_with_interest` asks that the fd stay open and the same
    // for the AsyncFd's life. It owns the `OwnedFd`, which closes the fd only
    // when dropped (after deregistration) and always returns the same fd.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
        .map_err(io::Error::from)
}

fn transport(error: &io::Error, op: fdpass::Op) -> TransportError {
    TransportError::Sys {
        op,
        errno: error.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
    }
}

thread_local! {
    /// The receive batch of the connections served on this thread, lent to
    /// one while it has messages in it.
    static RECEIVE_BATCH: Cell<Option<ReceiveBatch>> = const { Cell::new(None) };
}

/// One peer's connection on tokio: [`Connection::receive`] waits for the next
/// verified transfer without blocking the runtime. The transfers are the
/// same owned [`IncomingTransfer`]s as the blocking driver's: keep them, move
/// them, answer them from anywhere; answers leave in order.
#[derive(Debug)]
pub struct Connection {
    core: Core,
    /// A message with many fds being judged off the runtime's thread: kept
    /// here, so that a call cancelled while it waits leaves it for the next
    /// to finish, and its answer keeps its place.
    off_runtime: Option<OffRuntime>,
}

/// Messages with this many fds or more are inspected and mapped on the
/// blocking pool: 253 of them took 1.7 to 3.3 ms of system calls
/// (`F_GET_SEALS`, `fstat`, `readlink`, `mmap` each), which would stall
/// every other task on the runtime's thread for that long.
const OFF_RUNTIME_FDS: usize = 16;

/// The system calls of judging one message, running on the blocking pool.
#[derive(Debug)]
enum OffRuntime {
    /// Asking the kernel about each fd.
    Gathering(::tokio::task::JoinHandle<(Inspecting, Gathered)>),
    /// Mapping the verified segments.
    Mapping(::tokio::task::JoinHandle<Mapped>),
}

/// A message's verified segments, their mappings, and the first mapping
/// that failed, if one did.
type Mapped = (
    JudgedMapping,
    Vec<Option<crate::mapping::Mapping>>,
    Option<(usize, io::Error)>,
);

impl Connection {
    /// Serves a connected `SOCK_SEQPACKET` socket under `config`. Call it
    /// within a tokio runtime.
    pub fn new(socket: OwnedFd, config: Config) -> Result<Connection, ServeError> {
        Connection::admitted(admit_alone(socket, config)?)
    }

    /// Serves a connection admitted by its listener or on its own.
    pub(super) fn admitted(admission: Admission) -> Result<Connection, ServeError> {
        let opened = Opened::from(admission);
        fdpass::set_nonblocking(opened.socket.as_fd()).map_err(ServeError::SetTimeout)?;
        let socket = register(opened.socket)
            .map_err(|error| ServeError::SetTimeout(transport(&error, fdpass::Op::Poll)))?;
        let (config, peer) = (opened.config, opened.peer);
        let flusher = Arc::new(Notify::new());
        let mut link = Link::new(Socket::Async(socket), opened.session, opened.admission);
        link.flusher = Some(Arc::clone(&flusher));
        let link = Arc::new(link);
        ::tokio::spawn(flush_when_there_is_room(
            Arc::downgrade(&link),
            flusher,
            config.idle_timeout(),
        ));
        // The receive batch is lent by the thread while it holds messages (`next_event`).
        let mut core = Core::new(link, config, peer);
        core.release = Some(::tokio::runtime::Handle::current());
        Ok(Connection {
            core,
            off_runtime: None,
        })
    }

    crate::connection::connection_accessors!();

    /// The next verified transfer, waiting for it; messages refused on the
    /// way are answered and skipped. `None` once nothing more will come.
    ///
    /// Cancel-safe: a message is received and judged within one poll, so a
    /// dropped future has taken nothing from the socket, and no fd or budget
    /// is held for it. A message of 16 fds or more is inspected and mapped
    /// on the blocking pool instead, so as not to stall the runtime: a call
    /// dropped meanwhile leaves it to the next call, which finishes it
    /// first; its fds and budget are held until then.
    pub async fn receive(&mut self) -> Result<Option<IncomingTransfer>, ServeError> {
        loop {
            match self.next_event().await? {
                Event::Transfer(transfer) => return Ok(Some(transfer)),
                Event::Refused(_) => {}
                Event::Closed => return Ok(None),
            }
        }
    }

    /// Waits until the socket is readable with no answer pending, under the
    /// session's deadline: `Err(_)` a deadline's refusal, or the end.
    async fn readable<'a>(
        &mut self,
        socket: &'a AsyncFd<OwnedFd>,
    ) -> Result<Result<::tokio::io::unix::AsyncFdReadyGuard<'a, OwnedFd>, Event>, ServeError> {
        loop {
            // No reading while an answer waits for room in the peer's queue:
            // a peer that does not read its answers must not make this side
            // queue answers without bound.
            if self.core.link.lock().has_unsent() {
                self.wait_for_room(socket).await?;
                continue;
            }
            let Some(deadline) = self.core.deadline() else {
                return Ok(Err(Event::Closed));
            };
            let readable = match deadline {
                Some(deadline) => {
                    let at = ::tokio::time::Instant::from_std(deadline);
                    match ::tokio::time::timeout_at(at, socket.readable()).await {
                        Ok(readable) => readable,
                        Err(_) => {
                            if let Some(reject) = self.core.timed_out(Instant::now())? {
                                return Ok(Err(Event::Refused(reject)));
                            }
                            continue;
                        }
                    }
                }
                None => socket.readable().await,
            };
            return readable
                .map(Ok)
                .map_err(|error| ServeError::Receive(transport(&error, fdpass::Op::Poll)));
        }
    }

    /// What the next message brings: a transfer, a refusal (answered), or
    /// the end. A silent peer gets `Reject(Timeout)` at the session's
    /// deadline, on the runtime's timer. Cancel-safe as
    /// [`Connection::receive`] is.
    pub(crate) async fn next_event(&mut self) -> Result<Event, ServeError> {
        let link = Arc::clone(&self.core.link);
        let socket = async_socket(&link)?;
        loop {
            // A message a cancelled call left half judged comes first, then
            // those read with an earlier one.
            if let Some(event) = self.finish_off_runtime().await {
                return event;
            }
            if let Some(event) = self.next_in_batch() {
                return event;
            }
            if self.off_runtime.is_some() {
                continue;
            }
            let mut ready = match self.readable(socket).await? {
                Ok(ready) => ready,
                Err(event) => return Ok(event),
            };
            // The batch's buffers (32 of 128 KiB, pages only where the
            // kernel writes) are the thread's, lent while the connection has
            // messages in them: an idle connection holds none. No await
            // comes between the receive and taking the batch.
            let mut batch = RECEIVE_BATCH
                .with(Cell::take)
                .unwrap_or_else(|| ReceiveBatch::new(fdpass::batch_slots(), MAX_MESSAGE_LEN));
            match fdpass::try_receive_batch(socket.get_ref().as_fd(), &mut batch) {
                Ok(Some(count)) => {
                    if count > 1 {
                        // The answers to messages read together leave
                        // together: when the batch is done, or sooner, once
                        // this task yields (the flusher then runs).
                        self.core.link.lock().hold_answers();
                    }
                    self.core.batch = Some(batch);
                }
                Ok(None) => {
                    RECEIVE_BATCH.with(|cell| cell.set(Some(batch)));
                    ready.clear_ready();
                }
                Err(error) => {
                    RECEIVE_BATCH.with(|cell| cell.set(Some(batch)));
                    return Err(self.core.receive_failed(error));
                }
            }
        }
    }

    /// Takes the next message of the batch through the session: `None`
    /// once the batch is done (its buffers go back to the thread) or when
    /// the message went off the runtime to be judged (16 fds or more). Once
    /// the connection stopped reading, the rest are discarded and their
    /// fds closed, as messages still queued are when the socket closes.
    fn next_in_batch(&mut self) -> Option<Result<Event, ServeError>> {
        let mut batch = self.core.batch.take()?;
        let event = loop {
            let Some((received, bytes)) = batch.take_next() else {
                RECEIVE_BATCH.with(|cell| cell.set(Some(batch)));
                return self.release_held().err().map(Err);
            };
            if !self.core.is_open() {
                batch.recycle(received.fds);
                continue;
            }
            if received.fds.len() < OFF_RUNTIME_FDS {
                let event = self.core.judge_bytes(received, bytes, Instant::now());
                batch.recycle(std::mem::take(&mut self.core.spare_fds));
                break Some(event);
            }
            match self.core.judge_header(received, bytes, Instant::now()) {
                Judging::Done(event) => break Some(event),
                Judging::Inspect(inspecting) => {
                    let mut gathered = std::mem::take(&mut self.core.gathered);
                    self.off_runtime = Some(OffRuntime::Gathering(::tokio::task::spawn_blocking(
                        move || {
                            gather_facts(&inspecting.fds, &mut gathered);
                            (inspecting, gathered)
                        },
                    )));
                    break None;
                }
            }
        };
        // The last of the batch, or the end: nothing is held past it.
        if batch.untaken() == 0 || !self.core.is_open() {
            if let Err(error) = self.release_held() {
                return Some(Err(error));
            }
        }
        self.core.batch = Some(batch);
        event
    }

    /// Sends the answers held for the batch, if any are.
    fn release_held(&self) -> Result<(), ServeError> {
        let link = &self.core.link;
        let mut session = link.lock();
        if session.answers_held() {
            session.release_answers();
            link.flush(&mut session)?;
        }
        Ok(())
    }

    /// Finishes judging a message whose system calls run on the blocking
    /// pool, if there is one: `None` when there is none. Cancelled while it
    /// waits, it leaves the job for the next call.
    async fn finish_off_runtime(&mut self) -> Option<Result<Event, ServeError>> {
        loop {
            match self.off_runtime.as_mut()? {
                OffRuntime::Gathering(job) => {
                    let joined = job.await;
                    self.off_runtime = None;
                    let (inspecting, gathered) = match joined {
                        Ok(done) => done,
                        Err(error) => return Some(Err(self.job_failed(error))),
                    };
                    self.core.gathered = gathered;
                    let mapping = match self.core.judge_facts(inspecting) {
                        Ok(mapping) => mapping,
                        Err(event) => return Some(event),
                    };
                    let config = Arc::clone(&self.core.config);
                    let mut mappings = std::mem::take(&mut self.core.spare_mappings);
                    self.off_runtime = Some(OffRuntime::Mapping(::tokio::task::spawn_blocking(
                        move || {
                            let failed = map_all(&mapping, &config, &mut mappings);
                            (mapping, mappings, failed)
                        },
                    )));
                }
                OffRuntime::Mapping(job) => {
                    let joined = job.await;
                    self.off_runtime = None;
                    return Some(match joined {
                        Ok((mapping, mappings, failed)) => {
                            self.core.judge_mapped(mapping, mappings, failed)
                        }
                        Err(error) => Err(self.job_failed(error)),
                    });
                }
            }
        }
    }

    /// A job on the blocking pool failed (it panicked, or the runtime is
    /// shutting down): the message it held is lost, so the connection ends.
    fn job_failed(&self, error: ::tokio::task::JoinError) -> ServeError {
        self.core.link.lock().abort();
        ServeError::Receive(transport(
            &io::Error::other(format!("judging a message off the runtime failed: {error}")),
            fdpass::Op::Receive,
        ))
    }

    /// Waits (at most the idle timeout) for room for the pending answer, and
    /// sends what is due; a peer that makes no room loses the connection.
    async fn wait_for_room(&self, socket: &AsyncFd<OwnedFd>) -> Result<(), ServeError> {
        match room_in(socket, self.core.config.idle_timeout()).await {
            Ok(mut ready) => {
                ready.clear_ready();
                let mut session = self.core.link.lock();
                self.core.link.flush(&mut session)?;
                Ok(())
            }
            Err(error) => {
                let answer = self.core.link.lock().send_failed();
                Err(ServeError::Answer(crate::AnswerError::Send {
                    answer,
                    source: transport(&error, fdpass::Op::Send),
                }))
            }
        }
    }

    /// Stops reading from the peer: messages already queued are still
    /// served, then [`Connection::receive`] returns `None`.
    pub fn stop_reading(&self) {
        let _ = fdpass::shut_down_reading(self.core.link.socket.fd());
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.core.link.socket.fd()
    }
}

/// The socket of an async connection's link (never a blocking one).
fn async_socket(link: &Link) -> Result<&AsyncFd<OwnedFd>, ServeError> {
    match &link.socket {
        Socket::Async(socket) => Ok(socket),
        Socket::Blocking(_) => Err(ServeError::Receive(TransportError::Sys {
            op: fdpass::Op::Receive,
            errno: Errno::EINVAL,
        })),
    }
}

/// Waits for room in the peer's queue, at most `idle` (`ETIMEDOUT` then).
async fn room_in(
    socket: &AsyncFd<OwnedFd>,
    idle: Option<Duration>,
) -> io::Result<::tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match idle {
        Some(idle) => ::tokio::time::timeout(idle, socket.writable())
            .await
            .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(nix::libc::ETIMEDOUT))),
        None => socket.writable().await,
    }
}

/// Sends the answers that found no room in the peer's queue, in order, as
/// room comes; ends with the connection. Waiting for room is bounded by the
/// idle timeout: a peer that reads no answers loses the connection.
async fn flush_when_there_is_room(link: Weak<Link>, wake: Arc<Notify>, idle: Option<Duration>) {
    loop {
        wake.notified().await;
        loop {
            let Some(link) = link.upgrade() else {
                return;
            };
            {
                // Answers held for a batch go once the connection's task
                // has yielded (this task runs then), whatever it awaits.
                let mut session = link.lock();
                session.release_answers();
                if link.flush(&mut session).is_err() || !session.has_unsent() {
                    break;
                }
            }
            let Socket::Async(socket) = &link.socket else {
                return;
            };
            match room_in(socket, idle).await {
                Ok(mut ready) => ready.clear_ready(),
                Err(_) => {
                    link.lock().send_failed();
                    return;
                }
            }
        }
    }
}
