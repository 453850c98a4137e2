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

mod batch;
mod peer;

use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;

use sealpass_proto::limits::MAX_SEGMENTS;

pub use self::batch::*;
pub use self::peer::*;

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
    /// The socket path holds a NUL byte, which no file name can.
    #[error("socket path {path:?} holds a NUL byte; no file name can")]
    PathHasNul {
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
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(TransportError::PathHasNul {
            path: path.display().to_string(),
        });
    }
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
pub struct Incoming {
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

impl Incoming {
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
) -> Result<Incoming, TransportError> {
    receive_reusing(sock, buffer, control, Vec::new())
}

/// [`receive`], collecting the fds into `fds` (emptied first, which closes
/// any left in it), so a receiver that hands the list back after each
/// message allocates it once.
pub(crate) fn receive_reusing(
    sock: BorrowedFd<'_>,
    buffer: &mut [u8],
    control: &mut ControlBuffer,
    fds: Vec<OwnedFd>,
) -> Result<Incoming, TransportError> {
    receive_with_flags(sock, buffer, control, fds, libc::MSG_CMSG_CLOEXEC)
}

/// [`receive`] into reused buffers, without blocking (`MSG_DONTWAIT`): `Ok(None)` when
/// nothing is queued. For drivers that wait for readiness themselves (an
/// async runtime's reactor).
pub fn try_receive_reusing(
    sock: BorrowedFd<'_>,
    buffer: &mut [u8],
    control: &mut ControlBuffer,
    fds: Vec<OwnedFd>,
) -> Result<Option<Incoming>, TransportError> {
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
) -> Result<Incoming, TransportError> {
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
    Ok(Incoming {
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

#[cfg(test)]
mod tests;
