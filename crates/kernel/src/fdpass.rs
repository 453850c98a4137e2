//! Moving fds through `AF_UNIX` `SOCK_SEQPACKET` sockets: the only module of
//! sealpass that calls `sendmsg`/`recvmsg`, used by sender and receiver both.
//!
//! Every socket is created `SOCK_CLOEXEC`, every received fd arrives
//! `MSG_CMSG_CLOEXEC` and becomes an [`OwnedFd`] at once, so nothing leaks
//! into a child process and an fd nobody claims is closed when dropped. Every
//! send uses `MSG_NOSIGNAL`: a vanished peer is an `EPIPE` error, not SIGPIPE.
//!
//! `recvmsg` is called through libc rather than nix because nix refuses to
//! walk the control data when `MSG_CTRUNC` is set, and the fds the kernel did
//! install then would leak.
#![allow(unsafe_code)]

use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;

use sealpass_proto::limits::MAX_SEGMENTS;

/// The system call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `socket(2)`.
    Socket,
    /// `bind(2)`.
    Bind,
    /// `listen(2)`.
    Listen,
    /// `accept4(2)`.
    Accept,
    /// `connect(2)`.
    Connect,
    /// `sendmsg(2)`.
    Send,
    /// `recvmsg(2)`.
    Receive,
    /// `sendmmsg(2)`.
    SendMany,
    /// `recvmmsg(2)`.
    ReceiveMany,
    /// `setsockopt(2)`.
    SetOption,
    /// `getsockopt(2)`.
    GetOption,
    /// `fchmod(2)`.
    Chmod,
    /// `shutdown(2)`.
    Shutdown,
    /// `poll(2)`.
    Poll,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Socket => "socket",
            Op::Bind => "bind",
            Op::Listen => "listen",
            Op::Accept => "accept",
            Op::Connect => "connect",
            Op::Send => "sendmsg",
            Op::Receive => "recvmsg",
            Op::SendMany => "sendmmsg",
            Op::ReceiveMany => "recvmmsg",
            Op::SetOption => "setsockopt",
            Op::GetOption => "getsockopt",
            Op::Chmod => "fchmod",
            Op::Shutdown => "shutdown",
            Op::Poll => "poll",
        })
    }
}

/// A transport failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A system call failed.
    #[error("{op} failed: {errno}")]
    Sys {
        /// Which call.
        op: Op,
        /// What the kernel said.
        errno: Errno,
    },
    /// A socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`) ran out.
    #[error("{op} timed out")]
    TimedOut {
        /// Which call.
        op: Op,
    },
    /// The socket path does not fit in `sockaddr_un`.
    #[error("socket path {path:?} is too long for a unix socket address (at most 107 bytes)")]
    PathTooLong {
        /// The path.
        path: String,
    },
    /// More fds than one message can carry.
    #[error("{count} fds in one message; the kernel carries at most {MAX_SEGMENTS}")]
    TooManyFds {
        /// How many were given.
        count: usize,
    },
}

impl TransportError {
    fn sys(op: Op, errno: Errno) -> TransportError {
        match errno {
            Errno::EAGAIN => TransportError::TimedOut { op },
            errno => TransportError::Sys { op, errno },
        }
    }

    /// The errno, for a failed system call.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            TransportError::Sys { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn unix_addr(path: &Path) -> Result<UnixAddr, TransportError> {
    UnixAddr::new(path).map_err(|_| TransportError::PathTooLong {
        path: path.display().to_string(),
    })
}

fn unix_socket(kind: SockType) -> Result<OwnedFd, TransportError> {
    socket::socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| TransportError::sys(Op::Socket, e))
}

/// Binds a listening `SOCK_SEQPACKET` socket at `path`. The caller decides
/// what to do about a file already there.
pub fn listen(path: &Path, backlog: i32) -> Result<OwnedFd, TransportError> {
    listen_as(SockType::SeqPacket, path, backlog)
}

/// Binds a listening `SOCK_STREAM` socket at `path`, for bare fd-passing
/// peers that speak no sealpass header (compat mode).
pub fn listen_stream(path: &Path, backlog: i32) -> Result<OwnedFd, TransportError> {
    listen_as(SockType::Stream, path, backlog)
}

fn listen_as(kind: SockType, path: &Path, backlog: i32) -> Result<OwnedFd, TransportError> {
    let addr = unix_addr(path)?;
    let listener = unix_socket(kind)?;
    // Linux gives the socket file the socket inode's mode (less the umask)
    // at bind, so narrowing it first leaves no moment in which the file is
    // more open than owner-only. Callers widen it afterwards if they must.
    nix::sys::stat::fchmod(&listener, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| TransportError::sys(Op::Chmod, e))?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(|e| TransportError::sys(Op::Bind, e))?;
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    socket::listen(&listener, backlog).map_err(|e| TransportError::sys(Op::Listen, e))?;
    Ok(listener)
}

/// Accepts one connection, close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, TransportError> {
    loop {
        match socket::accept4(listener, SockFlag::SOCK_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(|e| TransportError::sys(Op::Accept, e)),
        }
    }
}

/// Connects a `SOCK_SEQPACKET` socket to `path`.
pub fn connect(path: &Path) -> Result<OwnedFd, TransportError> {
    connect_as(SockType::SeqPacket, path)
}

