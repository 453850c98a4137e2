//! Creating, filling and sealing memfds.
//!
//! Every fill path ends before sealing: writable mappings are dropped first,
//! because the kernel refuses `F_SEAL_WRITE` (EBUSY) while one exists, and
//! because a mapping that outlived the seal would let this process write
//! under a receiver that trusts the seal.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::ftruncate;
use sealpass_kernel::host::ShmemHugePages;
use sealpass_proto::{FieldError, Seals, Segment, message::validate_name};

/// Allocates every page of a memfd that has holes (`fallocate`, which
/// fills holes with zeroed pages and leaves written ones alone), so that
/// what is sealed is fully backed. A receiver refuses a sparse memfd
/// (`Sparse`): reading a hole allocates a page charged to the reader, so a
/// sparse memfd would let a sender spend the receiver's memory. A memfd
/// written to its end is left as it is, for the cost of one `fstat`.
fn back_every_page(name: &str, fd: &OwnedFd, size: u64) -> Result<(), SegmentError> {
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
enum Source<'a> {
    /// A slice: nobody writes it while it is borrowed.
    Slice(&'a [u8]),
    /// Memory other threads may write meanwhile (a Python buffer without the
    /// GIL): read only by the kernel or by `copy_nonoverlapping`, never
    /// through a reference, which would assert that it cannot change.
    Shared { start: *const u8, len: usize },
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::Slice(bytes) => bytes.len(),
            Source::Shared { len, .. } => *len,
        }
    }

    /// Copies every byte to `destination`, which is `len()` bytes long.
    fn copy_into(&self, destination: &mut [u8]) {
        match *self {
            Source::Slice(bytes) => destination.copy_from_slice(bytes),
            Source::Shared { start, len } => {
                let len = len.min(destination.len());
                // SAFETY: `start` is readable for `len` bytes until the
                // constructor returns (`from_shared_bytes_in`'s contract);
                // `destination` is this process's own fresh mapping, which
                // cannot overlap memory the caller handed in.
                unsafe { std::ptr::copy_nonoverlapping(start, destination.as_mut_ptr(), len) }
            }
        }
    }

    /// Writes every byte at offset 0 of `file`, with `pwrite`.
    fn write_all_at(&self, file: &File) -> io::Result<()> {
        let (start, len) = match *self {
            Source::Slice(bytes) => return file.write_all_at(bytes, 0),
            Source::Shared { start, len } => (start, len),
        };
        let mut written = 0usize;
        while written < len {
            let offset = nix::libc::off_t::try_from(written)
                .map_err(|_| io::Error::from_raw_os_error(nix::libc::EFBIG))?;
            // SAFETY: the `len - written` bytes at `start + written` are
            // readable (`from_shared_bytes_in`'s contract); the kernel reads
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

/// Why a segment could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The name breaks the protocol's rules.
    #[error(transparent)]
    InvalidName(#[from] FieldError),
    /// `memfd_create` failed.
    #[error("memfd_create({name:?}) failed: {errno}")]
    Create {
        /// The name.
        name: String,
        /// What the kernel said.
        errno: Errno,
    },
    /// The size does not fit this machine (`off_t` or the address space).
    #[error("segment {name:?}: size {size} is too large for this machine")]
    TooLarge {
        /// The name.
        name: String,
        /// The size asked for.
        size: u64,
    },
    /// `ftruncate` failed.
    #[error("segment {name:?}: sizing to {size} bytes failed: {errno}")]
    Resize {
        /// The name.
        name: String,
        /// The size asked for.
        size: u64,
        /// What the kernel said.
        errno: Errno,
    },
    /// Mapping the memfd for writing failed.
    #[error("segment {name:?}: mapping {size} bytes for writing failed")]
    Map {
        /// The name.
        name: String,
        /// The size.
        size: u64,
        /// The error.
        source: io::Error,
    },
    /// Opening the source file failed.
    #[error("opening {path} failed")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Copying bytes into the memfd failed.
    #[error("segment {name:?}: copying its bytes in failed")]
    Copy {
        /// The name.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// The caller's fill function failed.
    #[error("segment {name:?}: filling failed")]
    Fill {
        /// The name.
        name: String,
        /// What the fill function returned.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An fd handed in is not a memfd (no seals, or not a memfd's link).
    #[error("the fd is not a memfd: {found}")]
    NotMemfd {
        /// What it is, as far as the kernel says.
        found: String,
    },
    /// An fd handed in lacks seals it must carry.
    #[error("memfd {name:?} is sealed {found}; missing {missing}")]
    NotSealed {
        /// Its name.
        name: String,
        /// Its seals.
        found: Seals,
        /// The seals required but absent.
        missing: Seals,
    },
    /// A path to copy from is not a regular file: a FIFO, a device, a
    /// socket has no length known up front (and a FIFO may never end).
    #[error(
        "{path} is {found}, not a regular file: its length is not known up front; \
         read a stream with from_reader (sealpass-send --stdin NAME < PATH), which stops at a bound"
    )]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        found: &'static str,
    },
    /// A stream yielded more than the bound set for it.
    #[error(
        "segment {name:?}: the source yielded more than {limit} bytes, the bound for a stream; \
         raise it if that is expected (from_reader_at_most; sealpass-send --max-stream-size)"
    )]
    TooLong {
        /// The name.
        name: String,
        /// The bound.
        limit: u64,
    },
    /// A signal interrupted the copy (`EINTR`): Ctrl-C, say.
    #[error("segment {name:?}: interrupted by a signal after {copied} bytes")]
    Interrupted {
        /// The name.
        name: String,
        /// Bytes copied before the signal.
        copied: u64,
    },
    /// Backing every page of a sparse memfd before sealing (`fallocate`)
    /// failed: the memory or the tmpfs limit ran out (`ENOSPC`, `ENOMEM`).
    #[error(
        "segment {name:?}: backing all {size} bytes before sealing failed: {errno} \
         (a receiver refuses a memfd with holes, so every page is allocated first)"
    )]
    Back {
        /// The name.
        name: String,
        /// The size to back.
        size: u64,
        /// What the kernel said.
        errno: Errno,
    },
    /// `F_ADD_SEALS` or `F_GET_SEALS` failed.
    #[error("segment {name:?}: sealing with {seals} failed: {errno}")]
    Seal {
        /// The name.
        name: String,
        /// The seals asked for.
        seals: Seals,
        /// What the kernel said.
        errno: Errno,
    },
}

