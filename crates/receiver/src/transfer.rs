//! What a receiver hands the application: owned transfers, their verified
//! segments, and the responder that answers for them in protocol order.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use sealpass_proto::PeerCredentials;
use sealpass_proto::session::Ticket;
use sealpass_proto::{Metadata, Reservation, Seals, Segment, Version};

use crate::connection::{AnswerError, Link};

/// One verified memfd: its sealed fd, mapped read-only, its bytes counted
/// in the receiver's memory budgets until it is dropped.
///
/// It can leave the connection's thread, outlive the answer, become a
/// `bytes::Bytes` without a copy (feature `bytes`), or give up its fd to be
/// forwarded ([`VerifiedSegment::into_fd`]).
///
/// ```
/// use sealpass_sender::{Seals, SealedSegment, Sender};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("doc.sock");
/// # let path = socket.clone();
/// # let sender = std::thread::spawn(move || -> Result<sealpass_sender::Verdict, sealpass_sender::SendError> {
/// #     // The listener may not be bound yet: wait for it.
/// #     let mut sender = sealpass_sender::Sender::connect_with_retry(&path, std::time::Duration::from_secs(20))?;
/// #     sender.send(&[sealpass_sender::SealedSegment::from_bytes("frame", &[7; 4096], sealpass_sender::Seals::SENDER_DEFAULT)?])
/// # });
/// let mut connection = sealpass_receiver::Listener::bind(&socket)?.accept()?;
/// let transfer = connection.receive()?.expect("a transfer");
/// let (mut segments, responder) = transfer.into_parts();
/// responder.accept()?; // answered; the bytes are still ours
/// let segment = segments.pop().expect("one segment");
/// assert_eq!(segment.bytes(), &[7; 4096][..]);
/// assert_eq!(connection.mapped(), 4096); // counted until dropped
///
/// // Pass the same sealed memfd on, untouched, to another receiver.
/// let forwarded = SealedSegment::from_sealed_fd(segment.into_fd(), Seals::SENDER_DEFAULT)?;
/// assert_eq!(connection.mapped(), 0);
/// # let next = dir.path().join("next.sock");
/// # let listener = sealpass_receiver::Listener::bind(&next)?;
/// # let onward = std::thread::spawn(move || -> Result<(), sealpass_receiver::ServeError> {
/// #     let transfer = listener.accept()?.receive()?.expect("forwarded");
/// #     assert_eq!(transfer.segments()[0].bytes(), &[7; 4096][..]);
/// #     Ok(transfer.accept()?)
/// # });
/// assert!(Sender::connect(&next)?.send(&[forwarded])?.is_accepted());
/// # onward.join().expect("onward")?;
/// # assert!(sender.join().expect("sender")?.is_accepted());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct VerifiedSegment {
    /// Confirmed by the kernel: its name, its size, and all its seals (which
    /// may be more than were declared).
    confirmed: Segment,
    pages: Pages,
    fd: OwnedFd,
}

/// A segment's mapping and its share of the memory budgets, released
/// together: the mapping first, then the bytes are given back.
#[derive(Debug)]
struct Pages {
    mapping: Option<crate::mapping::Mapping>,
    reservation: Option<Reservation>,
    /// Where to release a big mapping: on an async runtime, unmapping many
    /// resident pages takes milliseconds (`munmap` frees each one), so it
    /// goes to the runtime's blocking pool instead of stalling its thread.
    #[cfg(feature = "tokio")]
    release: Option<tokio::runtime::Handle>,
}

/// From this size a mapping received on an async runtime is released on its
/// blocking pool. Unmapping costs in proportion to the pages read: measured
/// here (release build, 4 KiB pages, every page read) 28 µs for 1 MiB,
/// 104 µs for 4 MiB, 1.7 ms for 64 MiB, 9.4 ms for 256 MiB. Below 4 MiB
/// the hand-over to another thread costs about as much as the unmap.
#[cfg(feature = "tokio")]
pub(crate) const RELEASE_OFF_RUNTIME: u64 = 4 << 20;

impl Drop for Pages {
    fn drop(&mut self) {
        self.release();
    }
}