/// Connects a `SOCK_STREAM` socket to `path` (compat mode).
pub fn connect_stream(path: &Path) -> Result<OwnedFd, TransportError> {
    connect_as(SockType::Stream, path)
}

fn connect_as(kind: SockType, path: &Path) -> Result<OwnedFd, TransportError> {
    let addr = unix_addr(path)?;
    let sock = unix_socket(kind)?;
    // The side that connects is a sender: answers carry no fds, so where
    // the kernel can refuse them for us it does. Elsewhere the reader
    // closes any that come.
    refuse_fds(sock.as_fd())?;
    loop {
        match socket::connect(sock.as_raw_fd(), &addr) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(TransportError::sys(Op::Connect, e)),
            Ok(()) => return Ok(sock),
        }
    }
}

/// Sets the receive and send timeouts of `sock` (`None`: wait forever). A
/// call that runs out fails with [`TransportError::TimedOut`].
pub fn set_timeouts(
    sock: BorrowedFd<'_>,
    receive: Option<Duration>,
    send: Option<Duration>,
) -> Result<(), TransportError> {
    let timeval = |d: Option<Duration>| {
        TimeVal::from(d.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |d| {
                libc::timeval {
                    tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                    // Never 0 for a nonzero duration: a zero timeval means forever.
                    tv_usec: libc::suseconds_t::from(
                        d.subsec_micros().max(u32::from(d.as_secs() == 0)),
                    ),
                }
            },
        ))
    };
    socket::setsockopt(&sock, sockopt::ReceiveTimeout, &timeval(receive))
        .and_then(|()| socket::setsockopt(&sock, sockopt::SendTimeout, &timeval(send)))
        .map_err(|e| TransportError::sys(Op::SetOption, e))
}

/// `CMSG_SPACE` for `MAX_SEGMENTS` fds.
const CONTROL_LEN: usize = {
    // SAFETY: CMSG_SPACE only computes a length; it touches no memory.
    (unsafe { libc::CMSG_SPACE((MAX_SEGMENTS * size_of::<RawFd>()) as u32) }) as usize
};

/// Room for the control data of one message carrying the most fds the
/// protocol allows, aligned for `cmsghdr`. Allocated once and reused.
#[repr(C, align(8))]
#[derive(Debug)]
pub struct ControlBuffer {
    bytes: [u8; CONTROL_LEN],
}

impl ControlBuffer {
    /// A zeroed buffer.
    pub fn new() -> Box<ControlBuffer> {
        Box::new(ControlBuffer {
            bytes: [0; CONTROL_LEN],
        })
    }
}

/// One message as `recvmsg` returned it.
#[derive(Debug)]
pub struct Received {
    /// Payload bytes written to the buffer.
    pub len: usize,
    /// Every fd the kernel installed, in order, each owned exactly once.
    pub fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the payload did not fit the buffer; the rest is lost.
    pub payload_truncated: bool,
    /// `MSG_CTRUNC`: the control data did not fit; fds beyond it were not
    /// installed (the kernel closed them).
    pub control_truncated: bool,
}

impl Received {
    /// A zero-byte read with no fds: the peer closed the connection.
    pub fn is_end_of_stream(&self) -> bool {
        self.len == 0 && self.fds.is_empty() && !self.payload_truncated
    }
}

/// Sends one message: `payload` as the data, `fds` as one `SCM_RIGHTS`
/// control message, with `MSG_NOSIGNAL`. Blocks while the peer's queue is
/// full.
pub fn send(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), TransportError> {
    send_each(sock, payload, fds.iter().copied())
}

/// [`send`], with the fds from an iterator, so a caller holding them in its
/// own structures needs no list of its own.
pub fn send_each<'fd>(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: impl ExactSizeIterator<Item = BorrowedFd<'fd>>,
) -> Result<(), TransportError> {
    send_with_flags(sock, payload, fds, libc::MSG_NOSIGNAL).map(|_| ())
}

/// [`send_each`] without blocking (`MSG_DONTWAIT`): `Ok(false)` when the
/// peer's queue is full and nothing was sent. A pipelining sender uses it to
/// read answers instead of waiting on a peer that is waiting on it.
pub fn try_send_each<'fd>(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: impl ExactSizeIterator<Item = BorrowedFd<'fd>>,
) -> Result<bool, TransportError> {
    send_with_flags(sock, payload, fds, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
}

/// `Ok(true)`: sent whole. `Ok(false)`: `EAGAIN` (only ever under
/// `MSG_DONTWAIT`; a blocking socket's `SO_SNDTIMEO` is `TimedOut`).
fn send_with_flags<'fd>(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: impl ExactSizeIterator<Item = BorrowedFd<'fd>>,
    flags: libc::c_int,
) -> Result<bool, TransportError> {
    let count = fds.len();
    if count > MAX_SEGMENTS {
        return Err(TransportError::TooManyFds { count });
    }
    let mut control = ControlBuffer {
        bytes: [0; CONTROL_LEN],
    };
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are valid
    // (null pointers, zero lengths).
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if count > 0 {
        header.msg_control = control.bytes.as_mut_ptr().cast();
        header.msg_controllen = CONTROL_LEN;
        let mut written = 0;
        // SAFETY: msg_control points at `control`, which is aligned for
        // cmsghdr and CONTROL_LEN bytes long, room for one header and
        // MAX_SEGMENTS >= count fds; `take(count)` bounds the writes whatever
        // the iterator claims. The fds are written unaligned, as CMSG_DATA
        // may be. The lengths are then set from what was written.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for fd in fds.take(count) {
                ptr::write_unaligned(data.add(written), fd.as_raw_fd());
                written += 1;
            }
            let data_len = (written * size_of::<RawFd>()) as u32;
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            header.msg_controllen = libc::CMSG_SPACE(data_len) as usize;
        }
        if written == 0 {
            header.msg_control = ptr::null_mut();
            header.msg_controllen = 0;
        }
    }
    loop {
        // SAFETY: `header` points at `iov` (over `payload`, which the kernel
        // only reads) and at `control`, all alive for the call; the fds in
        // the control data are borrowed and so open.
        let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &header, flags) };
        match Errno::result(sent) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) if flags & libc::MSG_DONTWAIT != 0 => return Ok(false),
            Err(e) => return Err(TransportError::sys(Op::Send, e)),
            // SOCK_SEQPACKET sends a record whole or not at all.
            Ok(_) => return Ok(true),
        }
    }
}

