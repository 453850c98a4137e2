//! What each step of a [`Session`](crate::Session) takes and hands out:
//! the datagram a driver read, the proofs it must show (an [`Unverified`]
//! transfer to judge, a [`Verified`] one whose [`Grant`]s carry their fds),
//! a delivered transfer's [`Ticket`], and the answers it transmits.
#![forbid(unsafe_code)]

use crate::budget::Reservation;
use crate::codec::Version;
use crate::message::{Message, Reject, Segment};
use crate::metadata::Metadata;

/// What one `recvmsg` returned, as far as the session needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The message's data (as much as fit in the buffer).
    pub bytes: &'a [u8],
    /// How many fds arrived with it.
    pub fds: usize,
    /// `MSG_TRUNC`: the data did not fit.
    pub payload_truncated: bool,
    /// `MSG_CTRUNC`: the control data did not fit.
    pub control_truncated: bool,
}

impl Datagram<'_> {
    /// Zero bytes, no fds, nothing cut: the peer closed the connection.
    pub fn is_end_of_stream(&self) -> bool {
        self.bytes.is_empty() && self.fds == 0 && !self.payload_truncated
    }
}

/// What to do after a datagram.
#[derive(Debug)]
#[must_use]
pub enum Received {
    /// The peer closed its end: read no more. Answers still owed are still
    /// sent.
    End,
    /// Refused: close every fd that came with it, then transmit (the
    /// `Reject` is queued).
    Refused(Reject),
    /// A transfer that passed every check a header allows: gather the
    /// kernel's facts about each fd, in order, with [`Session::judge`](crate::Session::judge).
    Inspect(Unverified),
}

/// A decoded transfer whose fds are yet to be judged.
#[derive(Debug)]
pub struct Unverified {
    pub(crate) id: u64,
    pub(crate) version: Version,
    pub(crate) segments: Vec<Segment>,
    pub(crate) metadata: Metadata,
}

impl Unverified {
    /// The transfer's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How many fds to inspect (one per segment).
    pub fn fds(&self) -> usize {
        self.segments.len()
    }
}

/// One fd the kernel vouched for, with the segment it was judged as: the
/// proof a driver must show to map it. Only a [`Verified`] transfer hands
/// them out, and only [`Session::judge`](crate::Session::judge) makes one of those, so the fd a
/// grant carries is the one its facts were judged from.
#[derive(Debug)]
pub struct Grant<'a, F> {
    pub(crate) confirmed: &'a Segment,
    pub(crate) fd: &'a F,
}

impl<'a, F> Grant<'a, F> {
    /// The segment as the kernel reported it: its name, its size (the bytes
    /// to map, final since SHRINK and GROW are sealed) and all its seals.
    pub fn segment(&self) -> &'a Segment {
        self.confirmed
    }

    /// The bytes to map.
    pub fn size(&self) -> u64 {
        self.confirmed.size
    }

    /// The fd (or whatever handle the driver judged), to map.
    pub fn fd(&self) -> &'a F {
        self.fd
    }
}

/// A transfer whose every fd the kernel vouched for, holding those fds
/// (`F`: the driver's handle, an `OwnedFd`), its bytes reserved in the
/// budgets. Map each fd with its [`Grant`], then [`Session::deliver`](crate::Session::deliver), or
/// report a mapping failure with [`Session::map_failed`](crate::Session::map_failed); dropped, it
/// closes the fds and gives the bytes back.
#[derive(Debug)]
pub struct Verified<F> {
    pub(crate) id: u64,
    pub(crate) version: Version,
    pub(crate) confirmed: Vec<Segment>,
    pub(crate) fds: Vec<F>,
    pub(crate) metadata: Metadata,
    pub(crate) reservation: Reservation,
}

impl<F> Verified<F> {
    /// The transfer's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The sender's protocol version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// One grant per fd, in order.
    pub fn grants(&self) -> impl ExactSizeIterator<Item = Grant<'_, F>> {
        self.confirmed
            .iter()
            .zip(&self.fds)
            .map(|(confirmed, fd)| Grant { confirmed, fd })
    }
}

/// A delivered transfer's place in the answer order. Give it back with
/// [`Session::answer`](crate::Session::answer); a driver that drops it instead must answer for it,
/// or every later answer waits.
#[derive(Debug)]
#[must_use = "a transfer's answer blocks every later one until it is given"]
pub struct Ticket {
    pub(crate) sequence: u64,
    pub(crate) id: u64,
    /// Datagrams the session had handled when it delivered the transfer.
    pub(crate) handled: u64,
}

impl Ticket {
    /// The id of the transfer it answers.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// What a delivered transfer is made of, for the driver to pair with its
/// mappings.
#[derive(Debug)]
pub struct Delivered<F> {
    /// Where its answer goes.
    pub ticket: Ticket,
    /// Its id.
    pub id: u64,
    /// The sender's protocol version.
    pub version: Version,
    /// The segments as the kernel reported them, in order.
    pub segments: Vec<Segment>,
    /// Their fds, in the same order.
    pub fds: Vec<F>,
    /// The application's fields (protocol 1.1), as the sender gave them.
    pub metadata: Metadata,
    /// The transfer's bytes in the budgets; split it per segment
    /// ([`Reservation::split_off`]) so each is given back with its mapping.
    pub reservation: Reservation,
}

/// An answer to put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// `Ack` or `Reject`.
    pub message: Message,
    /// Close the connection once it is sent.
    pub closes: bool,
}
