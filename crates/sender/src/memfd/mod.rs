//! Creating, filling and sealing memfds.
//!
//! Every fill path ends before sealing: writable mappings are dropped first,
//! because the kernel refuses `F_SEAL_WRITE` (EBUSY) while one exists, and
//! because a mapping that outlived the seal would let this process write
//! under a receiver that trusts the seal.
#![allow(unsafe_code)]

mod builder;
mod error;
mod fill;
mod writer;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use sealpass_kernel::host::ShmemHugePages;
use sealpass_proto::{Seals, Segment};

pub use builder::SegmentBuilder;
pub use error::SegmentError;
pub use fill::DEFAULT_STREAM_LIMIT;
pub use writer::{SealInPlaceError, SealedPages, SegmentWriter};

use fill::{
    Source, back_every_page, copy_at_most, create, huge_pages, hugetlb_writer, open_source,
    read_until_full, resize, sealed_facts,
};

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
/// Ask for [`Pages::HugeTlb`] with [`SegmentBuilder::pages`]; `pages()` on
/// the result says what the kernel gave, since the request falls back to
/// [`Pages::Shmem`] rather than fail.
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
    pub(super) unsafe fn from_shared_bytes_in(
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
    pub(super) fn from_bytes_in(
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
    pub(super) fn filled_in(
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
    pub(super) fn from_reader_at_most(
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
    /// it is read is read again as `from_file` reads it, so the result is
    /// the same whatever the pages: a segment of what was read.
    pub(super) fn from_file_in(
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
                let whole = match source.read_exact(writer.bytes_mut()) {
                    Ok(()) => source.read(&mut [0u8; 1]).map_err(copy_error)? == 0,
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => false,
                    Err(error) => return Err(copy_error(error)),
                };
                if whole {
                    return writer.seal(seals);
                }
                // It changed size while read: what from_file makes of it.
                drop(writer);
                source.seek(SeekFrom::Start(0)).map_err(copy_error)?;
                let expected = source.metadata().map_or(0, |metadata| metadata.len());
                return Self::from_file_expecting(name, &mut source, expected, seals, huge_pages());
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
        add_seals: impl FnMut(&OwnedFd, SealFlag) -> Result<(), Errno>,
    ) -> Result<Self, SegmentError> {
        let seals = seal_fd(&name, &fd, size, seals, add_seals)?;
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

/// Backs every page of `fd` and seals it with `seals` (see
/// [`SealedSegment::seal_with`] for why `EBUSY` is retried); returns the
/// seals the kernel then holds, which may be more than asked
/// (`MFD_NOEXEC_SEAL` adds `F_SEAL_EXEC`). The fd stays the caller's, so a
/// failure can be undone ([`SegmentWriter::seal_in_place`]).
fn seal_fd(
    name: &str,
    fd: &OwnedFd,
    size: u64,
    seals: Seals,
    mut add_seals: impl FnMut(&OwnedFd, SealFlag) -> Result<(), Errno>,
) -> Result<Seals, SegmentError> {
    /// Tries after the first `EBUSY`, each after a longer sleep.
    const BUSY_RETRIES: u32 = 3;
    let seal_error = |errno| SegmentError::Seal {
        name: name.to_owned(),
        seals,
        errno,
    };
    back_every_page(name, fd, size)?;
    // Seal bits are below 2^31, so the cast keeps them.
    let flags = SealFlag::from_bits_retain(seals.bits() as i32);
    let mut retries = 0;
    loop {
        match add_seals(fd, flags) {
            Err(Errno::EBUSY) if retries < BUSY_RETRIES => {
                retries += 1;
                std::thread::sleep(std::time::Duration::from_millis(25 << retries));
            }
            other => break other.map_err(seal_error)?,
        }
    }
    let actual = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(seal_error)?;
    Ok(Seals::from_bits_retain(actual as u32))
}

impl AsFd for SealedSegment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests;
