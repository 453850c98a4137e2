//! A memfd written in place through a writable mapping, then sealed.
#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, mmap_anonymous, munmap};
use sealpass_proto::{Seals, Segment};

use super::fill::{back_every_page, create, huge_pages, hugetlb_writer, resize};
use super::{Pages, SealedSegment, SegmentError, seal_fd};

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
    /// The writable shared mapping; `None` for a size of 0, which cannot
    /// be mapped.
    mapping: Option<Mapping>,
    pub(super) fd: OwnedFd,
}

impl SegmentWriter {
    /// A new memfd named `name` of `size` zero bytes, mapped for writing.
    pub fn new(name: &str, size: u64) -> Result<SegmentWriter, SegmentError> {
        let fd = create(name)?;
        resize(name, &fd, size)?;
        let pages = if huge_pages().advise_for(size) {
            WriterPages::HugeAsWritten
        } else {
            WriterPages::SmallUpFront
        };
        Self::mapping(name, size, fd, pages)
    }

    /// A writer over `fd`, a memfd this process just made and sized to
    /// `size`: maps it for writing (nothing for size 0), its pages made as
    /// `pages` says.
    pub(super) fn mapping(
        name: &str,
        size: u64,
        fd: OwnedFd,
        pages: WriterPages,
    ) -> Result<SegmentWriter, SegmentError> {
        if pages == WriterPages::SmallUpFront && size > 0 {
            allocate_zeroed(name, &fd, size)?;
        }
        let mapping = if size == 0 {
            None
        } else {
            let too_large = || SegmentError::TooLarge {
                name: name.to_owned(),
                size,
            };
            let length = usize::try_from(size).map_err(|_| too_large())?;
            let length = NonZeroUsize::new(length).ok_or_else(too_large)?;
            // SAFETY: a new mapping, at an address the kernel picks, of the
            // memfd our caller just made: it stays private to this writer
            // until `seal` gives it out, after unmapping, so no other process
            // can truncate it under the mapping; `length` is its size.
            let start = unsafe {
                mmap(
                    None,
                    length,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    &fd,
                    0,
                )
            }
            .map_err(|errno| SegmentError::Map {
                name: name.to_owned(),
                size,
                source: errno.into(),
            })?;
            let mapping = Mapping {
                start: start.as_ptr().expose_provenance(),
                length,
            };
            let advice = match pages {
                // Only a hint: a kernel without THP says EINVAL, and the
                // pages are then 4 KiB, as they would be anyway.
                WriterPages::HugeAsWritten => Some(MmapAdvise::MADV_HUGEPAGE),
                // Maps the pages allocated above as a read fault would,
                // 16 to a fault (fault-around), writable; a kernel before
                // 5.14 says EINVAL, and then each page faults as written.
                WriterPages::SmallUpFront => Some(MmapAdvise::MADV_POPULATE_READ),
                WriterPages::Reserved => None,
            };
            if let Some(advice) = advice {
                // SAFETY: advice on our own mapping; neither changes any
                // content.
                let _ = unsafe { madvise(start, length.get(), advice) };
            }
            Some(mapping)
        };
        Ok(SegmentWriter {
            name: name.to_owned(),
            size,
            mapping,
            fd,
        })
    }

    /// A new memfd of `size` zero bytes mapped for writing, its pages from
    /// `pages`: for [`Pages::HugeTlb`], a hugetlb memfd where the machine
    /// gives one (see [`Pages::HugeTlb`] for when), else as
    /// [`SegmentWriter::new`] makes it. [`SegmentWriter::pages`] says which.
    pub(super) fn new_in(
        name: &str,
        size: u64,
        pages: Pages,
    ) -> Result<SegmentWriter, SegmentError> {
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
        match &self.mapping {
            // SAFETY: the mapping is ours, `length` bytes long and writable,
            // and `&mut self` keeps every other reference to it away.
            Some(mapping) => unsafe {
                std::slice::from_raw_parts_mut(mapping.as_mut_ptr(), mapping.length.get())
            },
            None => &mut [],
        }
    }