impl Pages {
    /// Unmaps, then gives the bytes back to the budgets; a second call
    /// finds nothing left to do.
    fn release(&mut self) {
        #[cfg(feature = "tokio")]
        if let Some(handle) = self.release.take() {
            let big = self
                .mapping
                .as_ref()
                .is_some_and(|mapping| mapping.len() as u64 >= RELEASE_OFF_RUNTIME);
            if big {
                let mapping = self.mapping.take();
                let reservation = self.reservation.take();
                drop(handle.spawn_blocking(move || {
                    drop(mapping);
                    drop(reservation);
                }));
            }
        }
        // Otherwise here, mapping first, then its share of the budget.
        drop(self.mapping.take());
        drop(self.reservation.take());
    }
}

/// A transfer's segments this many or more, or this many bytes together,
/// are released off an async runtime's thread as one job: unmapping 253
/// segments of 4 MiB less a page one by one on the runtime stalled it for
/// 65 to 206 ms.
#[cfg(feature = "tokio")]
const RELEASE_OFF_RUNTIME_SEGMENTS: usize = 16;

/// Drops a transfer's segments (unmapping them, then giving their bytes
/// back to the budgets), and then `done`. On an async runtime a transfer
/// big in total ([`RELEASE_OFF_RUNTIME`] bytes, or
/// [`RELEASE_OFF_RUNTIME_SEGMENTS`] segments) goes to the blocking pool as
/// one job; anything else is dropped here.
#[cfg_attr(not(feature = "tokio"), allow(unused_mut))]
pub(crate) fn release_all(
    mut segments: Vec<VerifiedSegment>,
    done: Option<crate::connection::Releasing>,
) {
    #[cfg(feature = "tokio")]
    {
        let mapped: u64 = segments
            .iter()
            .filter_map(|segment| segment.pages.mapping.as_ref())
            .map(|mapping| mapping.len() as u64)
            .sum();
        let big = mapped >= RELEASE_OFF_RUNTIME || segments.len() >= RELEASE_OFF_RUNTIME_SEGMENTS;
        let handle = segments
            .iter_mut()
            .filter_map(|segment| segment.pages.release.take())
            .last();
        if let (true, Some(handle)) = (big, handle) {
            drop(handle.spawn_blocking(move || {
                drop(segments);
                drop(done);
            }));
            return;
        }
    }
    drop(segments);
    drop(done);
}

impl VerifiedSegment {
    pub(crate) fn new(
        confirmed: Segment,
        mapping: Option<crate::mapping::Mapping>,
        fd: OwnedFd,
        reservation: Reservation,
    ) -> VerifiedSegment {
        VerifiedSegment {
            confirmed,
            pages: Pages {
                mapping,
                reservation: Some(reservation),
                #[cfg(feature = "tokio")]
                release: None,
            },
            fd,
        }
    }