/// A memfd filled and sealed, ready to send. Dropping it closes the fd.
///
/// Every way to fill one ends before sealing, so the seal cannot fail on a
/// writable mapping:
///
/// ```
/// use sealpass_sender::{Seals, SealedSegment};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let seals = Seals::SENDER_DEFAULT; // SEAL | SHRINK | GROW | WRITE
/// let copied = SealedSegment::from_bytes("caption", b"hello", seals)?;
/// let filled = SealedSegment::filled("zeros", 0, 1 << 20, seals)?; // fallocate: no write
/// let written = SealedSegment::with_mapping("frame", 4096, seals, |bytes| {
///     bytes.fill(0x80); // straight into the shared pages
///     Ok::<(), std::io::Error>(())
/// })?;
/// let streamed = SealedSegment::from_reader("stream", &mut &b"from any reader"[..], seals)?;
/// # let file = tempfile::NamedTempFile::new()?;
/// # std::fs::write(file.path(), b"from a file")?;
/// let from_disk = SealedSegment::from_file("file", file.path(), seals)?; // copy_file_range
///
/// assert_eq!((copied.name(), copied.size()), ("caption", 5));
/// assert_eq!(filled.size(), 1 << 20);
/// assert_eq!((written.size(), streamed.size(), from_disk.size()), (4096, 15, 11));
/// // The seals the kernel reports, which may be more than asked for
/// // (MFD_NOEXEC_SEAL adds EXEC).
/// assert!(copied.seals().contains(seals));
///
/// // A sealed memfd received from elsewhere can be sent on as it is.
/// let again = SealedSegment::from_sealed_fd(copied.into_fd(), Seals::SENDER_DEFAULT)?;
/// assert_eq!((again.name(), again.size()), ("caption", 5));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SealedSegment {
    /// What the header declares: the name, the size, the seals the kernel holds.
    declared: Segment,
    fd: OwnedFd,
}

/// Where a segment's pages come from.
///
/// Ask for [`Pages::HugeTlb`] with [`SegmentWriter::new_in`],
/// [`SealedSegment::from_bytes_in`], [`SealedSegment::filled_in`] or
/// [`SealedSegment::from_file_in`]; `pages()` on the result says what the
/// kernel gave, since the request falls back to [`Pages::Shmem`] rather than
/// fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pages {
    /// The shared memory file system's page cache (`memfd_create` without
    /// `MFD_HUGETLB`): 4 KiB pages, or 2 MiB ones for big segments where the
    /// machine gives memfds transparent huge pages
    /// ([`ShmemHugePages`]).
    #[default]
    Shmem,
    /// The hugetlb pool (`MFD_HUGETLB`), in the machine's default huge page
    /// size: the pool's pages are set aside in advance
    /// (`sysctl vm.nr_hugepages`), so filling takes one fault per 2 MiB and
    /// freeing returns them to the pool. Taken only for a size that is a
    /// whole number of huge pages (hugetlbfs sizes files in whole pages, and
    /// a segment is never padded) and while the pool has room for all of
    /// it; otherwise the segment is made in [`Pages::Shmem`].
    HugeTlb,
}

impl Pages {
    /// Where `fd`'s pages come from, from the kernel (`fstatfs`):
    /// [`Pages::HugeTlb`] on hugetlbfs, [`Pages::Shmem`] for anything else
    /// (and if `fstatfs` fails).
    pub fn of(fd: BorrowedFd<'_>) -> Pages {
        use nix::sys::statfs::{HUGETLBFS_MAGIC, fstatfs};
        match fstatfs(fd) {
            Ok(stats) if stats.filesystem_type() == HUGETLBFS_MAGIC => Pages::HugeTlb,
            _ => Pages::Shmem,
        }
    }
}

