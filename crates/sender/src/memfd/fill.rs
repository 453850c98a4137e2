//! Making a memfd and filling it: creation (with its fallbacks), the
//! sources bytes are copied from, and backing every page before sealing.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::unistd::ftruncate;
use sealpass_kernel::host::ShmemHugePages;
use sealpass_kernel::memfd::{MFdFlags, memfd_create};
use sealpass_proto::{Seals, message::validate_name};

use super::{SegmentError, SegmentWriter};

/// Allocates every page of a memfd that has holes (`fallocate`, which
/// fills holes with zeroed pages and leaves written ones alone), so that
/// what is sealed is fully backed. A receiver refuses a sparse memfd
/// (`Sparse`): reading a hole allocates a page charged to the reader, so a
/// sparse memfd would let a sender spend the receiver's memory. A memfd
/// written to its end is left as it is, for the cost of one `fstat`.
pub(super) fn back_every_page(name: &str, fd: &OwnedFd, size: u64) -> Result<(), SegmentError> {
    let back_error = |errno| SegmentError::Back {
        name: name.to_owned(),
        size,
        errno,
    };
    let stat = nix::sys::stat::fstat(fd).map_err(back_error)?;
    let allocated = u64::try_from(stat.st_blocks)
        .unwrap_or(0)
        .saturating_mul(512);
    if allocated >= size {
        return Ok(());
    }
    let length = i64::try_from(size).map_err(|_| back_error(Errno::EFBIG))?;
    loop {
        match nix::fcntl::fallocate(fd, nix::fcntl::FallocateFlags::empty(), 0, length) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(back_error),
        }
    }
}

/// Bytes to copy into a memfd.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// A slice: nobody writes it while it is borrowed.
    Slice(&'a [u8]),
    /// Memory other threads may write meanwhile (a Python buffer without the
    /// GIL): read only by the kernel or by `copy_nonoverlapping`, never
    /// through a reference, which would assert that it cannot change.
    Shared { start: *const u8, len: usize },
}

