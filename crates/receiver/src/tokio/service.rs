//! The async service: many peers on one runtime, each connection a task.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use ::tokio::sync::watch;
use ::tokio::task::JoinSet;
use sealpass_kernel::fdpass::PeerCredentials;
use sealpass_proto::{MappedBudget, RejectReason, Version};

use crate::ErrorChain;
use crate::connection::Event;
use crate::service::{SHUTDOWN_GRACE, ServiceStats, ShutdownHandle};
use crate::transfer::VerifiedSegment;

use super::{Connection, Listener};

/// A verified transfer as the async [`Service`]'s handler gets it: owned,
/// segments and all. The service answers it by the handler's result.
#[derive(Debug)]
#[non_exhaustive]
pub struct OwnedDelivery {
    /// The sender, as the kernel recorded it at `connect`.
    pub peer: PeerCredentials,
    /// The connection's number, from 1 in accept order.
    pub connection: u64,
    /// The transfer's id (unique on its connection).
    pub id: u64,
    /// The sender's protocol version.
    pub version: Version,
    /// The segments, mapped read-only, each counted in the memory budgets
    /// until dropped (the handler may keep them).
    pub segments: Vec<VerifiedSegment>,
    /// The sender's own fields (protocol 1.1).
    pub metadata: sealpass_proto::Metadata,
}

impl OwnedDelivery {
    /// The segment named `name` (names are unique within a transfer), as
    /// [`IncomingTransfer::segment`](crate::IncomingTransfer::segment) finds
    /// it.
    pub fn segment(&self, name: &str) -> Option<&VerifiedSegment> {
        self.segments.iter().find(|segment| segment.name() == name)
    }
}

/// A receiving service on one tokio runtime: every connection a task, with
/// the limits, access rules and shutdown of the blocking
/// [`Service`](crate::Service).
///
/// ```
/// use sealpass_receiver::tokio::{Listener, Service};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("service.sock");
/// let service = Service::new(Listener::bind(&socket)?)?;
/// let shutdown = service.shutdown_handle();
/// let running = tokio::spawn(service.run(|delivery| async move {
///     let bytes: usize = delivery.segments.iter().map(|s| s.bytes().len()).sum();
///     println!("connection {}: {bytes} bytes", delivery.connection);
///     Ok::<(), String>(()) // Err(..) or a panic: Reject(ApplicationRejected)
/// }));
/// let mut sender = sealpass_sender::tokio::Sender::connect(&socket).await?;
/// let frame = sealpass_sender::SealedSegment::from_bytes("frame", b"hi", sealpass_sender::Seals::SENDER_DEFAULT)?;
/// assert!(sender.send(&[frame]).await?.is_accepted());
/// shutdown.shutdown();
/// running.await??;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Service {
    listener: Listener,
    budget: Arc<MappedBudget>,
    stats: Arc<ServiceStats>,
    stop: Arc<watch::Sender<bool>>,
    shutdown: ShutdownHandle,
    /// Read end of the wake-up pair: a byte written to
    /// [`ShutdownHandle::signal_fd`] (from a signal handler) stops it too.
    wake_reader: std::os::unix::net::UnixStream,
}

