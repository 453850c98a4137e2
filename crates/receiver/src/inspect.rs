//! Asking the kernel about a received fd. The header is never consulted here.
//!
//! The memfd's name is only in its `/proc/self/fd/N` link. Reading that link
//! by its full path walks `/`, `proc`, `self` and `fd` on every call; reading
//! `N` relative to a held `/proc/self/fd` directory skips the walk (measured
//! in docs/performance.md). The link is read into a stack buffer
//! and copied into a reused `Vec`, so nothing is allocated per fd.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;
use nix::sys::stat::{Mode, SFlag, fstat};
use sealpass_proto::{FdFacts, FileKind, Seals};

/// Gathers the facts [`sealpass_proto::verify::check_segment`] judges.
pub fn facts(fd: BorrowedFd<'_>) -> Result<FdFacts, Errno> {
    facts_reusing(fd, Vec::new())
}

/// [`facts`], with the link read into `link` (emptied first): a receiver
/// that takes the `Vec` back from the facts allocates it once.
///
/// Seals are read before the size: once SHRINK and GROW are seen set, the
/// size read after them cannot change any more.
pub fn facts_reusing(fd: BorrowedFd<'_>, link: Vec<u8>) -> Result<FdFacts, Errno> {
    let mut facts = FdFacts {
        kind: FileKind::Other,
        seals: None,
        size: 0,
        allocated: 0,
        link,
    };
    facts_into(fd, &mut facts)?;
    Ok(facts)
}

/// [`facts`], written into `facts` (its link buffer reused).
pub fn facts_into(fd: BorrowedFd<'_>, facts: &mut FdFacts) -> Result<(), Errno> {
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
    facts.kind = kind;
    facts.seals = seals;
    facts.size = u64::try_from(stat.st_size).unwrap_or(0);
    // st_blocks counts 512-byte units whatever the file system's block size.
    facts.allocated = u64::try_from(stat.st_blocks)
        .unwrap_or(0)
        .saturating_mul(512);
    facts.link.clear();
    read_fd_link(fd, &mut facts.link)
}

/// `/proc/self/fd`, opened by this process (`pid`): after a `fork` it would
/// name the parent's fds, so a child falls back to the full path.
#[derive(Debug)]
struct ProcFdDir {
    pid: u32,
    dir: OwnedFd,
}

static PROC_FD_DIR: OnceLock<Option<ProcFdDir>> = OnceLock::new();

/// Opens the `/proc/self/fd` directory that name checks read links from,
/// if not yet open. Receivers call it before they serve, so the fd it holds
/// for the life of the process is there from the start. Without `/proc`, the
/// checks fall back to full paths (and then refuse every fd).
pub fn open_proc_fd_dir() {
    PROC_FD_DIR.get_or_init(|| {
        nix::fcntl::open(
            "/proc/self/fd",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(|dir| ProcFdDir {
            pid: std::process::id(),
            dir,
        })
    });
}

/// Longest link kept. A memfd's is at most `/memfd:` + 249 + ` (deleted)` =
/// 266 bytes; a longer link is cut here and can match no memfd name.
const LINK_BUFFER_LEN: usize = 512;

/// Appends the target of `/proc/self/fd/<fd>` to `out`: relative to the held
/// directory if [`open_proc_fd_dir`] opened it in this process, else by the
/// full path.
fn read_fd_link(fd: BorrowedFd<'_>, out: &mut Vec<u8>) -> Result<(), Errno> {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    // PREFIX, up to 10 digits, NUL.
    let mut path = [0u8; PREFIX.len() + 11];
    let (head, tail) = path.split_at_mut(PREFIX.len());
    head.copy_from_slice(PREFIX);
    let digits = write_decimal(fd.as_raw_fd().unsigned_abs(), tail);
    let held = PROC_FD_DIR
        .get()
        .and_then(Option::as_ref)
        .filter(|held| held.pid == std::process::id());
    let (dir, name) = match held {
        Some(held) => (held.dir.as_raw_fd(), tail.get(..=digits)),
        None => (libc::AT_FDCWD, path.get(..=PREFIX.len() + digits)),
    };
    let name = CStr::from_bytes_with_nul(name.unwrap_or_default()).map_err(|_| Errno::EINVAL)?;
    let mut buffer = [0u8; LINK_BUFFER_LEN];
    // SAFETY: `name` is NUL-terminated; `buffer` is writable for its length,
    // which is what readlinkat may write (it never writes a NUL); `dir` is
    // AT_FDCWD or a directory fd held open in a static.
    let len =
        unsafe { libc::readlinkat(dir, name.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
    let len = usize::try_from(Errno::result(len)?).map_err(|_| Errno::EINVAL)?;
    out.extend_from_slice(buffer.get(..len).unwrap_or(&buffer));
    Ok(())
}

/// Writes `value` in decimal at the start of `out` followed by a NUL;
/// returns the digit count. `out` needs room for 11 bytes (any `u32` and
/// its NUL); what does not fit is left out.
fn write_decimal(mut value: u32, out: &mut [u8]) -> usize {
    let mut reversed = [0u8; 10];
    let mut count = 0;
    for slot in &mut reversed {
        *slot = b'0' + (value % 10) as u8;
        count += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    let digits = reversed.get(..count).unwrap_or_default();
    for (slot, digit) in out.iter_mut().zip(digits.iter().rev()) {
        *slot = *digit;
    }
    if let Some(nul) = out.get_mut(count) {
        *nul = 0;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn decimal_table() {
        fn check(value: u32, expected: &str) {
            let mut out = [0xffu8; 11];
            let count = write_decimal(value, &mut out);
            assert_eq!(&out[..count], expected.as_bytes(), "{value}");
            assert_eq!(out[count], 0, "{value}: NUL after the digits");
        }
        check(0, "0");
        check(7, "7");
        check(10, "10");
        check(1023, "1023");
        check(u32::MAX, "4294967295");
    }

    #[test]
    fn links_read_through_the_held_directory_and_the_full_path_agree() {
        let (read_end, _write_end) = nix::unistd::pipe().unwrap();
        let path = format!("/proc/self/fd/{}", read_end.as_raw_fd());
        let through_path = std::fs::read_link(path)
            .unwrap()
            .into_os_string()
            .into_encoded_bytes();
        open_proc_fd_dir();
        assert!(PROC_FD_DIR.get().unwrap().is_some(), "/proc/self/fd opens");
        let mut through_dir = b"old".to_vec();
        let facts = facts_reusing(read_end.as_fd(), std::mem::take(&mut through_dir)).unwrap();
        assert!(facts.link.starts_with(b"pipe:["), "{:?}", facts.link);
        assert_eq!(facts.link, through_path);
        assert_eq!(facts.kind, FileKind::Fifo);
    }
}
