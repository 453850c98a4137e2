//! Read-only mappings of verified memfds.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;

use memmap2::{Mmap, MmapOptions};
use nix::errno::Errno;
use sealpass_proto::session::Grant;

/// Maps a verified memfd read-only, `grant.size()` bytes; `None` for size 0,
/// which mmap refuses.
///
/// The [`Grant`] is the proof: only `Session::judge` makes one, after the
/// kernel reported that the memfd is that size and carries `F_SEAL_SHRINK`
/// and `F_SEAL_WRITE` ([`sealpass_proto::Seals::MAPPING_FLOOR`], which every
/// policy includes). `fd` must be the fd the grant was judged for.
/// With `populate`, the kernel faults every page in during the `mmap` call
/// (`MAP_POPULATE`): one batch instead of a fault per 4 KiB page on first
/// touch, for readers that read every byte.
pub(crate) fn map_verified(
    fd: BorrowedFd<'_>,
    grant: Grant<'_>,
    populate: bool,
) -> io::Result<Option<Mmap>> {
    let size = grant.size();
    if size == 0 {
        return Ok(None);
    }
    let length = usize::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "segment exceeds address space"))?;
    let mut options = MmapOptions::new();
    options.len(length);
    if populate {
        options.populate();
    }
    // SAFETY: the memfd is sealed against shrinking and writing, as the caller
    // verified; seals are never removed. So no process, this one included, can
    // truncate it under the mapping (no SIGBUS) or change the bytes behind the
    // `&[u8]` we hand out, and it is exactly `length` bytes long.
    match unsafe { options.map(&fd) } {
        // Kernels before 6.7 refuse a shared mapping of a write-sealed memfd
        // even read-only (the mapping could be mprotect()ed writable). A
        // private read-only mapping sees the same pages.
        Err(error) if error.raw_os_error() == Some(Errno::EPERM as i32) => {
            // SAFETY: as above.
            unsafe { options.map_copy_read_only(&fd) }.map(Some)
        }
        other => other.map(Some),
    }
}