/// The name, size and seals of a memfd, from the kernel: its link
/// (`/memfd:NAME (deleted)`), `fstat` and `F_GET_SEALS`.
fn sealed_facts(fd: BorrowedFd<'_>) -> Result<(String, u64, Seals), SegmentError> {
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
fn huge_pages() -> ShmemHugePages {
    static MODE: OnceLock<ShmemHugePages> = OnceLock::new();
    *MODE.get_or_init(ShmemHugePages::read)
}

/// Whether the kernel took `MFD_NOEXEC_SEAL` (Linux 6.3+); cleared at the
/// first `EINVAL` so older kernels pay for the failed call once.
static NOEXEC_SEAL_SUPPORTED: AtomicBool = AtomicBool::new(true);

/// `MFD_NOEXEC_SEAL`, which nix does not name.
const MFD_NOEXEC_SEAL: MFdFlags = MFdFlags::from_bits_retain(nix::libc::MFD_NOEXEC_SEAL);

fn create(name: &str) -> Result<OwnedFd, SegmentError> {
    create_with(name, &NOEXEC_SEAL_SUPPORTED, memfd_create)
}

/// [`create`], with `memfd_create` passed in (a test injects the `EINVAL` of
/// a kernel before 6.3 there) and the kernel's answer remembered in
/// `noexec_supported`.
fn create_with(
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

fn create_error(name: &str, errno: Errno) -> SegmentError {
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
fn hugetlb_writer(name: &str, size: u64) -> Result<Option<SegmentWriter>, SegmentError> {
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
    Ok(SegmentWriter::mapping(name, size, fd, false).ok())
}

/// The file at `path`, opened to be copied into a segment.
/// The most bytes [`SealedSegment::from_reader`] takes from a stream (a
/// pipe, a device, stdin), whose length is not known up front: past it the
/// fill fails ([`SegmentError::TooLong`]) rather than grow a memfd until
/// memory runs out. [`SealedSegment::from_reader_at_most`] sets another.
pub const DEFAULT_STREAM_LIMIT: u64 = 1 << 30;

/// Opens a regular file to copy from. Opened non-blocking, so that a FIFO
/// with no writer is refused at once rather than waited on for ever; a
/// FIFO, a device or a socket has no length known up front, and is refused.
fn open_source(path: &Path) -> Result<File, SegmentError> {
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
fn copy_at_most(
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
fn read_until_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<u64> {
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

fn resize(name: &str, fd: impl AsFd, size: u64) -> Result<(), SegmentError> {
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

impl SealedSegment {
    /// A segment holding a copy of `bytes`, written with `pwrite`: the
    /// kernel allocates the pages as it copies, with no page fault per
    /// 4 KiB. Filling a fresh mapping instead took 1.6 to 1.9 times as long
    /// at 4 KiB, 1 MiB, 64 MiB and 1 GiB (`cargo xtask bench --fill`).
    ///
    /// Where the machine gives memfds huge pages ([`ShmemHugePages`]), a
    /// segment of 2 MiB or more takes the path that gets them: with
    /// `advise`, a copy through a mapping that asks for them (a `write` gets
    /// none in that mode); with `always` or `within_size`, the memfd is
    /// sized before the `pwrite`.
    pub fn from_bytes(name: &str, bytes: &[u8], seals: Seals) -> Result<Self, SegmentError> {
        Self::from_bytes_for(name, Source::Slice(bytes), seals, huge_pages())
    }

    /// [`SealedSegment::from_bytes`] for the huge page mode `huge` (a test
    /// takes each path on any machine).
    fn from_bytes_for(
        name: &str,
        bytes: Source<'_>,
        seals: Seals,
        huge: ShmemHugePages,
    ) -> Result<Self, SegmentError> {
        let size = bytes.len() as u64;
        if huge == ShmemHugePages::Advise && huge.advise_for(size) {
            let mut writer = SegmentWriter::new(name, size)?;
            bytes.copy_into(writer.bytes_mut());
            return writer.seal(seals);
        }
        let fd = create(name)?;
        if huge.advise_for(size) {
            // `within_size` gives huge pages only inside the file's size.
            resize(name, &fd, size)?;
        }
        let file = File::from(fd);
        bytes
            .write_all_at(&file)
            .map_err(|source| SegmentError::Copy {
                name: name.to_owned(),
                source,
            })?;
        Self::seal(name.to_owned(), OwnedFd::from(file), size, seals)
    }

    /// [`SealedSegment::from_bytes_in`] for `len` bytes at `start` that
    /// other threads may write while they are copied, such as a Python
    /// buffer copied without the GIL. They are read only by the kernel
    /// (`pwrite`) or by [`std::ptr::copy_nonoverlapping`], never through a
    /// Rust reference; what a concurrent writer changes meanwhile decides
    /// which bytes are copied, as for any reader of shared memory.
    ///
    /// # Safety
    ///
    /// The `len` bytes at `start` stay allocated and readable, at that
    /// address, until this returns.
    pub unsafe fn from_shared_bytes_in(
        name: &str,
        start: *const u8,
        len: usize,
        seals: Seals,
        pages: Pages,
    ) -> Result<Self, SegmentError> {
        Self::from_source_in(name, Source::Shared { start, len }, seals, pages)
    }

    /// [`SealedSegment::from_bytes`] with its pages from `pages`: for
    /// [`Pages::HugeTlb`], copied through a mapping of a hugetlb memfd where
    /// the machine gives one (hugetlbfs takes no `write`), else as
    /// [`SealedSegment::from_bytes`] does. [`SealedSegment::pages`] says
    /// which.
    pub fn from_bytes_in(
        name: &str,
        bytes: &[u8],
        seals: Seals,
        pages: Pages,
    ) -> Result<Self, SegmentError> {
        Self::from_source_in(name, Source::Slice(bytes), seals, pages)
    }

    fn from_source_in(
        name: &str,
        bytes: Source<'_>,
        seals: Seals,
        pages: Pages,
    ) -> Result<Self, SegmentError> {
        if pages == Pages::HugeTlb {
            if let Some(mut writer) = hugetlb_writer(name, bytes.len() as u64)? {
                bytes.copy_into(writer.bytes_mut());
                return writer.seal(seals);
            }
        }
        Self::from_bytes_for(name, bytes, seals, huge_pages())
    }

    /// A segment of `size` bytes, each `byte`. A zero byte is never
    /// written: its pages are allocated zeroed (`fallocate`), as every
    /// segment's are before sealing. Any other is written with `pwrite`, from a
    /// buffer of at most 1 MiB, for the reason [`SealedSegment::from_bytes`]
    /// gives.
    /// Huge pages are taken as [`SealedSegment::from_bytes`] takes them.
    pub fn filled(name: &str, byte: u8, size: u64, seals: Seals) -> Result<Self, SegmentError> {
        Self::filled_for(name, byte, size, seals, huge_pages())
    }

    /// [`SealedSegment::filled`] for the huge page mode `huge`.
    fn filled_for(
        name: &str,
        byte: u8,
        size: u64,
        seals: Seals,
        huge: ShmemHugePages,
    ) -> Result<Self, SegmentError> {
        if byte != 0 && huge == ShmemHugePages::Advise && huge.advise_for(size) {
            let mut writer = SegmentWriter::new(name, size)?;
            writer.bytes_mut().fill(byte);
            return writer.seal(seals);
        }
        let fd = create(name)?;
        if byte == 0 || huge.advise_for(size) {
            resize(name, &fd, size)?;
        }
        if byte == 0 {
            return Self::seal(name.to_owned(), fd, size, seals);
        }
        const CHUNK: u64 = 1 << 20;
        let chunk = vec![byte; usize::try_from(size.min(CHUNK)).unwrap_or(0)];
        let file = File::from(fd);
        let copy_error = |source| SegmentError::Copy {
            name: name.to_owned(),
            source,
        };
        let mut offset = 0u64;
        while offset < size {
            let length = usize::try_from((size - offset).min(CHUNK)).unwrap_or(0);
            file.write_all_at(chunk.get(..length).unwrap_or_default(), offset)
                .map_err(copy_error)?;
            offset += length as u64;
        }
        Self::seal(name.to_owned(), OwnedFd::from(file), size, seals)
    }

    /// [`SealedSegment::filled`] with its pages from `pages`: for
    /// [`Pages::HugeTlb`], a hugetlb memfd where the machine gives one (its
    /// pages reserved in the pool, and written unless `byte` is 0), else as
    /// [`SealedSegment::filled`] does.
    pub fn filled_in(
        name: &str,
        byte: u8,
        size: u64,
        seals: Seals,
        pages: Pages,
    ) -> Result<Self, SegmentError> {
        if pages == Pages::HugeTlb {
            if let Some(mut writer) = hugetlb_writer(name, size)? {
                if byte != 0 {
                    writer.bytes_mut().fill(byte);
                }
                return writer.seal(seals);
            }
        }
        Self::filled(name, byte, size, seals)
    }

    /// A segment of `size` bytes written by `fill` through a writable shared
    /// mapping of the memfd (zeroed when `fill` starts), for data that is
    /// produced in place. Each first touch of a page faults; `MAP_POPULATE`
    /// measured no faster here (`cargo xtask bench --fill`: 0.99 to 1.07
    /// times the plain mapping's time), so the mapping is plain. Data that
    /// exists already goes faster through [`SealedSegment::from_bytes`]. The
    /// mapping is gone before the seals are applied. [`SegmentWriter`] does
    /// the same without a closure.
    pub fn with_mapping<E>(
        name: &str,
        size: u64,
        seals: Seals,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Self, SegmentError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut writer = SegmentWriter::new(name, size)?;
        fill(writer.bytes_mut()).map_err(|e: E| SegmentError::Fill {
            name: name.to_owned(),
            source: e.into(),
        })?;
        writer.seal(seals)
    }

    /// A segment holding everything `reader` yields until its end (stdin,
    /// say), streamed into the memfd without holding it on the heap, up to
    /// [`DEFAULT_STREAM_LIMIT`] bytes ([`SegmentError::TooLong`] past it).
    /// A signal that interrupts a read ends it ([`SegmentError::Interrupted`]).
    pub fn from_reader(
        name: &str,
        reader: &mut impl Read,
        seals: Seals,
    ) -> Result<Self, SegmentError> {
        Self::from_reader_at_most(name, reader, DEFAULT_STREAM_LIMIT, seals)
    }

    /// [`SealedSegment::from_reader`], taking at most `limit` bytes.
    pub fn from_reader_at_most(
        name: &str,
        reader: &mut impl Read,
        limit: u64,
        seals: Seals,
    ) -> Result<Self, SegmentError> {
        let fd = create(name)?;
        let mut file = File::from(fd);
        let size = copy_at_most(name, reader, &mut file, limit)?;
        file.seek(SeekFrom::Start(0))
            .map_err(|source| SegmentError::Copy {
                name: name.to_owned(),
                source,
            })?;
        Self::seal(name.to_owned(), OwnedFd::from(file), size, seals)
    }

    /// A regular file's bytes, `expected` of them by its size, taking huge
    /// pages as [`SealedSegment::from_bytes`] does under the mode `huge`.
    /// The segment still holds exactly what the file yields to its end,
    /// more or less than expected, but at most the larger of `expected` and
    /// [`DEFAULT_STREAM_LIMIT`]: a file that keeps growing is not followed
    /// for ever.
    fn from_file_expecting(
        name: &str,
        reader: &mut impl Read,
        expected: u64,
        seals: Seals,
        huge: ShmemHugePages,
    ) -> Result<Self, SegmentError> {
        let copy_error = |source| SegmentError::Copy {
            name: name.to_owned(),
            source,
        };
        // Sized to `expected` before the copy, in both huge page paths.
        let presized = huge.advise_for(expected);
        let (mut file, mut size, ended) = if huge == ShmemHugePages::Advise && presized {
            // A `write` gets no huge pages in this mode: read into a
            // mapping that asks for them, then stream whatever follows.
            let mut writer = SegmentWriter::new(name, expected)?;
            let read = read_until_full(reader, writer.bytes_mut()).map_err(copy_error)?;
            (File::from(writer.unmap()), read, read < expected)
        } else {
            let fd = create(name)?;
            if presized {
                // `within_size` gives huge pages only inside the file's size.
                resize(name, &fd, expected)?;
            }
            (File::from(fd), 0, false)
        };
        if !ended {
            file.seek(SeekFrom::Start(size)).map_err(copy_error)?;
            let limit = expected.max(DEFAULT_STREAM_LIMIT);
            // std::io::copy uses copy_file_range where the kernel can; a
            // regular file's reads end, so its retrying of EINTR is harmless.
            size += io::copy(&mut reader.take(limit + 1 - size.min(limit)), &mut file)
                .map_err(copy_error)?;
            if size > limit {
                return Err(SegmentError::TooLong {
                    name: name.to_owned(),
                    limit,
                });
            }
        }
        if presized && size < expected {
            resize(name, file.as_fd(), size)?;
        }
        // Offset 0, so that a peer that read()s the fd sees the bytes.
        file.seek(SeekFrom::Start(0)).map_err(copy_error)?;
        Self::seal(name.to_owned(), OwnedFd::from(file), size, seals)
    }

    /// A segment holding the bytes of the file at `path`, read to its end,
    /// never through the heap whole: copied in the kernel
    /// (`copy_file_range`), or, for a regular file of 2 MiB or more where
    /// shmem huge pages are `advise`, read into a mapping that asks for
    /// them (a write gets none in that mode): 4.2 times faster at 64 MiB
    /// and 4.7 times at 1 GiB here (`cargo xtask bench --fill --thp`), and
    /// the receiver's mapping then faults once per 2 MiB. With `always` or
    /// `within_size` the memfd is sized to the file before the copy. A file
    /// that grows or shrinks meanwhile gives a segment of what was read.
    pub fn from_file(
        name: &str,
        path: impl AsRef<Path>,
        seals: Seals,
    ) -> Result<Self, SegmentError> {
        Self::from_file_for(name, path.as_ref(), seals, huge_pages())
    }

    /// [`SealedSegment::from_file`] for the huge page mode `huge`.
    fn from_file_for(
        name: &str,
        path: &Path,
        seals: Seals,
        huge: ShmemHugePages,
    ) -> Result<Self, SegmentError> {
        let mut source = open_source(path)?;
        let expected = source.metadata().map_or(0, |metadata| metadata.len());
        Self::from_file_expecting(name, &mut source, expected, seals, huge)
    }

    /// [`SealedSegment::from_file`] with its pages from `pages`: for
    /// [`Pages::HugeTlb`], the file's bytes read into a mapping of a hugetlb
    /// memfd of the file's length, where the machine gives one, else as
    /// [`SealedSegment::from_file`] does. A file that grows or shrinks while
    /// it is read is an error ([`SegmentError::Copy`]), not a short segment.
    pub fn from_file_in(
        name: &str,
        path: impl AsRef<Path>,
        seals: Seals,
        pages: Pages,
    ) -> Result<Self, SegmentError> {
        let path = path.as_ref();
        if pages == Pages::HugeTlb {
            let mut source = open_source(path)?;
            let length = source
                .metadata()
                .map_err(|source| SegmentError::Open {
                    path: path.to_owned(),
                    source,
                })?
                .len();
            if let Some(mut writer) = hugetlb_writer(name, length)? {
                let copy_error = |source| SegmentError::Copy {
                    name: name.to_owned(),
                    source,
                };
                source.read_exact(writer.bytes_mut()).map_err(copy_error)?;
                if source.read(&mut [0u8; 1]).map_err(copy_error)? != 0 {
                    return Err(copy_error(io::Error::other(format!(
                        "{} grew past {length} bytes while it was copied",
                        path.display()
                    ))));
                }
                return writer.seal(seals);
            }
        }
        Self::from_file(name, path, seals)
    }

    /// Backs every page (see [`back_every_page`]), then seals.
    fn seal(name: String, fd: OwnedFd, size: u64, seals: Seals) -> Result<Self, SegmentError> {
        Self::seal_with(name, fd, size, seals, |fd, flags| {
            fcntl(fd, FcntlArg::F_ADD_SEALS(flags)).map(drop)
        })
    }

    /// [`SealedSegment::seal`], with `F_ADD_SEALS` passed in (a test injects
    /// the kernel's `EBUSY` there).
    ///
    /// `F_SEAL_WRITE` fails with `EBUSY` while a page of the memfd has a
    /// reference besides the page cache's. Every fill path drops its
    /// mappings first, so here that can only be a short-lived one (a page
    /// still in a CPU's LRU batch, one held by I/O in flight): the kernel
    /// waits about 150 ms for it, and on `EBUSY` so does this, a few times,
    /// before giving up. Seen once in a benchmark run, never reproduced in
    /// 200,000 fills.
    fn seal_with(
        name: String,
        fd: OwnedFd,
        size: u64,
        seals: Seals,
        mut add_seals: impl FnMut(&OwnedFd, SealFlag) -> Result<(), Errno>,
    ) -> Result<Self, SegmentError> {
        /// Tries after the first `EBUSY`, each after a longer sleep.
        const BUSY_RETRIES: u32 = 3;
        let seal_error = |errno| SegmentError::Seal {
            name: name.clone(),
            seals,
            errno,
        };
        back_every_page(&name, &fd, size)?;
        // Seal bits are below 2^31, so the cast keeps them.
        let flags = SealFlag::from_bits_retain(seals.bits() as i32);
        let mut retries = 0;
        loop {
            match add_seals(&fd, flags) {
                Err(Errno::EBUSY) if retries < BUSY_RETRIES => {
                    retries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(25 << retries));
                }
                other => break other.map_err(seal_error)?,
            }
        }
        // Declare what the kernel holds, which may be more than asked
        // (MFD_NOEXEC_SEAL adds F_SEAL_EXEC).
        let actual = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(seal_error)?;
        let seals = Seals::from_bits_retain(actual as u32);
        Ok(SealedSegment {
            declared: Segment::new(name, size, seals),
            fd,
        })
    }

    /// A segment from a memfd that is sealed already, such as one received
    /// from another process (`VerifiedSegment::into_fd` in
    /// `sealpass-receiver`), to forward it without touching its bytes. Its
    /// name, size and seals are read from the kernel; its seals must include
    /// `required` (the receiver will check them anyway). A memfd with holes
    /// has them filled with zeroed pages first (`fallocate`, allowed under
    /// every seal), which this process pays for.
    pub fn from_sealed_fd(fd: OwnedFd, required: Seals) -> Result<Self, SegmentError> {
        let facts = sealed_facts(fd.as_fd())?;
        let (name, size, seals) = facts;
        let missing = required - seals;
        if !missing.is_empty() {
            return Err(SegmentError::NotSealed {
                name,
                found: seals,
                missing,
            });
        }
        // A sealed memfd may still be sparse (one received by a receiver
        // that accepts holes): its holes are filled, charged to this
        // process, so the next receiver does not refuse it.
        back_every_page(&name, &fd, size)?;
        Ok(SealedSegment {
            declared: Segment::new(name, size, seals),
            fd,
        })
    }

    /// The memfd name, as the header declares it.
    pub fn name(&self) -> &str {
        &self.declared.name
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.declared.size
    }

    /// The seals the kernel reports for the memfd.
    pub fn seals(&self) -> Seals {
        self.declared.seals
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where the memfd's pages come from, as the kernel reports it.
    pub fn pages(&self) -> Pages {
        Pages::of(self.fd.as_fd())
    }

    /// The segment as its header declares it.
    pub fn declaration(&self) -> &Segment {
        &self.declared
    }

    /// Gives up the memfd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The same sealed memfd behind a second fd (`F_DUPFD_CLOEXEC`), to
    /// send it again while keeping this one. The seals make both as good as
    /// the original: neither can change the bytes.
    pub fn try_clone(&self) -> io::Result<SealedSegment> {
        Ok(SealedSegment {
            declared: self.declared.clone(),
            fd: self.fd.try_clone()?,
        })
    }
}

/// A memfd being written in place through a writable shared mapping, not
/// yet sealed: for a producer that fills its buffer over time (a decoder
/// writing a frame, a binding lending the pages to another language).
/// [`SegmentWriter::seal`] drops the mapping, then seals: it takes the
/// writer by value, so no borrow of the pages can outlive it and the seal
/// cannot fail on a writable mapping. Dropped unsealed, the memfd is closed.
///
/// ```
/// use sealpass_sender::{Seals, SegmentWriter};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut writer = SegmentWriter::new("frame", 8)?;
/// writer.bytes_mut()[..4].copy_from_slice(b"head"); // zeroed until written
/// writer.bytes_mut()[4..].copy_from_slice(b"tail");
/// let segment = writer.seal(Seals::SENDER_DEFAULT)?;
/// assert_eq!((segment.name(), segment.size()), ("frame", 8));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SegmentWriter {
    name: String,
    size: u64,
    /// `None` for a size of 0, which cannot be mapped.
    mapping: Option<memmap2::MmapMut>,
    /// The mapping's start, taken when it was made (no other access could
    /// exist then), so that [`SegmentWriter::as_mut_ptr`] needs no reference
    /// to pages that views lent out may be writing. An exposed address keeps
    /// the writer `Send` and `Sync`, as a raw pointer would not.
    start: usize,
    fd: OwnedFd,
}

impl SegmentWriter {
    /// A new memfd named `name` of `size` zero bytes, mapped for writing.
    pub fn new(name: &str, size: u64) -> Result<SegmentWriter, SegmentError> {
        let fd = create(name)?;
        resize(name, &fd, size)?;
        Self::mapping(name, size, fd, huge_pages().advise_for(size))
    }

    /// A writer over `fd`, a memfd this process just made and sized to
    /// `size`: maps it for writing (nothing for size 0), asking for
    /// transparent huge pages with `advise_huge`.
    fn mapping(
        name: &str,
        size: u64,
        fd: OwnedFd,
        advise_huge: bool,
    ) -> Result<SegmentWriter, SegmentError> {
        let mut mapping = if size == 0 {
            None
        } else {
            let length = usize::try_from(size).map_err(|_| SegmentError::TooLarge {
                name: name.to_owned(),
                size,
            })?;
            // SAFETY: the memfd was created by our caller and stays private
            // to this writer until `seal` gives it out, after dropping this
            // mapping: no other process or mapping can truncate it while the
            // mapping lives, and `length` is its size.
            let mapping = unsafe { memmap2::MmapOptions::new().len(length).map_mut(&fd) }.map_err(
                |source| SegmentError::Map {
                    name: name.to_owned(),
                    size,
                    source,
                },
            )?;
            if advise_huge {
                // Only a hint: a kernel without THP says EINVAL, and the
                // pages are then 4 KiB, as they would be anyway.
                let _ = mapping.advise(memmap2::Advice::HugePage);
            }
            Some(mapping)
        };
        let start = mapping
            .as_mut()
            .map_or(0, |pages| pages.as_mut_ptr().expose_provenance());
        Ok(SegmentWriter {
            name: name.to_owned(),
            size,
            mapping,
            start,
            fd,
        })
    }

    /// A new memfd of `size` zero bytes mapped for writing, its pages from
    /// `pages`: for [`Pages::HugeTlb`], a hugetlb memfd where the machine
    /// gives one (see [`Pages::HugeTlb`] for when), else as
    /// [`SegmentWriter::new`] makes it. [`SegmentWriter::pages`] says which.
    pub fn new_in(name: &str, size: u64, pages: Pages) -> Result<SegmentWriter, SegmentError> {
        if pages == Pages::HugeTlb {
            if let Some(writer) = hugetlb_writer(name, size)? {
                return Ok(writer);
            }
        }
        Self::new(name, size)
    }

    /// Where the memfd's pages come from, as the kernel reports it.
    pub fn pages(&self) -> Pages {
        Pages::of(self.fd.as_fd())
    }

    /// The memfd's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The pages, writable, shared with the memfd.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.mapping.as_deref_mut().unwrap_or_default()
    }

    /// The start of the pages, without making a reference to them: for a
    /// binding that lends them out (Python's buffer protocol) and so cannot
    /// promise that nothing else writes them while a `&mut` would live.
    /// Dangling (but non-null) for a size of 0.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        if self.start == 0 {
            return std::ptr::NonNull::dangling().as_ptr();
        }
        std::ptr::with_exposed_provenance_mut(self.start)
    }

    /// The pages, read back.
    pub fn bytes(&self) -> &[u8] {
        self.mapping.as_deref().unwrap_or_default()
    }

    /// Unmaps the pages and gives back the memfd, still unsealed.
    fn unmap(self) -> OwnedFd {
        drop(self.mapping);
        self.fd
    }

    /// Unmaps the pages, then seals the memfd with `seals`.
    pub fn seal(self, seals: Seals) -> Result<SealedSegment, SegmentError> {
        let SegmentWriter {
            name,
            size,
            mapping,
            fd,
            ..
        } = self;
        drop(mapping);
        SealedSegment::seal(name, fd, size, seals)
    }
}

impl AsFd for SealedSegment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read_all(segment: &SealedSegment) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let file = File::from(segment.fd().try_clone_to_owned().unwrap());
        let mut out = vec![0; segment.size() as usize];
        file.read_exact_at(&mut out, 0).unwrap();
        out
    }

    /// A transient `EBUSY` from `F_ADD_SEALS` is waited out a few times;
    /// one that stays is the error it is, and the fd is closed with it.
    #[test]
    fn a_busy_seal_is_retried_a_few_times_then_reported() {
        for (busy_answers, expect_ok) in [(1, true), (3, true), (4, false), (100, false)] {
            let fd = create("busy").unwrap();
            let mut calls = 0;
            let result = SealedSegment::seal_with(
                "busy".into(),
                fd,
                0,
                Seals::SENDER_DEFAULT,
                |fd, flags| {
                    calls += 1;
                    if calls <= busy_answers {
                        Err(Errno::EBUSY)
                    } else {
                        fcntl(fd, FcntlArg::F_ADD_SEALS(flags)).map(drop)
                    }
                },
            );
            match result {
                Ok(segment) => {
                    assert!(expect_ok, "{busy_answers} EBUSY answers");
                    assert!(segment.seals().contains(Seals::SENDER_DEFAULT));
                }
                Err(SegmentError::Seal { errno, .. }) => {
                    assert!(!expect_ok, "{busy_answers} EBUSY answers");
                    assert_eq!(errno, Errno::EBUSY);
                    assert_eq!(calls, 4, "the first try and three retries");
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
    }

    /// Each huge page mode takes its own path for 2 MiB and more (a
    /// mapping that asks for huge pages; a memfd sized before `pwrite`);
    /// whatever pages the kernel then gives, the bytes and seals are the
    /// same.
    #[test]
    fn every_huge_page_mode_yields_the_same_bytes_and_seals() {
        let seals = Seals::SENDER_DEFAULT;
        let huge = sealpass_kernel::host::HUGE_PAGE as usize;
        for mode in [
            ShmemHugePages::Never,
            ShmemHugePages::Advise,
            ShmemHugePages::Always,
        ] {
            for size in [4096, huge, huge + 1] {
                let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                let shared = Source::Shared {
                    start: bytes.as_ptr(),
                    len: bytes.len(),
                };
                for source in [Source::Slice(&bytes), shared] {
                    let copied = SealedSegment::from_bytes_for("b", source, seals, mode).unwrap();
                    assert_eq!(
                        (copied.size(), read_all(&copied)),
                        (size as u64, bytes.clone()),
                        "{mode:?} {size}"
                    );
                    assert!(copied.seals().contains(seals));
                }
                let mut file = tempfile::NamedTempFile::new().unwrap();
                file.write_all(&bytes).unwrap();
                let from_file =
                    SealedSegment::from_file_for("d", file.path(), seals, mode).unwrap();
                assert_eq!(
                    (from_file.size(), read_all(&from_file)),
                    (size as u64, bytes),
                    "{mode:?} {size} from a file"
                );
                assert!(from_file.seals().contains(seals));
                for byte in [0, b'f'] {
                    let filled =
                        SealedSegment::filled_for("f", byte, size as u64, seals, mode).unwrap();
                    assert_eq!(
                        read_all(&filled),
                        vec![byte; size],
                        "{mode:?} {size} {byte}"
                    );
                    assert!(filled.seals().contains(seals));
                }
            }
        }
    }

    /// Sources whose length is not known up front are refused (from_file)
    /// or read up to a bound (from_reader); a signal ends a read.
    #[test]
    fn unbounded_sources_are_refused_or_bounded_and_signals_end_them() {
        let seals = Seals::SENDER_DEFAULT;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // A FIFO with no writer: refused at once, not waited on.
        for (path, found) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            for result in [
                SealedSegment::from_file("s", path, seals),
                SealedSegment::from_file_in("s", path, seals, Pages::HugeTlb),
            ] {
                match result {
                    Err(error @ SegmentError::NotAFile { .. }) => {
                        let text = error.to_string();
                        assert!(text.contains(found) && text.contains("--stdin"), "{text}");
                    }
                    other => panic!("{}: expected NotAFile, got {other:?}", path.display()),
                }
            }
        }
        // An endless stream stops at the bound, with advice.
        let mut zeros = File::open("/dev/zero").unwrap();
        match SealedSegment::from_reader_at_most("z", &mut zeros, 1 << 20, seals) {
            Err(error @ SegmentError::TooLong { limit: 1048576, .. }) => {
                assert!(error.to_string().contains("--max-stream-size"), "{error}");
            }
            other => panic!("expected TooLong, got {other:?}"),
        }
        // Exactly the bound is taken.
        let exact = SealedSegment::from_reader_at_most(
            "x",
            &mut Read::by_ref(&mut zeros).take(4096),
            4096,
            seals,
        )
        .unwrap();
        assert_eq!(exact.size(), 4096);
        // A read a signal interrupts ends the fill.
        struct Interrupting;
        impl Read for Interrupting {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::Interrupted.into())
            }
        }
        assert!(matches!(
            SealedSegment::from_reader("i", &mut Interrupting, seals),
            Err(SegmentError::Interrupted { copied: 0, .. })
        ));
    }

    /// A reader that yields more or less than expected (a file that grew
    /// or shrank while it was copied) gives a segment of what it yielded,
    /// on every huge page path.
    #[test]
    fn a_segment_holds_what_the_reader_yielded_whatever_was_expected() {
        let huge = sealpass_kernel::host::HUGE_PAGE;
        let check = |mode: ShmemHugePages, yielded: u64, expected: u64| {
            let bytes: Vec<u8> = (0..yielded).map(|i| (i % 253) as u8).collect();
            let segment = SealedSegment::from_file_expecting(
                "r",
                &mut io::Cursor::new(&bytes),
                expected,
                Seals::SENDER_DEFAULT,
                mode,
            )
            .unwrap();
            // The memfd's own size, which a receiver checks against the
            // declared one.
            let kernel_size = File::from(segment.fd().try_clone_to_owned().unwrap())
                .metadata()
                .unwrap()
                .len();
            assert_eq!(
                (segment.size(), kernel_size, read_all(&segment)),
                (yielded, yielded, bytes),
                "{mode:?}: {yielded} bytes yielded, {expected} expected"
            );
        };
        for mode in [
            ShmemHugePages::Never,
            ShmemHugePages::Advise,
            ShmemHugePages::Always,
        ] {
            for (yielded, expected) in [
                (huge, huge),
                (huge - 1, huge),
                (huge + 4097, huge),
                (0, huge),
                (1, huge),
                (3 * huge, huge),
                (4096, 0),
            ] {
                check(mode, yielded, expected);
            }
        }
    }

    /// Huge pages of the hugetlb pool free for a new reservation, and their
    /// size in bytes (0 without hugetlbfs).
    fn hugetlb_room() -> (u64, u64) {
        sealpass_kernel::host::HugeTlbPool::read()
            .map_or((0, 0), |pool| (pool.room(), pool.page_bytes))
    }

    /// `Pages::HugeTlb` is honoured exactly when the machine can: a size of
    /// whole huge pages and a pool with room for it; otherwise the segment
    /// is made in shmem. Either way the bytes and seals are right. On a
    /// machine without a pool every case falls back; `cargo xtask vm` boots
    /// its kernels with one, where the eligible cases take it.
    #[test]
    fn hugetlb_is_taken_where_the_pool_has_room_and_falls_back_otherwise() {
        let seals = Seals::SENDER_DEFAULT;
        let (_, huge) = hugetlb_room();
        let huge = if huge == 0 { 2 << 20 } else { huge };
        let mut source = tempfile::NamedTempFile::new().unwrap();
        let pattern = |size: u64| (0..size).map(|i| (i % 253) as u8).collect::<Vec<u8>>();
        source.write_all(&pattern(2 * huge)).unwrap();
        type Make = Box<dyn Fn() -> Result<(SealedSegment, Vec<u8>), SegmentError>>;
        let path = source.path().to_owned();
        let cases: Vec<(&str, u64, Make)> = vec![
            (
                "bytes, one huge page",
                huge,
                Box::new(move || {
                    let bytes = pattern(huge);
                    Ok((
                        SealedSegment::from_bytes_in("h1", &bytes, seals, Pages::HugeTlb)?,
                        bytes,
                    ))
                }),
            ),
            (
                "filled, two huge pages",
                2 * huge,
                Box::new(move || {
                    let segment =
                        SealedSegment::filled_in("h2", b'H', 2 * huge, seals, Pages::HugeTlb)?;
                    Ok((segment, vec![b'H'; 2 * huge as usize]))
                }),
            ),
            (
                "zeros, reserved, not written",
                huge,
                Box::new(move || {
                    let segment = SealedSegment::filled_in("h0", 0, huge, seals, Pages::HugeTlb)?;
                    Ok((segment, vec![0; huge as usize]))
                }),
            ),
            (
                "a file of two huge pages",
                2 * huge,
                Box::new(move || {
                    let segment = SealedSegment::from_file_in("hf", &path, seals, Pages::HugeTlb)?;
                    Ok((segment, pattern(2 * huge)))
                }),
            ),
            (
                "not whole pages",
                huge + 4096,
                Box::new(move || {
                    let segment =
                        SealedSegment::filled_in("hx", b'x', huge + 4096, seals, Pages::HugeTlb)?;
                    Ok((segment, vec![b'x'; huge as usize + 4096]))
                }),
            ),
            (
                "small",
                4096,
                Box::new(move || {
                    let bytes = pattern(4096);
                    Ok((
                        SealedSegment::from_bytes_in("hs", &bytes, seals, Pages::HugeTlb)?,
                        bytes,
                    ))
                }),
            ),
            (
                "empty",
                0,
                Box::new(move || {
                    Ok((
                        SealedSegment::filled_in("he", b'e', 0, seals, Pages::HugeTlb)?,
                        Vec::new(),
                    ))
                }),
            ),
        ];
        for (case, size, make) in cases {
            let (room, _) = hugetlb_room();
            let expected = if size > 0 && size % huge == 0 && room >= size / huge {
                Pages::HugeTlb
            } else {
                Pages::Shmem
            };
            let (segment, bytes) = make().unwrap();
            assert_eq!(segment.pages(), expected, "{case}: pool room {room}");
            assert_eq!(segment.size(), size, "{case}");
            assert_eq!(read_all(&segment), bytes, "{case}");
            assert!(
                segment.seals().contains(seals),
                "{case}: {}",
                segment.seals()
            );
        }
        // The writer reports what it got, and a plain request never uses the pool.
        let writer = SegmentWriter::new_in("w", huge, Pages::Shmem).unwrap();
        assert_eq!(writer.pages(), Pages::Shmem);
    }

    #[test]
    fn every_fill_path_yields_the_bytes_and_the_seals() {
        let seals = Seals::SENDER_DEFAULT;
        let mut source = tempfile::NamedTempFile::new().unwrap();
        source.write_all(b"from a file").unwrap();
        let cases = [
            (
                SealedSegment::from_bytes("a", b"bytes", seals).unwrap(),
                b"bytes".to_vec(),
            ),
            (
                SealedSegment::filled("b", b'B', 3, seals).unwrap(),
                b"BBB".to_vec(),
            ),
            (
                SealedSegment::from_reader("c", &mut &b"stream"[..], seals).unwrap(),
                b"stream".to_vec(),
            ),
            (
                SealedSegment::from_file("d", source.path(), seals).unwrap(),
                b"from a file".to_vec(),
            ),
            (
                SealedSegment::filled("e", b'x', 0, seals).unwrap(),
                Vec::new(),
            ),
            // Past one pwrite chunk, and not a multiple of it.
            (
                SealedSegment::filled("f", b'z', (3 << 20) + 5, seals).unwrap(),
                vec![b'z'; (3 << 20) + 5],
            ),
            (
                SealedSegment::filled("sparse", 0, 1 << 20, seals).unwrap(),
                vec![0; 1 << 20],
            ),
        ];
        for (segment, expected) in cases {
            assert_eq!(read_all(&segment), expected, "{}", segment.name());
            assert_eq!(segment.size(), expected.len() as u64);
            assert!(segment.seals().contains(seals), "{}", segment.seals());
            assert_fully_backed(&segment);
        }
    }

    /// What a receiver checks before it maps: no holes.
    fn assert_fully_backed(segment: &SealedSegment) {
        let stat = nix::sys::stat::fstat(segment.fd()).unwrap();
        assert!(
            stat.st_blocks as u64 * 512 >= segment.size(),
            "{}: {} of {} bytes allocated",
            segment.name(),
            stat.st_blocks * 512,
            segment.size()
        );
    }

    #[test]
    fn no_segment_is_sealed_with_holes() {
        let seals = Seals::SENDER_DEFAULT;
        let size = 4 << 20;
        // A mapping the fill touches only at its ends, a writer that writes
        // nothing, and a sparse memfd sealed elsewhere, then forwarded.
        let touched_at_ends = SealedSegment::with_mapping("ends", size, seals, |bytes| {
            bytes[0] = 1;
            bytes[bytes.len() - 1] = 2;
            Ok::<(), io::Error>(())
        })
        .unwrap();
        let untouched = SegmentWriter::new("untouched", size)
            .unwrap()
            .seal(seals)
            .unwrap();
        let sealed_sparse = create("forwarded").unwrap();
        resize("forwarded", &sealed_sparse, size).unwrap();
        fcntl(
            &sealed_sparse,
            FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals.bits() as i32)),
        )
        .unwrap();
        let forwarded = SealedSegment::from_sealed_fd(sealed_sparse, seals).unwrap();
        for segment in [&touched_at_ends, &untouched, &forwarded] {
            assert_fully_backed(segment);
        }
        let mut expected = vec![0; size as usize];
        expected[0] = 1;
        expected[size as usize - 1] = 2;
        assert_eq!(read_all(&touched_at_ends), expected);
        assert_eq!(read_all(&forwarded), vec![0; size as usize]);
    }

    /// The fallback a kernel before 6.3 takes, by fault injection: it
    /// refuses `MFD_NOEXEC_SEAL` with EINVAL once; the memfd is made
    /// without it, and later ones do not ask again.
    #[test]
    fn an_einval_for_noexec_seal_falls_back_once_and_is_remembered() {
        let supported = AtomicBool::new(true);
        let mut calls = Vec::new();
        let mut kernel_6_1 = |name: &str, flags: MFdFlags| {
            calls.push(flags.contains(MFD_NOEXEC_SEAL));
            if flags.contains(MFD_NOEXEC_SEAL) {
                Err(Errno::EINVAL)
            } else {
                memfd_create(name, flags)
            }
        };
        let first = create_with("old-kernel", &supported, &mut kernel_6_1).unwrap();
        let second = create_with("old-kernel", &supported, &mut kernel_6_1).unwrap();
        assert_eq!(calls, [true, false, false], "asked once, then never again");
        assert!(!supported.load(Ordering::Relaxed));
        // What was made is a sealable memfd all the same.
        for fd in [first, second] {
            let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap();
            assert_eq!(seals & nix::libc::F_SEAL_SEAL, 0, "sealing is allowed");
        }
        // Any other error is reported as it is.
        let error = create_with("full", &AtomicBool::new(true), |_, _| Err(Errno::EMFILE));
        assert!(matches!(
            error,
            Err(SegmentError::Create {
                errno: Errno::EMFILE,
                ..
            })
        ));
    }

    #[test]
    fn sealed_memfds_refuse_writes_and_truncation() {
        let segment = SealedSegment::filled("w", b'A', 4096, Seals::SENDER_DEFAULT).unwrap();
        let file = File::from(segment.fd().try_clone_to_owned().unwrap());
        let write = FileExt::write_at(&file, b"x", 0).unwrap_err();
        assert_eq!(write.raw_os_error(), Some(Errno::EPERM as i32));
        assert_eq!(ftruncate(&file, 0), Err(Errno::EPERM));
    }

    #[test]
    fn fill_errors_are_reported() {
        let error = SealedSegment::with_mapping("f", 10, Seals::empty(), |_| Err("disk on fire"))
            .unwrap_err();
        // This level's words, then the cause as the source: each said once.
        assert_eq!(error.to_string(), "segment \"f\": filling failed");
        assert_eq!(
            std::error::Error::source(&error).map(ToString::to_string),
            Some("disk on fire".to_owned())
        );
        let error = SealedSegment::filled("a\0b", 1, 1, Seals::empty()).unwrap_err();
        assert!(matches!(error, SegmentError::InvalidName(_)), "{error}");
    }
}
