//! Many messages in one system call: `recvmmsg` into a [`ReceiveBatch`],
//! `sendmmsg` of answers.

use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr;

use nix::errno::Errno;
use nix::libc;

use sealpass_proto::limits::MAX_SEGMENTS;

use super::*;

/// Most messages one [`receive_batch`] takes, and one [`send_batch`] call
/// hands the kernel at a time: the session's run of answers.
pub use sealpass_proto::limits::MAX_BATCH;

/// Most receives a [`ReceiveBatch`] makes one message wide after a run of
/// full-width receives that brought one message each.
pub(crate) const NARROW_AFTER_SINGLES: u32 = 7;

/// Buffers for up to `slots` messages received by one `recvmmsg`
/// ([`receive_batch`]): a payload buffer and a control buffer per slot, and
/// the messages of the last call, taken in order with
/// [`ReceiveBatch::take_next`]. A receiver answers every message it
/// receives, so one that stopped part-way (a handler's panic) takes the rest
/// before it receives again. Whatever is still untaken is dropped, its fds
/// closed, by the next receive or with the batch.
#[derive(Debug)]
pub struct ReceiveBatch {
    slots: usize,
    /// Full-width receives in a row that brought one message, at most
    /// [`NARROW_AFTER_SINGLES`]...
    singles: u32,
    /// ... and how many receives are still to ask for one message only. A
    /// peer that waits for each answer never has a second message queued,
    /// and asking for more costs `recvmmsg` a failed try per call.
    pub(super) narrow: u32,
    payload_len: usize,
    buffers: Buffers,
    received: Vec<Option<Incoming>>,
    /// The index of the next message to take.
    next: usize,
    /// fd lists handed back, so receiving allocates none per message.
    spare_fds: Vec<Vec<OwnedFd>>,
}

// A batch's control buffers follow one another in its mapping: each must
// start 8-aligned for `cmsghdr`.
const _: () = assert!(CONTROL_LEN % 8 == 0);

/// Where a batch's buffers live.
#[derive(Debug)]
enum Buffers {
    /// One anonymous mapping: every slot's payload buffer, then every slot's
    /// control buffer at `controls`. Its pages are allocated only where the
    /// kernel writes, and never zeroed up front, so a batch costs an idle
    /// connection almost nothing.
    Mapped {
        mapping: memmap2::MmapMut,
        controls: usize,
    },
    /// One slot on the heap.
    Heap {
        payload: Vec<u8>,
        control: Box<ControlBuffer>,
    },
}

impl ReceiveBatch {
    /// Room for `slots` messages (1 to [`MAX_BATCH`]; clamped) of at most
    /// `payload_len` bytes each, in an anonymous mapping: a slot's pages
    /// are allocated only by the messages that land in it. Where the
    /// mapping cannot be had (`RLIMIT_AS`, no memory), one slot on the heap
    /// stands in, and the batch takes one message at a time.
    pub fn new(slots: usize, payload_len: usize) -> ReceiveBatch {
        let payload_len = payload_len.max(1);
        let slots = slots.clamp(1, MAX_BATCH);
        // Control buffers start 8-aligned (cmsghdr) in a page-aligned
        // mapping; CONTROL_LEN is a multiple of 8, so every one is.
        let controls = (slots * payload_len).next_multiple_of(8);
        match memmap2::MmapMut::map_anon(controls + slots * CONTROL_LEN) {
            Ok(mapping) => {
                ReceiveBatch::with(slots, payload_len, Buffers::Mapped { mapping, controls })
            }
            Err(_) => ReceiveBatch::single(payload_len),
        }
    }

    /// One slot on the heap: for a reader that expects one message at a
    /// time (it costs what a plain buffer does), and the stand-in when no
    /// mapping can be had.
    pub fn single(payload_len: usize) -> ReceiveBatch {
        let payload_len = payload_len.max(1);
        let buffers = Buffers::Heap {
            payload: vec![0; payload_len],
            control: ControlBuffer::new(),
        };
        ReceiveBatch::with(1, payload_len, buffers)
    }