    /// The start of the pages, without making a reference to them: for a
    /// binding that lends them out (Python's buffer protocol) and so cannot
    /// promise that nothing else writes them while a `&mut` would live.
    /// Dangling (but non-null) for a size of 0.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.mapping
            .as_ref()
            .map_or(NonNull::dangling().as_ptr(), Mapping::as_mut_ptr)
    }

    /// The pages, read back.
    pub fn bytes(&self) -> &[u8] {
        match &self.mapping {
            // SAFETY: the mapping is ours and `length` bytes long; `&self`
            // keeps `bytes_mut` from writing it meanwhile.
            Some(mapping) => unsafe {
                std::slice::from_raw_parts(mapping.as_mut_ptr(), mapping.length.get())
            },
            None => &[],
        }
    }

    /// Unmaps the pages and gives back the memfd, still unsealed.
    pub(super) fn unmap(self) -> OwnedFd {
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
        } = self;
        drop(mapping);
        SealedSegment::seal(name, fd, size, seals)
    }

    /// Seals the memfd with `seals` while its pages stay mapped where they
    /// are: for a binding that lent them out and cannot call its views back
    /// (Python's `sealpass.empty` arrays). The writable shared mapping is
    /// replaced in place (`MAP_FIXED`) by a private copy-on-write mapping of
    /// the same memfd, and only then is the memfd sealed. Through the same
    /// addresses, reads see the sealed bytes (the same pages, not copied); a
    /// write copies the page it touches into this process's own memory and
    /// never reaches the memfd. What was written before the replacement is
    /// in the memfd, and nothing can write it after, so the seal holds.
    ///
    /// Not for hugetlb pages ([`SegmentError::HugeTlbInPlace`]): a private
    /// copy of them needs huge pages reserved from the pool up front, or a
    /// later write could end in `SIGBUS`.
    ///
    /// On failure the writer comes back in the error as it was, mapped
    /// shared and writable again, unless even that mapping could not be
    /// made again ([`SegmentError::PagesLost`]).
    pub fn seal_in_place(
        self,
        seals: Seals,
    ) -> Result<(SealedSegment, SealedPages), SealInPlaceError> {
        self.seal_in_place_with(seals, |fd, flags| {
            fcntl(fd, FcntlArg::F_ADD_SEALS(flags)).map(drop)
        })
    }

    /// [`SegmentWriter::seal_in_place`], with `F_ADD_SEALS` passed in (a
    /// test makes it fail).
    pub(super) fn seal_in_place_with(
        self,
        seals: Seals,
        add_seals: impl FnMut(&OwnedFd, nix::fcntl::SealFlag) -> Result<(), Errno>,
    ) -> Result<(SealedSegment, SealedPages), SealInPlaceError> {
        if self.pages() == Pages::HugeTlb {
            let error = SegmentError::HugeTlbInPlace {
                name: self.name.clone(),
            };
            return Err(SealInPlaceError::restored(error, self));
        }
        // Holes filled while the mapping is still shared: the private one
        // then finds every page there, and reading it allocates nothing.
        if let Err(error) = back_every_page(&self.name, &self.fd, self.size) {
            return Err(SealInPlaceError::restored(error, self));
        }
        if let Some(mapping) = &self.mapping {
            if let Err(errno) = mapping.remap(&self.fd, Sharing::CopyOnWrite) {
                let error = SegmentError::Remap {
                    name: self.name.clone(),
                    errno,
                };
                return Err(self.restore(error));
            }
        }
        match seal_fd(&self.name, &self.fd, self.size, seals, add_seals) {
            Ok(seals) => {
                let SegmentWriter {
                    name,
                    size,
                    mapping,
                    fd,
                } = self;
                let segment = SealedSegment {
                    declared: Segment::new(name, size, seals),
                    fd,
                };
                Ok((segment, SealedPages { mapping }))
            }
            Err(error) => Err(self.restore(error)),
        }
    }

    /// After `error` in [`SegmentWriter::seal_in_place`]: the pages mapped
    /// shared and writable again, and the writer back; failing that, zeroed
    /// private pages there instead, kept for good, so that no view lent out
    /// points at nothing.
    fn restore(mut self, error: SegmentError) -> SealInPlaceError {
        let Some(mapping) = self.mapping.take() else {
            return SealInPlaceError::restored(error, self);
        };
        match mapping.remap(&self.fd, Sharing::Shared) {
            Ok(()) => {
                self.mapping = Some(mapping);
                SealInPlaceError::restored(error, self)
            }
            Err(errno) => {
                mapping.zero_for_good();
                SealInPlaceError {
                    error: SegmentError::PagesLost {
                        name: self.name.clone(),
                        errno,
                        after: Box::new(error),
                    },
                    writer: None,
                }
            }
        }
    }
}

/// How a writer's pages are made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum WriterPages {
    /// From the hugetlb pool, reserved by the mapping, faulted as written.
    Reserved,
    /// Shmem transparent huge pages, asked for (`MADV_HUGEPAGE`) and
    /// faulted as written, 2 MiB a fault.
    HugeAsWritten,
    /// 4 KiB shmem pages, allocated up front by writing zeros (as `pwrite`
    /// fills a memfd, with no page fault) and mapped in batches: writing
    /// through a mapping costs a fault per 4 KiB page otherwise, 2.8 µs
    /// against `pwrite`'s 1.7 on the machine of docs/performance.md. The
    /// memory is charged at creation, not at some later write (a memory
    /// cgroup at its limit reclaims or kills there, as a fault would).
    SmallUpFront,
}

