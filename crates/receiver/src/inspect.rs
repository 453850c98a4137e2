//! Asking the kernel about a received fd. The header is never consulted here.
#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;

use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::stat::{SFlag, fstat};
use sealpass_proto::{FdFacts, FileKind, Seals};

/// Gathers the facts [`sealpass_proto::verify::check_segment`] judges. Seals
/// are read before the size: once SHRINK and GROW are seen set, the size
/// read after them cannot change any more.
pub fn facts(fd: BorrowedFd<'_>) -> Result<FdFacts, nix::Error> {
    // EINVAL: the file does not support sealing, so it is no memfd.
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
        .ok()
        .map(|bits| Seals::from_bits_retain(bits as u32));
    let stat = fstat(fd)?;
    let kind = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => FileKind::Regular,
        SFlag::S_IFDIR => FileKind::Directory,
        SFlag::S_IFIFO => FileKind::Fifo,
        SFlag::S_IFSOCK => FileKind::Socket,
        SFlag::S_IFCHR => FileKind::CharDevice,
        SFlag::S_IFBLK => FileKind::BlockDevice,
        SFlag::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    };
    let link = nix::fcntl::readlink(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str())?;
    Ok(FdFacts {
        kind,
        seals,
        size: u64::try_from(stat.st_size).unwrap_or(0),
        link: link.into_vec(),
    })
}