/// Receives one message into `buffer`, with `MSG_CMSG_CLOEXEC`. Every fd the
/// kernel installed comes back owned, whatever else is wrong with the
/// message, so dropping the result closes them all.
pub fn receive(
    sock: BorrowedFd<'_>,
    buffer: &mut [u8],
    control: &mut ControlBuffer,
) -> Result<Received, TransportError> {
    receive_reusing(sock, buffer, control, Vec::new())
}

/// [`receive`], collecting the fds into `fds` (emptied first, which closes
/// any left in it), so a receiver that hands the list back after each
/// message allocates it once.
pub fn receive_reusing(
    sock: BorrowedFd<'_>,
    buffer: &mut [u8],
    control: &mut ControlBuffer,
    fds: Vec<OwnedFd>,
) -> Result<Received, TransportError> {
    receive_with_flags(sock, buffer, control, fds, libc::MSG_CMSG_CLOEXEC)
}

/// [`receive_reusing`] without blocking (`MSG_DONTWAIT`): `Ok(None)` when
/// nothing is queued. For drivers that wait for readiness themselves (an
/// async runtime's reactor).
pub fn try_receive_reusing(
    sock: BorrowedFd<'_>,
    buffer: &mut [u8],
    control: &mut ControlBuffer,
    fds: Vec<OwnedFd>,
) -> Result<Option<Received>, TransportError> {
    match receive_with_flags(
        sock,
        buffer,
        control,
        fds,
        libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
    ) {
        Ok(received) => Ok(Some(received)),
        Err(TransportError::TimedOut { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Accepts one connection without blocking, close-on-exec and non-blocking
/// itself: `Ok(None)` when none is pending.
pub fn try_accept(listener: BorrowedFd<'_>) -> Result<Option<OwnedFd>, TransportError> {
    loop {
        match socket::accept4(listener, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            other => {
                return other
                    .map(Some)
                    .map_err(|e| TransportError::sys(Op::Accept, e));
            }
        }
    }
}

/// Puts `sock` in non-blocking mode (`O_NONBLOCK`), for a readiness-driven
/// driver. It applies to the open file description, so to every duplicate.
pub fn set_nonblocking(sock: BorrowedFd<'_>) -> Result<(), TransportError> {
    set_o_nonblock(sock, true)
}

/// Puts `sock` back in blocking mode: a socket taken with [`try_accept`]
/// and then served by blocking calls.
pub fn set_blocking(sock: BorrowedFd<'_>) -> Result<(), TransportError> {
    set_o_nonblock(sock, false)
}

fn set_o_nonblock(sock: BorrowedFd<'_>, on: bool) -> Result<(), TransportError> {
    let fcntl_error = |errno| TransportError::sys(Op::SetOption, errno);
    let flags = nix::fcntl::fcntl(sock, nix::fcntl::FcntlArg::F_GETFL).map_err(fcntl_error)?;
    let mut flags = nix::fcntl::OFlag::from_bits_retain(flags);
    flags.set(nix::fcntl::OFlag::O_NONBLOCK, on);
    nix::fcntl::fcntl(sock, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map(drop)
        .map_err(fcntl_error)
}

/// Prepares a connection to be closed after its last answer, so that the
/// peer reads that answer rather than an error: stops writing (the peer sees the end after
/// the answer), then reads and discards, closing their fds, up to `max`
/// messages already queued without waiting for more. Closing a unix socket
/// with unread messages would make the peer's next `recvmsg` fail with
/// `ECONNRESET` before it reads what was sent to it.
pub fn close_after_answer(sock: BorrowedFd<'_>, max: usize) {
    let _ = socket::shutdown(sock.as_raw_fd(), socket::Shutdown::Write);
    let mut buffer = [0u8; 64];
    let mut control = ControlBuffer::new();
    for _ in 0..max {
        match receive_with_flags(
            sock,
            &mut buffer,
            &mut control,
            Vec::new(),
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        ) {
            Ok(received) if !received.is_end_of_stream() => drop(received),
            _ => break,
        }
    }
}

fn receive_with_flags(
    sock: BorrowedFd<'_>,
    buffer: &mut [u8],
    control: &mut ControlBuffer,
    mut fds: Vec<OwnedFd>,
    flags: libc::c_int,
) -> Result<Received, TransportError> {
    fds.clear();
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: as in `send`, all-zero is a valid msghdr.
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.bytes.as_mut_ptr().cast();
    header.msg_controllen = CONTROL_LEN;
    let len = loop {
        // SAFETY: `header` points at `iov` (over `buffer`) and `control`,
        // both writable and alive for the call, with their true lengths.
        let got = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut header, flags) };
        match Errno::result(got) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(TransportError::sys(Op::Receive, e)),
            Ok(n) => break usize::try_from(n).unwrap_or(0),
        }
    };

    // SAFETY: recvmsg succeeded on `header`, so its control fields describe
    // what the kernel wrote into `control`, which is still alive.
    unsafe { collect_fds(&header, &mut fds) };
    Ok(Received {
        len,
        fds,
        payload_truncated: header.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: header.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Takes ownership of every fd in the `SCM_RIGHTS` control data of
/// `header`, in order, into `fds`.
///
/// # Safety
///
/// `header` must be one that `recvmsg` (or an entry `recvmmsg`) just filled:
/// `msg_control`/`msg_controllen` describe control data the kernel wrote
/// into memory that is still alive, and its fds were installed for this
/// caller alone.
unsafe fn collect_fds(header: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: by the caller's contract the control data is the kernel's;
    // CMSG_FIRSTHDR/NXTHDR stay within msg_controllen and return null past
    // it. Even under MSG_CTRUNC each header's cmsg_len covers only the fds
    // actually installed.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                // The kernel's length, checked all the same: a header
                // shorter than an empty one carries no fds.
                let data_len = (*cmsg).cmsg_len.saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..data_len / size_of::<RawFd>() {
                    let raw = ptr::read_unaligned(data.add(i));
                    // SAFETY: SCM_RIGHTS just installed `raw` in this
                    // process's fd table for us alone; nothing else owns it.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
}

/// Most messages one [`receive_batch`] takes, and one [`send_batch`] call
/// hands the kernel at a time.
pub const MAX_BATCH: usize = 32;

/// Most receives a [`ReceiveBatch`] makes one message wide after a run of
/// full-width receives that brought one message each.
pub const NARROW_AFTER_SINGLES: u32 = 7;

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
    narrow: u32,
    payload_len: usize,
    buffers: Buffers,
    received: Vec<Option<Received>>,
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
    pub fn take_next(&mut self) -> Option<(Received, &[u8])> {
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
pub fn batch_slots_for(soft: u64) -> usize {
    let slots = soft / 2 / MAX_SEGMENTS as u64;
    usize::try_from(slots)
        .unwrap_or(MAX_BATCH)
        .clamp(1, MAX_BATCH)
}

/// Receives up to `batch.slots()` messages in one `recvmmsg`, with
/// `MSG_CMSG_CLOEXEC`: it waits for the first as [`receive`] does (the
/// socket's receive timeout applies) and then takes only those already
/// queued (`MSG_WAITFORONE`). After receives that each found one message,
/// a few ask for one only (see [`NARROW_AFTER_SINGLES`]). Returns how many came, at least 1; each is in
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
        batch.received.push(Some(Received {
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

pub use sealpass_proto::PeerCredentials;

/// `SO_PASSRIGHTS` (Linux 6.16+), as the generic socket numbering has it
/// (x86_64, aarch64, riscv64, powerpc, ...); libc does not name it yet. The
/// architectures with numbers of their own are left to the fallback.
const SO_PASSRIGHTS: libc::c_int = if cfg!(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)) {
    -1 // no such option: setsockopt fails with ENOPROTOOPT
} else {
    83
};

/// Whether the kernel knows `SO_PASSRIGHTS`; cleared at the first
/// `ENOPROTOOPT`, so an older kernel pays for the failed call once.
static PASSRIGHTS_KNOWN: AtomicBool = AtomicBool::new(true);

/// Has the kernel refuse fds sent to `sock` (`SO_PASSRIGHTS` off, Linux
/// 6.16+): a peer that tries gets `EPERM` from its `sendmsg`, and no fd
/// ever reaches this process. Returns whether the kernel took it; on older
/// kernels (`false`) fds can still arrive, and [`receive`] hands them over
/// as `OwnedFd`s for the caller to close.
pub fn refuse_fds(sock: BorrowedFd<'_>) -> Result<bool, TransportError> {
    refuse_fds_with(sock, &PASSRIGHTS_KNOWN, SO_PASSRIGHTS)
}

/// [`refuse_fds`], with the option number and the memory of the kernel's
/// answer passed in: a test gives an option no kernel knows, to take the
/// path of a kernel before 6.16.
fn refuse_fds_with(
    sock: BorrowedFd<'_>,
    known: &AtomicBool,
    option: libc::c_int,
) -> Result<bool, TransportError> {
    if !known.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let off: libc::c_int = 0;
    // SAFETY: `sock` is an open socket for the duration of the call, and the
    // option value is a live c_int whose size is the length passed.
    let set = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            ptr::from_ref(&off).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        return Ok(true);
    }
    match Errno::last() {
        Errno::ENOPROTOOPT => {
            known.store(false, Ordering::Relaxed);
            Ok(false)
        }
        errno => Err(TransportError::sys(Op::SetOption, errno)),
    }
}

/// Whether fds sent to `sock` reach it (`SO_PASSRIGHTS`): `None` where the
/// kernel does not know the option (before 6.16), and they always do.
pub fn passes_fds(sock: BorrowedFd<'_>) -> Result<Option<bool>, TransportError> {
    let mut value: libc::c_int = 0;
    let mut length = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `sock` is open for the call; `value` and `length` are live
    // and `length` is the size of `value`.
    let got = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            ptr::from_mut(&mut value).cast(),
            &mut length,
        )
    };
    if got == 0 {
        return Ok(Some(value != 0));
    }
    match Errno::last() {
        Errno::ENOPROTOOPT => Ok(None),
        errno => Err(TransportError::sys(Op::GetOption, errno)),
    }
}

/// Whether the kernel knows `SO_PEERPIDFD`; cleared at the first
/// `ENOPROTOOPT`.
static PEERPIDFD_KNOWN: AtomicBool = AtomicBool::new(true);

/// A pidfd for the process at the other end of a connected socket, the one
/// that called `connect` (`SO_PEERPIDFD`, Linux 6.5+; close-on-exec).
/// Unlike a pid it cannot come to mean another process: once that one
/// exits, the pidfd polls readable and signals sent through it fail with
/// `ESRCH`. `Ok(None)` on kernels without the option.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> Result<Option<OwnedFd>, TransportError> {
    if !PEERPIDFD_KNOWN.load(Ordering::Relaxed) {
        return Ok(None);
    }
    match socket::getsockopt(&sock, sockopt::PeerPidfd) {
        Ok(pidfd) => Ok(Some(pidfd)),
        Err(Errno::ENOPROTOOPT) => {
            PEERPIDFD_KNOWN.store(false, Ordering::Relaxed);
            Ok(None)
        }
        Err(errno) => Err(TransportError::sys(Op::GetOption, errno)),
    }
}

/// The credentials of the peer of a connected socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> Result<PeerCredentials, TransportError> {
    let credentials = socket::getsockopt(&sock, sockopt::PeerCredentials)
        .map_err(|e| TransportError::sys(Op::GetOption, e))?;
    Ok(PeerCredentials {
        pid: credentials.pid(),
        uid: credentials.uid(),
        gid: credentials.gid(),
    })
}

/// Stops reading from `sock`: messages already queued are still delivered,
/// then `receive` sees the end of the stream. Used to stop serving gracefully.
pub fn shut_down_reading(sock: BorrowedFd<'_>) -> Result<(), TransportError> {
    socket::shutdown(sock.as_raw_fd(), socket::Shutdown::Read)
        .map_err(|e| TransportError::sys(Op::Shutdown, e))
}

/// A connected pair of `SOCK_SEQPACKET` sockets, close-on-exec (for tests and
/// in-process peers).
pub fn pair() -> Result<(OwnedFd, OwnedFd), TransportError> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| TransportError::sys(Op::Socket, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The kernel's version, `(major, minor)`.
    fn kernel() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        (numbers.next().unwrap(), numbers.next().unwrap())
    }

    #[test]
    fn a_socket_that_refuses_fds_never_receives_one_where_the_kernel_can() {
        let (answers, receiver) = pair().unwrap();
        let refused = refuse_fds(answers.as_fd()).unwrap();
        // SO_PASSRIGHTS came with Linux 6.16: on it and later the kernel
        // must refuse; before, the option is unknown and fds still come.
        assert_eq!(refused, kernel() >= (6, 16), "kernel {:?}", kernel());
        let (stray, _) = nix::unistd::pipe().unwrap();
        let mut buffer = [0u8; 16];
        let mut control = ControlBuffer::new();
        if refused {
            assert_eq!(passes_fds(answers.as_fd()).unwrap(), Some(false));
            let error = send(receiver.as_fd(), b"ack", &[stray.as_fd()]).unwrap_err();
            assert_eq!(error.errno(), Some(Errno::EPERM), "{error}");
            send(receiver.as_fd(), b"ack", &[]).unwrap();
            let got = receive(answers.as_fd(), &mut buffer, &mut control).unwrap();
            assert_eq!((&buffer[..got.len], got.fds.len()), (&b"ack"[..], 0));
        } else {
            assert_eq!(passes_fds(answers.as_fd()).unwrap(), None);
            send(receiver.as_fd(), b"ack", &[stray.as_fd()]).unwrap();
            let got = receive(answers.as_fd(), &mut buffer, &mut control).unwrap();
            assert_eq!(got.fds.len(), 1, "an old kernel lets it through, owned");
        }
        // A socket left alone passes fds, on kernels that know the option.
        let (plain, _) = pair().unwrap();
        assert_ne!(passes_fds(plain.as_fd()).unwrap(), Some(false));
    }

    #[test]
    fn a_kernel_without_so_passrights_costs_one_failed_call() {
        let (sock, _) = pair().unwrap();
        let known = AtomicBool::new(true);
        // An option number no kernel knows: setsockopt says ENOPROTOOPT,
        // as a kernel before 6.16 says for SO_PASSRIGHTS.
        let unknown = 0x7fff;
        assert!(!refuse_fds_with(sock.as_fd(), &known, unknown).unwrap());
        assert!(!known.load(Ordering::Relaxed), "remembered");
        assert!(!refuse_fds_with(sock.as_fd(), &known, SO_PASSRIGHTS).unwrap());
    }

    #[test]
    fn connecting_refuses_fds_where_the_kernel_can() {
        let dir = std::env::temp_dir().join(format!("sealpass-fdpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("connect.sock");
        let _ = std::fs::remove_file(&path);
        let listener = listen(&path, 4).unwrap();
        let sender = connect(&path).unwrap();
        let expected = (kernel() >= (6, 16)).then_some(false);
        assert_eq!(passes_fds(sender.as_fd()).unwrap(), expected);
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_peer_pidfd_names_the_connecting_process_where_the_kernel_has_it() {
        let (a, _b) = pair().unwrap();
        let pidfd = peer_pidfd(a.as_fd()).unwrap();
        // SO_PEERPIDFD came with Linux 6.5.
        assert_eq!(pidfd.is_some(), kernel() >= (6, 5), "kernel {:?}", kernel());
        if let Some(pidfd) = pidfd {
            let flags = nix::fcntl::fcntl(&pidfd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "a pidfd must be close-on-exec");
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
                .unwrap();
            let pid = info
                .lines()
                .find_map(|line| line.strip_prefix("Pid:"))
                .map(str::trim)
                .unwrap();
            assert_eq!(pid, std::process::id().to_string(), "{info}");
        }
    }

    #[test]
    fn control_len_matches_libc() {
        assert_eq!(CONTROL_LEN, 16 + 1016);
    }

    #[test]
    fn fds_and_payload_arrive_in_order() {
        let (a, b) = pair().unwrap();
        let (r1, w1) = nix::unistd::pipe().unwrap();
        send(a.as_fd(), b"hello", &[r1.as_fd(), w1.as_fd()]).unwrap();
        let mut buffer = [0u8; 64];
        let mut control = ControlBuffer::new();
        let got = receive(b.as_fd(), &mut buffer, &mut control).unwrap();
        assert_eq!(&buffer[..got.len], b"hello");
        assert_eq!(got.fds.len(), 2);
        assert!(!got.payload_truncated && !got.control_truncated);
        let flags = nix::fcntl::fcntl(&got.fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds must be close-on-exec"
        );
    }

    #[test]
    fn the_most_fds_fit_and_are_all_closed_when_dropped() {
        let (a, b) = pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let fds = vec![r.as_fd(); MAX_SEGMENTS];
        assert!(matches!(
            send(a.as_fd(), b"x", &vec![r.as_fd(); MAX_SEGMENTS + 1]),
            Err(TransportError::TooManyFds { count: 254 })
        ));
        send(a.as_fd(), b"x", &fds).unwrap();
        let mut buffer = [0u8; 8];
        let got = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
        assert_eq!(got.fds.len(), MAX_SEGMENTS);
        assert!(!got.control_truncated);
        // Every received fd is a reader of the pipe. Once they and the
        // original are dropped, no reader is left, whatever other tests in
        // this process are doing with their own fds.
        drop(got);
        drop(r);
        assert_eq!(nix::unistd::write(&w, b"x"), Err(Errno::EPIPE));
    }

    /// The reader of a pipe, and whether any reader of it is still open
    /// anywhere in the process (a write fails `EPIPE` once none is).
    fn pipe_with_reader_check() -> (OwnedFd, impl Fn() -> bool) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (r, move || nix::unistd::write(&w, b"x") != Err(Errno::EPIPE))
    }

    #[test]
    fn a_batch_brings_every_queued_message_with_its_own_fds_and_bytes() {
        let (a, b) = pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send(a.as_fd(), b"none", &[]).unwrap();
        send(a.as_fd(), b"one", &[r.as_fd()]).unwrap();
        send(a.as_fd(), b"two!", &[r.as_fd(), w.as_fd()]).unwrap();
        let mut batch = ReceiveBatch::new(8, 64);
        assert_eq!(receive_batch(b.as_fd(), &mut batch).unwrap(), 3);
        assert_eq!(batch.untaken(), 3);
        for (index, (payload, fds)) in [(&b"none"[..], 0), (b"one", 1), (b"two!", 2)]
            .into_iter()
            .enumerate()
        {
            let (got, bytes) = batch.take_next().unwrap();
            assert_eq!((bytes, got.fds.len()), (payload, fds), "message {index}");
            assert!(!got.payload_truncated && !got.control_truncated);
            for fd in &got.fds {
                let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
                assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
            }
        }
        assert!(batch.take_next().is_none(), "each taken once");
        assert_eq!(batch.untaken(), 0);
    }

    #[test]
    fn a_batch_waits_for_one_and_takes_no_more_than_its_slots() {
        let check = |queued: usize, slots: usize, expected: &[usize]| {
            let (a, b) = pair().unwrap();
            for index in 0..queued {
                send(a.as_fd(), &[index as u8 + 1], &[]).unwrap();
            }
            let mut batch = ReceiveBatch::new(slots, 8);
            let mut next = 1u8;
            for &count in expected {
                assert_eq!(receive_batch(b.as_fd(), &mut batch).unwrap(), count);
                for _ in 0..count {
                    let (_, bytes) = batch.take_next().unwrap();
                    assert_eq!(bytes, [next], "in order");
                    next += 1;
                }
            }
            // Nothing left: the wait for the first runs into the timeout
            // (recvmsg's or recvmmsg's: see `after_single_messages_...`).
            set_timeouts(b.as_fd(), Some(Duration::from_millis(10)), None).unwrap();
            assert!(matches!(
                receive_batch(b.as_fd(), &mut batch),
                Err(TransportError::TimedOut {
                    op: Op::ReceiveMany | Op::Receive
                })
            ));
        };
        check(1, 8, &[1]);
        check(5, 2, &[2, 2, 1]);
        check(MAX_BATCH + 4, 100, &[MAX_BATCH, 4]);
        check(3, 0, &[1, 1, 1]);
    }

    #[test]
    fn a_batch_flags_truncation_and_the_end_of_stream() {
        let (a, b) = pair().unwrap();
        send(a.as_fd(), &[7; 100], &[]).unwrap();
        drop(a);
        let mut batch = ReceiveBatch::new(4, 10);
        let count = receive_batch(b.as_fd(), &mut batch).unwrap();
        let (got, bytes) = batch.take_next().unwrap();
        assert!(got.payload_truncated && !got.is_end_of_stream());
        assert_eq!(bytes, [7; 10]);
        if count == 1 {
            receive_batch(b.as_fd(), &mut batch).unwrap();
        }
        assert!(batch.take_next().unwrap().0.is_end_of_stream());
    }

    #[test]
    fn fds_nobody_took_from_a_batch_are_closed_by_the_next_receive() {
        let (a, b) = pair().unwrap();
        let (reader, readers_left) = pipe_with_reader_check();
        send(a.as_fd(), b"x", &[reader.as_fd()]).unwrap();
        drop(reader);
        let mut batch = ReceiveBatch::new(4, 8);
        receive_batch(b.as_fd(), &mut batch).unwrap();
        assert!(readers_left(), "held in the batch");
        send(a.as_fd(), b"y", &[]).unwrap();
        receive_batch(b.as_fd(), &mut batch).unwrap();
        assert!(!readers_left(), "closed, never leaked");

        let (reader, readers_left) = pipe_with_reader_check();
        send(a.as_fd(), b"z", &[reader.as_fd()]).unwrap();
        drop(reader);
        receive_batch(b.as_fd(), &mut batch).unwrap();
        drop(batch);
        assert!(!readers_left(), "closed with the batch");
    }

    #[test]
    fn a_batch_send_delivers_every_message_in_order() {
        let check = |count: usize| {
            let (a, b) = pair().unwrap();
            let payloads: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8; i + 1]).collect();
            send_batch(a.as_fd(), &payloads).unwrap();
            drop(a);
            let mut buffer = [0u8; 64];
            let mut control = ControlBuffer::new();
            for payload in &payloads {
                let got = receive(b.as_fd(), &mut buffer, &mut control).unwrap();
                assert_eq!(&buffer[..got.len], &payload[..]);
            }
            assert!(
                receive(b.as_fd(), &mut buffer, &mut control)
                    .unwrap()
                    .is_end_of_stream()
            );
        };
        for count in [0, 1, MAX_BATCH, MAX_BATCH + 1, 40] {
            check(count);
        }
    }

    #[test]
    fn a_batch_send_to_a_vanished_peer_is_an_error_not_a_signal() {
        let (a, b) = pair().unwrap();
        drop(b);
        let error = send_batch(a.as_fd(), &[b"x"; 3]).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::EPIPE), "{error}");
        assert_eq!(error.to_string(), "sendmmsg failed: EPIPE: Broken pipe");
        // One message goes through sendmsg, and says so.
        let error = send_batch(a.as_fd(), &[b"x"]).unwrap_err();
        assert_eq!(error.to_string(), "sendmsg failed: EPIPE: Broken pipe");
    }

    #[test]
    fn batches_stay_within_half_the_fd_limit() {
        let check = |soft: u64, expected: usize| {
            assert_eq!(batch_slots_for(soft), expected, "soft limit {soft}");
        };
        for (soft, expected) in [
            (0, 1),
            (32, 1),
            (1011, 1),
            (1012, 2),
            (1024, 2),
            (4096, 8),
            (8096, 16),
            (16191, 31),
            (16192, MAX_BATCH),
            (1 << 20, MAX_BATCH),
            (u64::MAX, MAX_BATCH),
        ] {
            check(soft, expected);
        }
    }

    #[test]
    fn non_blocking_batches_say_nothing_queued_and_no_room() {
        let (a, b) = pair().unwrap();
        let mut batch = ReceiveBatch::new(4, 8);
        assert_eq!(try_receive_batch(b.as_fd(), &mut batch), Ok(None));
        send(a.as_fd(), b"x", &[]).unwrap();
        assert_eq!(try_receive_batch(b.as_fd(), &mut batch), Ok(Some(1)));
        assert_eq!(
            batch.take_next().map(|(_, bytes)| bytes.to_vec()),
            Some(b"x".to_vec())
        );
        // Fill the peer's queue: a non-blocking batch send stops where it is
        // full and says how far it got, in order.
        let payload = vec![9u8; 4096];
        let mut sent = 0;
        loop {
            let got = try_send_batch(a.as_fd(), &[&payload[..]; 8]).unwrap();
            sent += got;
            if got < 8 {
                break;
            }
        }
        assert!(sent > 0);
        assert_eq!(try_send_batch(a.as_fd(), &[&payload[..]]), Ok(0), "full");
        let mut received = 0;
        while let Some(count) = try_receive_batch(b.as_fd(), &mut batch).unwrap() {
            received += count;
        }
        assert_eq!(received, sent, "every message sent arrived, none twice");
    }

    #[test]
    fn a_batch_without_a_mapping_takes_one_message_at_a_time() {
        let (a, b) = pair().unwrap();
        for payload in [&b"one"[..], b"two", b"three"] {
            send(a.as_fd(), payload, &[]).unwrap();
        }
        let mut batch = ReceiveBatch::single(64);
        assert_eq!(batch.slots(), 1);
        for payload in [&b"one"[..], b"two", b"three"] {
            assert_eq!(receive_batch(b.as_fd(), &mut batch).unwrap(), 1);
            assert_eq!(
                batch.take_next().map(|(_, bytes)| bytes.to_vec()),
                Some(payload.to_vec())
            );
        }
        drop(a);
        assert_eq!(
            receive_batch(b.as_fd(), &mut batch).unwrap(),
            1,
            "the end is one"
        );
        assert!(batch.take_next().unwrap().0.is_end_of_stream());
    }

    #[test]
    fn after_single_messages_a_batch_asks_for_one_for_a_while() {
        let (a, b) = pair().unwrap();
        let mut batch = ReceiveBatch::new(8, 8);
        // Each step: messages queued, then what each receive brings.
        let check = |batch: &mut ReceiveBatch, queued: usize, expected: &[usize]| {
            for _ in 0..queued {
                send(a.as_fd(), b"m", &[]).unwrap();
            }
            for &count in expected {
                assert_eq!(receive_batch(b.as_fd(), batch).unwrap(), count);
            }
        };
        check(&mut batch, 3, &[3]);
        // One found alone: the next receive asks for one.
        check(&mut batch, 1, &[1]);
        check(&mut batch, 3, &[1, 2]);
        // Two full-width singles in a row: two narrow receives follow.
        check(&mut batch, 1, &[1]);
        check(&mut batch, 1, &[1]);
        check(&mut batch, 1, &[1]);
        check(&mut batch, 4, &[1, 1, 2]);
        // However long the run, at most NARROW_AFTER_SINGLES narrow ones:
        // from a full-width single after a long run of them, exactly that.
        for _ in 0..100 {
            check(&mut batch, 1, &[1]);
        }
        while batch.narrow != NARROW_AFTER_SINGLES {
            check(&mut batch, 1, &[1]);
        }
        let narrow = NARROW_AFTER_SINGLES as usize;
        let mut expected = vec![1; narrow];
        expected.push(3);
        check(&mut batch, narrow + 3, &expected);
    }

    #[test]
    fn truncated_payload_is_flagged() {
        let (a, b) = pair().unwrap();
        send(a.as_fd(), &[7; 100], &[]).unwrap();
        let mut buffer = [0u8; 10];
        let got = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
        assert!(got.payload_truncated);
        assert_eq!(got.len, 10);
    }

    #[test]
    fn end_of_stream_and_broken_pipe() {
        let (a, b) = pair().unwrap();
        drop(a);
        let mut buffer = [0u8; 8];
        let got = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap();
        assert!(got.is_end_of_stream());
        // MSG_NOSIGNAL: an error, not a SIGPIPE that kills the test process.
        let error = send(b.as_fd(), b"x", &[]).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::EPIPE));
    }

    #[test]
    fn listening_sockets_are_owner_only_and_peers_are_known() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sealpass-fdpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mode.sock");
        let _ = std::fs::remove_file(&path);
        let listener = listen(&path, 1).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _client = connect(&path).unwrap();
        let served = accept(listener.as_fd()).unwrap();
        let peer = peer_credentials(served.as_fd()).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
        // /proc/self belongs to this process's effective uid.
        assert_eq!(
            peer.uid,
            std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shutting_down_reading_still_delivers_what_is_queued() {
        let (a, b) = pair().unwrap();
        send(a.as_fd(), b"queued", &[]).unwrap();
        shut_down_reading(b.as_fd()).unwrap();
        let mut buffer = [0u8; 16];
        let mut control = ControlBuffer::new();
        assert_eq!(
            receive(b.as_fd(), &mut buffer, &mut control).unwrap().len,
            6
        );
        assert!(
            receive(b.as_fd(), &mut buffer, &mut control)
                .unwrap()
                .is_end_of_stream()
        );
    }

    #[test]
    fn receive_timeout_is_typed() {
        let (_a, b) = pair().unwrap();
        set_timeouts(b.as_fd(), Some(Duration::from_millis(20)), None).unwrap();
        let mut buffer = [0u8; 8];
        let error = receive(b.as_fd(), &mut buffer, &mut ControlBuffer::new()).unwrap_err();
        assert_eq!(error, TransportError::TimedOut { op: Op::Receive });
    }
}