/// Writes zeros over all `size` bytes of `fd`, a new memfd, allocating its
/// pages.
fn allocate_zeroed(name: &str, fd: &OwnedFd, size: u64) -> Result<(), SegmentError> {
    /// One `pwrite` of zeros at a time.
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let back_error = |errno| SegmentError::Back {
        name: name.to_owned(),
        size,
        errno,
    };
    let mut offset = 0;
    while offset < size {
        let chunk =
            usize::try_from(size - offset).map_or(ZEROS.len(), |left| left.min(ZEROS.len()));
        let at = i64::try_from(offset).map_err(|_| back_error(Errno::EFBIG))?;
        match nix::sys::uio::pwrite(fd, ZEROS.get(..chunk).unwrap_or(&ZEROS), at) {
            Ok(written) => offset += written as u64,
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(back_error(errno)),
        }
    }
    Ok(())
}

/// Why [`SegmentWriter::seal_in_place`] failed, with the writer given back
/// when its pages could be mapped as they were.
#[derive(Debug)]
pub struct SealInPlaceError {
    error: SegmentError,
    writer: Option<SegmentWriter>,
}

impl SealInPlaceError {
    fn restored(error: SegmentError, writer: SegmentWriter) -> SealInPlaceError {
        SealInPlaceError {
            error,
            writer: Some(writer),
        }
    }

    /// What failed.
    pub fn error(&self) -> &SegmentError {
        &self.error
    }

    /// The writer, unsealed and writable as before; `None` after
    /// [`SegmentError::PagesLost`].
    pub fn into_writer(self) -> Option<SegmentWriter> {
        self.writer
    }
}

impl std::fmt::Display for SealInPlaceError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(formatter)
    }
}

impl std::error::Error for SealInPlaceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

/// The pages of a writer sealed in place ([`SegmentWriter::seal_in_place`]):
/// a private copy-on-write mapping of the sealed memfd at the addresses the
/// writer's pages had. Dropping it unmaps them, so it must outlive every
/// view of them.
#[derive(Debug)]
pub struct SealedPages {
    /// `None` for a size of 0.
    mapping: Option<Mapping>,
}

impl SealedPages {
    /// Where the pages start (dangling but non-null for a size of 0).
    pub fn as_ptr(&self) -> *const u8 {
        self.mapping
            .as_ref()
            .map_or(NonNull::dangling().as_ptr(), Mapping::as_mut_ptr)
            .cast_const()
    }

    /// Their length in bytes.
    pub fn len(&self) -> usize {
        self.mapping
            .as_ref()
            .map_or(0, |mapping| mapping.length.get())
    }

    /// Whether there are none (a size of 0).
    pub fn is_empty(&self) -> bool {
        self.mapping.is_none()
    }
}

/// How [`Mapping::remap`] maps a memfd's pages.
#[derive(Clone, Copy)]
enum Sharing {
    /// Writes reach the memfd.
    Shared,
    /// Writes copy the page into this process's memory (`MAP_NORESERVE`:
    /// nothing is charged until a page is written).
    CopyOnWrite,
}

/// A mapping this crate made, readable and writable, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    /// Its start, taken when it was made (no other access could exist
    /// then), so that no reference to pages that views lent out may be
    /// writing is ever needed. An exposed address keeps the writer `Send`
    /// and `Sync`, as a raw pointer would not.
    start: usize,
    length: NonZeroUsize,
}

impl Mapping {
    fn as_mut_ptr(&self) -> *mut u8 {
        std::ptr::with_exposed_provenance_mut(self.start)
    }

    fn start(&self) -> NonNull<std::ffi::c_void> {
        // A mapping is never at address 0.
        NonNull::new(self.as_mut_ptr().cast()).unwrap_or(NonNull::dangling())
    }

    /// Maps `fd`'s pages over this mapping, at the same addresses, as
    /// `sharing` says.
    fn remap(&self, fd: &OwnedFd, sharing: Sharing) -> Result<(), Errno> {
        let flags = match sharing {
            Sharing::Shared => MapFlags::MAP_SHARED,
            Sharing::CopyOnWrite => MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
        };
        let start = NonZeroUsize::new(self.start).ok_or(Errno::EINVAL)?;
        // SAFETY: MAP_FIXED over this mapping alone, of the same length, by
        // the memfd it maps (offset 0): every address in it stays mapped and
        // readable, and no mapping of anything else is replaced.
        unsafe {
            mmap(
                Some(start),
                self.length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags | MapFlags::MAP_FIXED,
                fd,
                0,
            )
        }
        .map(drop)
    }

    /// Zeroed private pages over this mapping, never unmapped: the last
    /// resort when its memfd cannot be mapped there again, so that a view
    /// lent out reads zeros rather than faulting.
    fn zero_for_good(self) {
        if let Some(start) = NonZeroUsize::new(self.start) {
            // SAFETY: MAP_FIXED over this mapping alone; if even this fails
            // the kernel left the range as it was or unmapped, which the
            // caller reports.
            let _ = unsafe {
                mmap_anonymous(
                    Some(start),
                    self.length,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE | MapFlags::MAP_FIXED,
                )
            };
        }
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is this value's alone, and it goes with it:
        // every slice lent from it borrowed the writer, and views lent to
        // other languages are outlived by their owner's `SealedPages`.
        // munmap of a range this crate mapped fails only for bad arguments.
        let _ = unsafe { munmap(self.start(), self.length.get()) };
    }
}