    fn with(slots: usize, payload_len: usize, buffers: Buffers) -> ReceiveBatch {
        ReceiveBatch {
            slots,
            singles: 0,
            narrow: 0,
            payload_len,
            buffers,
            received: Vec::with_capacity(slots),
            next: 0,
            spare_fds: Vec::new(),
        }
    }

    /// How many messages one receive may take.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// How many messages the next receive asks for: all its slots, except
    /// after full-width receives that each brought one message. After `k`
    /// of those in a row it asks for one, `k` times (at most
    /// [`NARROW_AFTER_SINGLES`]), then for all again: a peer that waits for
    /// each answer costs no failed try, and one that starts pipelining is
    /// served in batches again within that many messages.
    fn width(&mut self) -> usize {
        if self.narrow > 0 {
            self.narrow -= 1;
            1
        } else {
            self.slots
        }
    }

    /// What a receive of `width` brought.
    fn brought(&mut self, width: usize, count: usize) {
        if width < 2 {
            return;
        }
        if count == 1 {
            self.singles = (self.singles + 1).min(NARROW_AFTER_SINGLES);
            self.narrow = self.singles;
        } else {
            self.singles = 0;
        }
    }

    /// How many messages of the last receive are still to be taken.
    pub fn untaken(&self) -> usize {
        self.received.len().saturating_sub(self.next)
    }

    /// Takes the next message of the last receive, in order: what `recvmsg`
    /// would have said of it, and its payload bytes. `None` once all are
    /// taken.
    pub fn take_next(&mut self) -> Option<(Incoming, &[u8])> {
        let index = self.next;
        let received = self.received.get_mut(index)?.take()?;
        self.next += 1;
        let start = index * self.payload_len;
        let payloads: &[u8] = match &self.buffers {
            Buffers::Mapped { mapping, .. } => mapping,
            Buffers::Heap { payload, .. } => payload,
        };
        let bytes = payloads
            .get(start..start + received.len.min(self.payload_len))
            .unwrap_or_default();
        Some((received, bytes))
    }

    /// Hands back an fd list (emptied here, closing what it held) for a
    /// later message to reuse.
    pub fn recycle(&mut self, mut fds: Vec<OwnedFd>) {
        fds.clear();
        if self.spare_fds.len() < self.slots {
            self.spare_fds.push(fds);
        }
    }

    fn clear(&mut self) {
        self.next = 0;
        for received in self.received.drain(..).flatten() {
            let mut fds = received.fds;
            fds.clear();
            if self.spare_fds.len() < self.slots {
                self.spare_fds.push(fds);
            }
        }
    }

    /// Where slot 0's payload and control buffers start; slot `i`'s are
    /// `i * payload_len` and `i * CONTROL_LEN` further.
    fn bases(&mut self) -> (*mut u8, *mut u8) {
        match &mut self.buffers {
            Buffers::Mapped { mapping, controls } => {
                let base = mapping.as_mut_ptr();
                (base, base.wrapping_add(*controls))
            }
            Buffers::Heap { payload, control } => {
                (payload.as_mut_ptr(), control.bytes.as_mut_ptr())
            }
        }
    }
}

/// How many messages a receiver takes per [`receive_batch`] within this
/// process's `RLIMIT_NOFILE`: each may bring [`MAX_SEGMENTS`] fds, and a
/// batch may use at most half the soft limit, so batching never runs a
/// process out of fds that one message at a time would not. 1 (no
/// batching) below 1012 fds; [`MAX_BATCH`] from 16192.
pub fn batch_slots() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft);
    batch_slots_for(soft)
}

/// [`batch_slots`] for a soft `RLIMIT_NOFILE` of `soft`.
pub(crate) fn batch_slots_for(soft: u64) -> usize {
    let slots = soft / 2 / MAX_SEGMENTS as u64;
    usize::try_from(slots)
        .unwrap_or(MAX_BATCH)
        .clamp(1, MAX_BATCH)
}