    /// This segment, its mapping released on `runtime`'s blocking pool when
    /// big (see [`RELEASE_OFF_RUNTIME`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn released_on(mut self, runtime: Option<&tokio::runtime::Handle>) -> Self {
        self.pages.release = runtime.cloned();
        self
    }

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

    /// The bytes. They cannot change: the memfd is sealed against writes
    /// and shrinking.
    pub fn bytes(&self) -> &[u8] {
        self.pages.mapping.as_deref().unwrap_or_default()
    }

    /// Gives up the sealed memfd, to forward it to another process (a
    /// `sealpass_sender::SealedSegment::from_sealed_fd`, say) without
    /// touching the bytes. The mapping goes, and with it this segment's
    /// share of the memory budget.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The bytes as a `bytes::Bytes`, without a copy: the `Bytes` owns this
    /// segment, mapping and budget share included, until its last clone
    /// drops.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let socket = dir.path().join("doc.sock");
    /// # let path = socket.clone();
    /// # let sender = std::thread::spawn(move || -> Result<sealpass_sender::Verdict, sealpass_sender::SendError> {
    /// #     // The listener may not be bound yet: wait for it.
    /// #     let mut sender = sealpass_sender::Sender::connect_with_retry(&path, std::time::Duration::from_secs(20))?;
    /// #     sender.send(&[sealpass_sender::SealedSegment::from_bytes("frame", b"hello, bytes", sealpass_sender::Seals::SENDER_DEFAULT)?])
    /// # });
    /// let mut connection = sealpass_receiver::Listener::bind(&socket)?.accept()?;
    /// let transfer = connection.receive()?.expect("a transfer");
    /// let (mut segments, responder) = transfer.into_parts();
    /// let segment = segments.pop().expect("one segment");
    /// let mapped_at = segment.bytes().as_ptr();
    /// let bytes: bytes::Bytes = segment.into_bytes();
    /// assert_eq!(bytes.as_ptr(), mapped_at); // the mapping itself, no copy
    /// responder.accept()?;
    /// let hello = bytes.slice(0..5);
    /// assert_eq!(&hello[..], b"hello");
    /// # assert!(sender.join().expect("sender")?.is_accepted());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "bytes")]
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for VerifiedSegment {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl AsFd for VerifiedSegment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Answers one transfer: [`Responder::accept`] sends `Ack`,
/// [`Responder::reject`] `Reject(ApplicationRejected)`. Answers go out in
/// the order the transfers came, whatever order they are given in: one given
/// early waits for the earlier ones.
///
/// Dropped without an answer, it rejects the transfer
/// (`ApplicationRejected`, "dropped without an answer"), so the peer is never
/// left waiting.
#[derive(Debug)]
pub struct Responder {
    ticket: Option<Ticket>,
    link: Arc<Link>,
}

impl Responder {
    pub(crate) fn new(ticket: Ticket, link: Arc<Link>) -> Responder {
        Responder {
            ticket: Some(ticket),
            link,
        }
    }

    /// The id of the transfer this answers.
    pub fn id(&self) -> u64 {
        self.ticket.as_ref().map_or(0, Ticket::id)
    }

    /// Answers `Ack`: the transfer is the application's.
    pub fn accept(mut self) -> Result<(), AnswerError> {
        self.answer(Ok(()))
    }

    /// Answers `Reject(ApplicationRejected)`, with `why` for the sender.
    pub fn reject(mut self, why: impl Display) -> Result<(), AnswerError> {
        self.answer(Err(why.to_string()))
    }

    fn answer(&mut self, verdict: Result<(), String>) -> Result<(), AnswerError> {
        match self.ticket.take() {
            Some(ticket) => self.link.answer(ticket, verdict, Instant::now()),
            None => Ok(()),
        }
    }

    /// Answers and drops `segments`, in the order
    /// [`IncomingTransfer::accept`] describes.
    fn answer_releasing(
        mut self,
        verdict: Result<(), String>,
        segments: Vec<VerifiedSegment>,
    ) -> Result<(), AnswerError> {
        match self.ticket.take() {
            Some(ticket) => {
                self.link
                    .answer_then_release(ticket, verdict, segments, Instant::now())
            }
            None => {
                drop(segments);
                Ok(())
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.ticket.is_some() {
            // The peer hears about it either way; a send error has no one
            // to go to here.
            let _ = self.answer(Err(
                "the receiving application dropped the transfer without answering".to_owned(),
            ));
        }
    }
}

/// A transfer whose every segment the kernel vouched for, owned by the
/// application: it may be kept, queued, or moved to another thread, and
/// answered before or after its bytes are dropped.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("doc.sock");
/// # let listener = sealpass_receiver::Listener::bind(&socket)?;
/// # let sender = std::thread::spawn(move || -> Result<(), sealpass_sender::SendError> {
/// #     let mut sender = sealpass_sender::Sender::connect(&socket)?;
/// #     for n in 0..4u8 {
/// #         let segment = sealpass_sender::SealedSegment::filled("s", n, 4096, sealpass_sender::Seals::SENDER_DEFAULT)?;
/// #         assert!(sender.send(&[segment])?.is_accepted());
/// #     }
/// #     Ok(())
/// # });
/// # let mut connection = listener.accept()?;
/// let (work, results) = std::sync::mpsc::channel();
/// let worker = std::thread::spawn(move || {
///     for transfer in results {
///         let transfer: sealpass_receiver::IncomingTransfer = transfer;
///         let checksum: u64 = transfer.segments()[0].bytes().iter().map(|&b| u64::from(b)).sum();
///         println!("transfer {}: checksum {checksum}", transfer.id());
///         transfer.accept().ok(); // answers Ack and unmaps, in the order `accept` gives
///     }
/// });
/// while let Some(transfer) = connection.receive()? {
///     work.send(transfer)?; // the connection reads on while the worker works
/// }
/// # drop(work); worker.join().ok();
/// # sender.join().expect("sender")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct IncomingTransfer {
    id: u64,
    version: Version,
    peer: PeerCredentials,
    peer_pidfd: Option<Arc<OwnedFd>>,
    segments: Vec<VerifiedSegment>,
    metadata: Metadata,
    responder: Responder,
}

impl IncomingTransfer {
    pub(crate) fn new(
        version: Version,
        peer: PeerCredentials,
        peer_pidfd: Option<Arc<OwnedFd>>,
        segments: Vec<VerifiedSegment>,
        metadata: Metadata,
        responder: Responder,
    ) -> IncomingTransfer {
        IncomingTransfer {
            id: responder.id(),
            version,
            peer,
            peer_pidfd,
            segments,
            metadata,
            responder,
        }
    }

    /// The sender's id for it (unique on its connection).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The protocol version the sender wrote.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The sender, as the kernel recorded it at `connect` (`SO_PEERCRED`).
    /// Always known: a connection whose peer the kernel cannot name is
    /// refused before it serves anything.
    pub fn peer(&self) -> PeerCredentials {
        self.peer
    }

    /// A pidfd for the sender, taken at accept (`SO_PEERPIDFD`, Linux 6.5+;
    /// `None` on older kernels, or when it could not be had).
    ///
    /// It names the process that connected, for good: a pid can be reused
    /// once that process exits, a pidfd cannot. With it an application can
    /// tell whether that process is still running (the pidfd polls readable
    /// once it has exited; `pidfd_send_signal` with signal 0 fails with
    /// `ESRCH`), signal it without hitting a stranger, or read its pid now
    /// (`Pid:` in `/proc/self/fdinfo/FD`, -1 once it has exited). It does not
    /// say who the process is now: the credentials are those of `connect`,
    /// and the process may since have called `exec` or changed its uid; nor
    /// does it make sending fds any safer, which the seals already do.
    pub fn peer_pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.peer_pidfd.as_deref().map(AsFd::as_fd)
    }

    /// The segments, in the order sent.
    pub fn segments(&self) -> &[VerifiedSegment] {
        &self.segments
    }

    /// The segment named `name` (names are unique within a transfer).
    pub fn segment(&self, name: &str) -> Option<&VerifiedSegment> {
        self.segments.iter().find(|segment| segment.name() == name)
    }

    /// The sender's own fields (protocol 1.1; empty from a 1.0 sender), in
    /// the order sent: [`Metadata::get`] looks one up by key.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Takes the metadata out (leaving none), to keep it past the transfer.
    pub fn take_metadata(&mut self) -> Metadata {
        std::mem::take(&mut self.metadata)
    }

    /// The sum of the segment sizes.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(VerifiedSegment::size).sum()
    }

    /// Answers `Ack` and drops the segments (unmapping them).
    ///
    /// When the connection has judged no message since this one (always so
    /// on the thread that reads it, as in a `receive` loop), the answer
    /// goes first: the sender goes on while the pages are unmapped and
    /// freed, which for a big segment can take nearly half as long as
    /// filling it did. A message the connection reads meanwhile is judged
    /// only after they are gone, so against budgets that no longer count
    /// them. When it has read on (as it may while this runs on another
    /// thread), the segments are dropped first, then it answers. Either
    /// way, nothing the connection judges after this call counts these
    /// segments (except on tokio, where a transfer of 4 MiB or 16 segments
    /// is released on the blocking pool and stays counted until that is
    /// done). No lock is held while they are unmapped.
    pub fn accept(self) -> Result<(), AnswerError> {
        let (segments, responder) = self.into_parts();
        responder.answer_releasing(Ok(()), segments)
    }

    /// Answers `Reject(ApplicationRejected)` with `why` and drops the
    /// segments, in the order [`IncomingTransfer::accept`] describes.
    pub fn reject(self, why: impl Display) -> Result<(), AnswerError> {
        let (segments, responder) = self.into_parts();
        responder.answer_releasing(Err(why.to_string()), segments)
    }

    /// The segments and the responder, apart: keep the bytes and answer now,
    /// or answer later, from anywhere.
    pub fn into_parts(self) -> (Vec<VerifiedSegment>, Responder) {
        (self.segments, self.responder)
    }
}
