//! A memfd written in place through a writable mapping, then sealed.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use sealpass_proto::Seals;

use super::fill::{create, huge_pages, hugetlb_writer, resize};
use super::{Pages, SealedSegment, SegmentError};

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
    pub(super) fn mapping(
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
            ..
        } = self;
        drop(mapping);
        SealedSegment::seal(name, fd, size, seals)
    }
}