/// Ends a task when dropped, on every path out of `run`.
struct AbortOnDrop(::tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a connection as served while it lives.
struct Active(Arc<ServiceStats>);

impl Active {
    fn new(stats: &Arc<ServiceStats>) -> Active {
        stats.active_connections.fetch_add(1, Ordering::AcqRel);
        Active(Arc::clone(stats))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Service {
    /// A service on `listener`, whose [`Config`](crate::Config) supplies the policy, the
    /// limits and who may connect.
    /// Fails as the blocking one does, when the wake-up pair made with the
    /// listener cannot be set up.
    pub fn new(mut listener: Listener) -> io::Result<Service> {
        let (wake_reader, writer) = listener.inner.take_wake_pair()?;
        wake_reader.set_nonblocking(true)?;
        let budget = listener.inner.shared_budget();
        let stop = Arc::new(watch::channel(false).0);
        Ok(Service {
            listener,
            budget,
            stats: Arc::default(),
            shutdown: ShutdownHandle::with_stop(writer, Arc::clone(&stop))?,
            stop,
            wake_reader,
        })
    }

    crate::service::service_accessors!();

    /// Serves until shut down: each verified transfer goes to `handler`, and
    /// the peer gets `Ack` once its future returns `Ok`, or
    /// `Reject(ApplicationRejected)` with its error (a panic included).
    /// Returns once every connection has finished; the socket file is gone.
    pub async fn run<H, F, E>(self, handler: H) -> io::Result<()>
    where
        H: Fn(OwnedDelivery) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + 'static,
    {
        let Service {
            listener,
            budget: _,
            stats,
            stop,
            shutdown: _,
            wake_reader,
        } = self;
        // A byte on the wake-up pair (ShutdownHandle::signal_fd) stops it too.
        let woken = Arc::clone(&stop);
        let wake_reader = super::register(std::os::fd::OwnedFd::from(wake_reader))?;
        let watching = ::tokio::spawn(async move {
            if wake_reader.readable().await.is_ok() {
                woken.send_replace(true);
            }
        });
        let _watching = AbortOnDrop(watching);
        let handler = Arc::new(handler);
        let mut connections = JoinSet::new();
        let mut stopping = stop.subscribe();
        let mut number = 0u64;
        loop {
            let admitted = ::tokio::select! {
                admitted = listener.accept_admitted(&stats) => admitted,
                _ = stopping.wait_for(|stop| *stop) => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let Some(admitted) = admitted else {
                continue;
            };
            let peer = admitted.peer;
            number += 1;
            let connection = match Connection::admitted(listener.inner.admission(admitted)) {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%peer, "cannot serve the connection: {}", ErrorChain(&error));
                    continue;
                }
            };
            connections.spawn(serve(
                connection,
                peer,
                number,
                Arc::clone(&handler),
                Active::new(&stats),
                stop.subscribe(),
            ));
        }
        // Stop accepting first: the socket file goes with the listener.
        drop(listener);
        if !connections.is_empty() {
            tracing::info!(
                "stopping: finishing {} connection(s): answering what they read (at most {} s)",
                connections.len(),
                SHUTDOWN_GRACE.as_secs()
            );
        }
        let grace = ::tokio::time::sleep(SHUTDOWN_GRACE);
        ::tokio::pin!(grace);
        loop {
            ::tokio::select! {
                next = connections.join_next() => if next.is_none() { break },
                () = &mut grace => {
                    tracing::warn!(
                        "stopping: {} connection(s) still not done after {} s (a peer that does \
                         not read its answers?): closing them",
                        connections.len(),
                        SHUTDOWN_GRACE.as_secs()
                    );
                    connections.abort_all();
                    while connections.join_next().await.is_some() {}
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Serves one connection until it ends; on shutdown, stops reading and
/// answers what was already queued.
async fn serve<H, F, E>(
    mut connection: Connection,
    peer: PeerCredentials,
    number: u64,
    handler: Arc<H>,
    active: Active,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(OwnedDelivery) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + 'static,
{
    let stats = Arc::clone(&active.0);
    let mut stopping = false;
    loop {
        let event = if stopping {
            connection.next_event().await
        } else {
            ::tokio::select! {
                event = connection.next_event() => event,
                _ = stop.wait_for(|stop| *stop) => {
                    connection.stop_reading();
                    stopping = true;
                    continue;
                }
            }
        };
        let started = Instant::now();
        let transfer = match event {
            Ok(Event::Transfer(transfer)) => transfer,
            Ok(Event::Refused(reject)) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, id = reject.id, verdict = %reject.reason, "transfer rejected: {}", reject.message);
                continue;
            }
            Ok(Event::Closed) => break,
            Err(error) => {
                tracing::info!(%peer, "connection ended: {}", ErrorChain(&error));
                break;
            }
        };
        let (id, version, bytes) = (transfer.id(), transfer.version(), transfer.total_bytes());
        let mut transfer = transfer;
        let metadata = transfer.take_metadata();
        let (segments, responder) = transfer.into_parts();
        let count = segments.len();
        let delivery = OwnedDelivery {
            peer,
            connection: number,
            id,
            version,
            segments,
            metadata,
        };
        let handled = CatchUnwind(Box::pin(handler(delivery))).await;
        let answered = match handled {
            Ok(Ok(())) => responder.accept().map(|()| RejectReason::Unknown(0)),
            Ok(Err(error)) => responder
                .reject(error)
                .map(|()| RejectReason::ApplicationRejected),
            Err(panic) => {
                tracing::error!(%peer, id, "the handler panicked: {panic}");
                responder
                    .reject(format_args!(
                        "the receiving application failed (it panicked: {panic})"
                    ))
                    .map(|()| RejectReason::ApplicationRejected)
            }
        };
        let micros = started.elapsed().as_micros() as u64;
        match answered {
            Ok(RejectReason::ApplicationRejected) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, id, verdict = "ApplicationRejected", micros, "transfer rejected");
            }
            Ok(_) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, id, segments = count, bytes, verdict = "Ack", micros, "transfer");
            }
            Err(error) => {
                tracing::info!(%peer, "connection ended: {}", ErrorChain(&error));
                break;
            }
        }
    }
    drop(active);
}

/// A handler's future, with a panic caught as an error (the peer is answered
/// `ApplicationRejected`, the connection goes on).
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(context))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".to_owned()))),
        }
    }
}