/// Receives up to `batch.slots()` messages in one `recvmmsg`, with
/// `MSG_CMSG_CLOEXEC`: it waits for the first as [`receive`] does (the
/// socket's receive timeout applies) and then takes only those already
/// queued (`MSG_WAITFORONE`). After receives that each found one message,
/// a few ask for one only (up to 7 after 7 such). Returns how many came, at least 1; each is in
/// the batch, its fds owned, whatever else is wrong with it. An end of
/// stream is a message of its own, as with [`receive`].
pub fn receive_batch(
    sock: BorrowedFd<'_>,
    batch: &mut ReceiveBatch,
) -> Result<usize, TransportError> {
    receive_batch_with_flags(sock, batch, libc::MSG_WAITFORONE)
}

/// [`receive_batch`] without blocking (`MSG_DONTWAIT`): `Ok(None)` when
/// nothing is queued. For drivers that wait for readiness themselves.
pub fn try_receive_batch(
    sock: BorrowedFd<'_>,
    batch: &mut ReceiveBatch,
) -> Result<Option<usize>, TransportError> {
    match receive_batch_with_flags(sock, batch, libc::MSG_DONTWAIT) {
        Ok(count) => Ok(Some(count)),
        Err(TransportError::TimedOut { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

fn receive_batch_with_flags(
    sock: BorrowedFd<'_>,
    batch: &mut ReceiveBatch,
    flags: libc::c_int,
) -> Result<usize, TransportError> {
    batch.clear();
    let slots = batch.width();
    // Headers for as many slots as are asked for: a one-message receive
    // (a waiting peer's, a sender's) sets up one, not MAX_BATCH.
    let count = if slots == 1 {
        receive_slots::<1>(sock, batch, 1, flags)?
    } else {
        receive_slots::<MAX_BATCH>(sock, batch, slots, flags)?
    };
    batch.brought(slots, count);
    Ok(count)
}

/// [`receive_batch`]'s call, for `slots` (at most `N`) messages.
fn receive_slots<const N: usize>(
    sock: BorrowedFd<'_>,
    batch: &mut ReceiveBatch,
    slots: usize,
    flags: libc::c_int,
) -> Result<usize, TransportError> {
    // SAFETY: iovec and mmsghdr are plain C structs for which all-zero bytes
    // are valid (null pointers, zero lengths).
    let mut iovecs: [libc::iovec; N] = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut headers: [libc::mmsghdr; N] = unsafe { mem::zeroed() };
    let payload_len = batch.payload_len;
    let (payloads, controls) = batch.bases();
    for (index, (iov, header)) in iovecs
        .iter_mut()
        .zip(headers.iter_mut())
        .take(slots)
        .enumerate()
    {
        // Pointers only: the buffers are written by the kernel alone, within
        // the lengths given here, which `ReceiveBatch` sized for `slots`.
        iov.iov_base = payloads.wrapping_add(index * payload_len).cast();
        iov.iov_len = payload_len;
        header.msg_hdr.msg_iov = iov;
        header.msg_hdr.msg_iovlen = 1;
        header.msg_hdr.msg_control = controls.wrapping_add(index * CONTROL_LEN).cast();
        header.msg_hdr.msg_controllen = CONTROL_LEN;
    }
    let count = loop {
        let (got, op) = match headers.first_mut() {
            // One message asked for: plain recvmsg, which costs less.
            Some(first) if slots == 1 => {
                // SAFETY: as below, for the first header alone.
                let got = unsafe {
                    libc::recvmsg(
                        sock.as_raw_fd(),
                        &mut first.msg_hdr,
                        libc::MSG_CMSG_CLOEXEC | (flags & !libc::MSG_WAITFORONE),
                    )
                };
                if let Ok(len) = u32::try_from(got) {
                    first.msg_len = len;
                }
                // One message came (an empty one is the end of the stream),
                // or none and -1 says why.
                (if got < 0 { -1 } else { 1 }, Op::Receive)
            }
            _ => {
                // SAFETY: the first `slots` headers point at their own iovec,
                // over slot `i`'s payload buffer (`payload_len` bytes), and at
                // slot `i`'s control buffer (CONTROL_LEN bytes, 8-aligned for
                // cmsghdr). Both are inside `batch`'s buffers, sized for all
                // its slots (`slots` is at most that many), writable, apart
                // from every other slot's, and alive for the call; no timeout
                // pointer is passed.
                let got = unsafe {
                    libc::recvmmsg(
                        sock.as_raw_fd(),
                        headers.as_mut_ptr(),
                        slots as libc::c_uint,
                        libc::MSG_CMSG_CLOEXEC | flags,
                        ptr::null_mut(),
                    )
                };
                (got, Op::ReceiveMany)
            }
        };
        match Errno::result(got) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(TransportError::sys(op, e)),
            Ok(n) => break usize::try_from(n).unwrap_or(0).min(slots),
        }
    };
    for header in headers.iter().take(count) {
        let mut fds = batch.spare_fds.pop().unwrap_or_default();
        // SAFETY: recvmsg or recvmmsg filled this entry; its control buffer
        // is in `batch`, alive and untouched since.
        unsafe { collect_fds(&header.msg_hdr, &mut fds) };
        batch.received.push(Some(Incoming {
            len: header.msg_len as usize,
            fds,
            payload_truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            control_truncated: header.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0,
        }));
    }
    Ok(count)
}

/// Sends each of `payloads` as one message with no fds, with
/// `MSG_NOSIGNAL`, handing the kernel up to [`MAX_BATCH`] per `sendmmsg`
/// (a single message goes through `sendmsg`).
/// Blocks while the peer's queue is full (the socket's send timeout
/// applies). On an error, the messages before the failed one were sent and
/// the rest were not.
pub fn send_batch<P: AsRef<[u8]>>(
    sock: BorrowedFd<'_>,
    payloads: &[P],
) -> Result<(), TransportError> {
    send_batch_with_flags(sock, payloads, libc::MSG_NOSIGNAL).map(drop)
}

/// [`send_batch`] without blocking (`MSG_DONTWAIT`): returns how many of
/// `payloads`, from the first, were sent before the peer's queue was full
/// (0 when it was full from the start).
pub fn try_send_batch<P: AsRef<[u8]>>(
    sock: BorrowedFd<'_>,
    payloads: &[P],
) -> Result<usize, TransportError> {
    send_batch_with_flags(sock, payloads, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
}

fn send_batch_with_flags<P: AsRef<[u8]>>(
    sock: BorrowedFd<'_>,
    payloads: &[P],
    flags: libc::c_int,
) -> Result<usize, TransportError> {
    if let [only] = payloads {
        // One message: plain sendmsg, which costs less.
        return send_with_flags(sock, only.as_ref(), std::iter::empty(), flags).map(usize::from);
    }
    let mut total = 0;
    for chunk in payloads.chunks(MAX_BATCH) {
        // SAFETY: as in `receive_batch`, all-zero is valid for these.
        let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { mem::zeroed() };
        for ((iov, header), payload) in iovecs.iter_mut().zip(headers.iter_mut()).zip(chunk) {
            let payload = payload.as_ref();
            iov.iov_base = payload.as_ptr().cast_mut().cast();
            iov.iov_len = payload.len();
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < chunk.len() {
            let rest = headers.get_mut(sent..chunk.len()).unwrap_or_default();
            // SAFETY: each of the `rest.len()` headers points at its own
            // iovec over a payload the caller lends for the call (the kernel
            // only reads it); there is no control data.
            let got = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    flags,
                )
            };
            match Errno::result(got) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) if flags & libc::MSG_DONTWAIT != 0 => {
                    return Ok(total + sent);
                }
                Err(e) => return Err(TransportError::sys(Op::SendMany, e)),
                // SOCK_SEQPACKET sends each record whole or not at all, and
                // sendmmsg returns at least 1 when it succeeds.
                Ok(n) => sent += usize::try_from(n).unwrap_or(0).max(1),
            }
        }
        total += sent;
    }
    Ok(total)
}