impl Source<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Source::Slice(bytes) => bytes.len(),
            Source::Shared { len, .. } => *len,
        }
    }

    /// Copies every byte to `destination`, which is `len()` bytes long.
    pub(super) fn copy_into(&self, destination: &mut [u8]) {
        match *self {
            Source::Slice(bytes) => destination.copy_from_slice(bytes),
            Source::Shared { start, len } => {
                let len = len.min(destination.len());
                // SAFETY: `start` is readable for `len` bytes until the
                // constructor returns (`SegmentBuilder::shared_bytes`'s contract);
                // `destination` is this process's own fresh mapping, which
                // cannot overlap memory the caller handed in.
                unsafe { std::ptr::copy_nonoverlapping(start, destination.as_mut_ptr(), len) }
            }
        }
    }

    /// Writes every byte at offset 0 of `file`, with `pwrite`.
    pub(super) fn write_all_at(&self, file: &File) -> io::Result<()> {
        let (start, len) = match *self {
            Source::Slice(bytes) => return file.write_all_at(bytes, 0),
            Source::Shared { start, len } => (start, len),
        };
        let mut written = 0usize;
        while written < len {
            let offset = nix::libc::off_t::try_from(written)
                .map_err(|_| io::Error::from_raw_os_error(nix::libc::EFBIG))?;
            // SAFETY: the `len - written` bytes at `start + written` are
            // readable (`SegmentBuilder::shared_bytes`'s contract); the kernel reads
            // them, and no Rust reference to them is made.
            let done = unsafe {
                nix::libc::pwrite(
                    file.as_raw_fd(),
                    start.add(written).cast(),
                    len - written,
                    offset,
                )
            };
            match done {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n > 0 => written += n as usize,
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The name, size and seals of a memfd, from the kernel: its link
/// (`/memfd:NAME (deleted)`), `fstat` and `F_GET_SEALS`.
pub(super) fn sealed_facts(fd: BorrowedFd<'_>) -> Result<(String, u64, Seals), SegmentError> {
    let not_memfd = |found: String| SegmentError::NotMemfd { found };
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
        .map_err(|errno| not_memfd(format!("F_GET_SEALS failed: {errno}")))?;
    let size = nix::sys::stat::fstat(fd)
        .map_err(|errno| not_memfd(format!("fstat failed: {errno}")))?
        .st_size;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|error| not_memfd(format!("reading its link failed: {error}")))?;
    let link = link.to_string_lossy();
    let name = link
        .strip_prefix("/memfd:")
        .and_then(|rest| rest.strip_suffix(" (deleted)"))
        .ok_or_else(|| not_memfd(link.to_string()))?;
    Ok((
        name.to_owned(),
        u64::try_from(size).unwrap_or(0),
        Seals::from_bits_retain(seals as u32),
    ))
}

/// How this machine gives memfds huge pages, read once per process: the
/// fill paths follow it (`cargo xtask bench --e2e --thp` measures it).
pub(super) fn huge_pages() -> ShmemHugePages {
    static MODE: OnceLock<ShmemHugePages> = OnceLock::new();
    *MODE.get_or_init(ShmemHugePages::read)
}

/// Whether the kernel took `MFD_NOEXEC_SEAL` (Linux 6.3+); cleared at the
/// first `EINVAL` so older kernels pay for the failed call once.
pub(super) static NOEXEC_SEAL_SUPPORTED: AtomicBool = AtomicBool::new(true);

/// `MFD_NOEXEC_SEAL`, which nix does not name.
pub(super) const MFD_NOEXEC_SEAL: MFdFlags = MFdFlags::from_bits_retain(nix::libc::MFD_NOEXEC_SEAL);

pub(super) fn create(name: &str) -> Result<OwnedFd, SegmentError> {
    create_with(name, &NOEXEC_SEAL_SUPPORTED, memfd_create)
}

/// [`create`], with `memfd_create` passed in (a test injects the `EINVAL` of
/// a kernel before 6.3 there) and the kernel's answer remembered in
/// `noexec_supported`.
pub(super) fn create_with(
    name: &str,
    noexec_supported: &AtomicBool,
    mut memfd_create: impl FnMut(&str, MFdFlags) -> Result<OwnedFd, Errno>,
) -> Result<OwnedFd, SegmentError> {
    validate_name(0, name)?;
    let base = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    if noexec_supported.load(Ordering::Relaxed) {
        match memfd_create(name, base | MFD_NOEXEC_SEAL) {
            Err(Errno::EINVAL) => noexec_supported.store(false, Ordering::Relaxed),
            other => return other.map_err(|errno| create_error(name, errno)),
        }
    }
    memfd_create(name, base).map_err(|errno| create_error(name, errno))
}

pub(super) fn create_error(name: &str, errno: Errno) -> SegmentError {
    SegmentError::Create {
        name: name.to_owned(),
        errno,
    }
}

/// A memfd of `size` bytes from the hugetlb pool, mapped for writing, or
/// `None` when the machine cannot give one: no hugetlbfs (`memfd_create`
/// refuses `MFD_HUGETLB`), a size that is not a whole number of huge pages
/// (hugetlbfs refuses to size a file otherwise), or a pool without room
/// for all of it (the shared mapping reserves every page up front, or
/// fails with `ENOMEM`). The fd of a failed attempt is closed here. With
/// the reservation made, filling cannot fault for want of a page (no
/// SIGBUS); a receiver's mapping reserves whatever the sender left
/// unreserved, or fails (`receiver/tests/owned.rs`).
pub(super) fn hugetlb_writer(name: &str, size: u64) -> Result<Option<SegmentWriter>, SegmentError> {
    validate_name(0, name)?;
    if size == 0 {
        return Ok(None);
    }
    let base = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_HUGETLB;
    // MFD_NOEXEC_SEAL as `create` learnt it; an EINVAL here may be the
    // kernel refusing MFD_HUGETLB instead, so it teaches nothing.
    let created = if NOEXEC_SEAL_SUPPORTED.load(Ordering::Relaxed) {
        memfd_create(name, base | MFD_NOEXEC_SEAL).or_else(|_| memfd_create(name, base))
    } else {
        memfd_create(name, base)
    };
    let Ok(fd) = created else {
        return Ok(None);
    };
    // A hugetlbfs file's block size is its huge page size.
    let whole_pages = nix::sys::stat::fstat(&fd)
        .ok()
        .and_then(|stat| u64::try_from(stat.st_blksize).ok())
        .is_some_and(|page| page > 0 && size % page == 0);
    if !whole_pages || resize(name, &fd, size).is_err() {
        return Ok(None);
    }
    // The mapping reserves the pages, or fails (`ENOMEM`) when the pool has
    // no room: then the fd closes and the caller falls back.
    Ok(SegmentWriter::mapping(name, size, fd, super::writer::WriterPages::Reserved).ok())
}

/// The most bytes [`SealedSegment::from_reader`](crate::SealedSegment::from_reader)
/// takes from a stream (a pipe, a device, stdin), whose length is not known
/// up front: past it the fill fails ([`SegmentError::TooLong`]) rather than
/// grow a memfd until memory runs out.
/// [`SegmentBuilder::stream_limit`](crate::SegmentBuilder::stream_limit)
/// sets another.
pub const DEFAULT_STREAM_LIMIT: u64 = 1 << 30;

/// Opens a regular file to copy from. Opened non-blocking, so that a FIFO
/// with no writer is refused at once rather than waited on for ever; a
/// FIFO, a device or a socket has no length known up front, and is refused.
pub(super) fn open_source(path: &Path) -> Result<File, SegmentError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let open_error = |source| SegmentError::Open {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(open_error)?;
    let kind = file.metadata().map_err(open_error)?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    let found = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(SegmentError::NotAFile {
        path: path.to_owned(),
        found,
    })
}

/// Copies what `reader` yields into `file` from its current offset, at
/// most `limit` bytes: [`SegmentError::TooLong`] past them. A read that a
/// signal interrupts (`EINTR`, as Python's Ctrl-C does) ends the copy with
/// [`SegmentError::Interrupted`] instead of being retried, so a stream that
/// never ends can be stopped. Returns the bytes copied.
pub(super) fn copy_at_most(
    name: &str,
    reader: &mut impl Read,
    file: &mut File,
    limit: u64,
) -> Result<u64, SegmentError> {
    let copy_error = |source| SegmentError::Copy {
        name: name.to_owned(),
        source,
    };
    let mut buffer = vec![0u8; 256 << 10];
    let mut copied = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                return Err(SegmentError::Interrupted {
                    name: name.to_owned(),
                    copied,
                });
            }
            Err(error) => return Err(copy_error(error)),
        };
        copied += read as u64;
        if copied > limit {
            return Err(SegmentError::TooLong {
                name: name.to_owned(),
                limit,
            });
        }
        io::Write::write_all(file, buffer.get(..read).unwrap_or_default()).map_err(copy_error)?;
    }
}

/// Reads from `reader` until `buffer` is full or the reader ends; returns
/// how many bytes it read.
pub(super) fn read_until_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<u64> {
    let mut filled = 0;
    while let Some(rest) = buffer.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled as u64)
}

pub(super) fn resize(name: &str, fd: impl AsFd, size: u64) -> Result<(), SegmentError> {
    let length = i64::try_from(size).map_err(|_| SegmentError::TooLarge {
        name: name.to_owned(),
        size,
    })?;
    ftruncate(fd, length).map_err(|errno| SegmentError::Resize {
        name: name.to_owned(),
        size,
        errno,
    })
}
