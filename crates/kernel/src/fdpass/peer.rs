//! Who is at the other end, and what it may be sent: `SO_PEERCRED`,
//! `SO_PEERPIDFD`, `SO_PASSRIGHTS`, and the socket's small operations.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, sockopt};

use super::*;

pub use sealpass_proto::PeerCredentials;

/// `SO_PASSRIGHTS` (Linux 6.16+), as the generic socket numbering has it
/// (x86_64, aarch64, riscv64, powerpc, ...); libc does not name it yet. The
/// architectures with numbers of their own are left to the fallback.
pub(super) const SO_PASSRIGHTS: libc::c_int = if cfg!(any(
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
pub(crate) fn refuse_fds(sock: BorrowedFd<'_>) -> Result<bool, TransportError> {
    refuse_fds_with(sock, &PASSRIGHTS_KNOWN, SO_PASSRIGHTS)
}

/// [`refuse_fds`], with the option number and the memory of the kernel's
/// answer passed in: a test gives an option no kernel knows, to take the
/// path of a kernel before 6.16.
pub(super) fn refuse_fds_with(
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
/// The tests' way to see what `refuse_fds` did.
#[cfg(test)]
pub(crate) fn passes_fds(sock: BorrowedFd<'_>) -> Result<Option<bool>, TransportError> {
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
