//! The one way to say everything about a new segment: its name, then its
//! seals, where its pages come from and how much a stream may bring, then
//! where its bytes come from. `SealedSegment::from_bytes` and its siblings
//! are this with the defaults.

use std::io::Read;
use std::path::Path;

use sealpass_proto::Seals;

use super::fill::DEFAULT_STREAM_LIMIT;
use super::{Pages, SealedSegment, SegmentError, SegmentWriter};

/// How a new segment is made. Start with [`SealedSegment::builder`]; every
/// setting has a default (seals [`Seals::SENDER_DEFAULT`], pages
/// [`Pages::Shmem`], a stream limit of [`DEFAULT_STREAM_LIMIT`]), and the
/// last call says where the bytes come from.
///
/// ```
/// use sealpass_sender::{Pages, SealedSegment, Seals};
///
/// # fn main() -> Result<(), sealpass_sender::SegmentError> {
/// // The hugetlb pool where the machine has one, else shmem pages.
/// let frame = SealedSegment::builder("frame")
///     .pages(Pages::HugeTlb)
///     .filled(0, 2 << 20)?;
/// assert_eq!(frame.size(), 2 << 20);
///
/// let header = SealedSegment::builder("header")
///     .seals(Seals::SENDER_DEFAULT)
///     .bytes(b"w=1920 h=1080")?;
/// assert!(header.seals().contains(Seals::SENDER_DEFAULT)); // the kernel may add EXEC
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use = "a builder makes nothing until told where the bytes come from"]
pub struct SegmentBuilder<'n> {
    name: &'n str,
    seals: Seals,
    pages: Pages,
    stream_limit: u64,
}

impl SealedSegment {
    /// Starts a segment named `name` (a memfd name: at most 249 bytes, no
    /// `/`, no NUL).
    pub fn builder(name: &str) -> SegmentBuilder<'_> {
        SegmentBuilder {
            name,
            seals: Seals::SENDER_DEFAULT,
            pages: Pages::Shmem,
            stream_limit: DEFAULT_STREAM_LIMIT,
        }
    }
}

impl<'n> SegmentBuilder<'n> {
    /// The seals to apply (at least WRITE and SHRINK: a receiver maps
    /// nothing without them).
    pub fn seals(mut self, seals: Seals) -> Self {
        self.seals = seals;
        self
    }

    /// Where the pages come from. [`Pages::HugeTlb`] is taken only where
    /// the machine's pool has room and the size is a whole number of huge
    /// pages; otherwise the segment gets [`Pages::Shmem`], and
    /// [`SealedSegment::pages`] says which it got.
    pub fn pages(mut self, pages: Pages) -> Self {
        self.pages = pages;
        self
    }

    /// Most bytes [`SegmentBuilder::reader`] takes before it refuses
    /// ([`SegmentError::TooLong`]).
    pub fn stream_limit(mut self, limit: u64) -> Self {
        self.stream_limit = limit;
        self
    }

    /// A copy of `bytes` (as [`SealedSegment::from_bytes`] makes it).
    pub fn bytes(self, bytes: &[u8]) -> Result<SealedSegment, SegmentError> {
        SealedSegment::from_bytes_in(self.name, bytes, self.seals, self.pages)
    }

    /// A copy of the `len` bytes at `start`, memory that other threads or
    /// processes may write meanwhile (a Python buffer, shared memory): read
    /// by the kernel (`pwrite`) or by [`std::ptr::copy_nonoverlapping`],
    /// never through a Rust reference; what a concurrent writer changes
    /// meanwhile decides which bytes are copied, as for any reader of
    /// shared memory.
    ///
    /// # Safety
    ///
    /// The `len` bytes at `start` stay allocated and readable, at that
    /// address, until this returns.
    #[allow(unsafe_code)]
    pub unsafe fn shared_bytes(
        self,
        start: *const u8,
        len: usize,
    ) -> Result<SealedSegment, SegmentError> {
        // SAFETY: the caller's promise, passed on as it is.
        unsafe {
            SealedSegment::from_shared_bytes_in(self.name, start, len, self.seals, self.pages)
        }
    }

    /// `size` bytes, each `byte` (as [`SealedSegment::filled`] makes them).
    pub fn filled(self, byte: u8, size: u64) -> Result<SealedSegment, SegmentError> {
        SealedSegment::filled_in(self.name, byte, size, self.seals, self.pages)
    }

    /// The bytes of the regular file at `path` (as
    /// [`SealedSegment::from_file`] reads them: a file that changes size
    /// while read gives a segment of what was read, whatever the pages).
    pub fn file(self, path: impl AsRef<Path>) -> Result<SealedSegment, SegmentError> {
        SealedSegment::from_file_in(self.name, path, self.seals, self.pages)
    }

    /// Everything `reader` yields until its end, up to the stream limit
    /// (as [`SealedSegment::from_reader`] streams it; always shmem pages:
    /// the size is not known in advance).
    pub fn reader(self, reader: &mut impl Read) -> Result<SealedSegment, SegmentError> {
        SealedSegment::from_reader_at_most(self.name, reader, self.stream_limit, self.seals)
    }

    /// `size` bytes written by `fill` through a writable mapping (as
    /// [`SealedSegment::with_mapping`] does), with these pages.
    pub fn mapping<E>(
        self,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<SealedSegment, SegmentError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut writer = self.writer(size)?;
        fill(writer.bytes_mut()).map_err(|e: E| SegmentError::Fill {
            name: self.name.to_owned(),
            source: e.into(),
        })?;
        writer.seal(self.seals)
    }

    /// A writable memfd of `size` zero bytes with these pages, to write in
    /// place and seal later ([`SegmentWriter::seal`] takes the seals then).
    pub fn writer(self, size: u64) -> Result<SegmentWriter, SegmentError> {
        SegmentWriter::new_in(self.name, size, self.pages)
    }
}
