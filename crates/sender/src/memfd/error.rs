//! Why a segment could not be made.

use std::io::{self};
use std::path::PathBuf;

use nix::errno::Errno;
use sealpass_proto::{FieldError, Seals};

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
         raise it if that is expected (SegmentBuilder::stream_limit; sealpass-send --max-stream-size)"
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
    /// Allocating every page of a memfd (`fallocate` of a sparse one
    /// before sealing; zeros written over a writer's, up front) failed: the
    /// memory or the tmpfs limit ran out (`ENOSPC`, `ENOMEM`).
    #[error(
        "segment {name:?}: allocating all {size} bytes failed: {errno} \
         (every page of a segment is allocated before it is sealed: a receiver \
         refuses a memfd with holes)"
    )]
    Back {
        /// The name.
        name: String,
        /// The size to back.
        size: u64,
        /// What the kernel said.
        errno: Errno,
    },
    /// Hugetlb pages cannot be sealed in place
    /// ([`SegmentWriter::seal_in_place`](super::SegmentWriter::seal_in_place)).
    #[error(
        "segment {name:?}: hugetlb pages cannot be sealed while views of them stay mapped \
         (a private copy of them would need huge pages reserved from the pool); release \
         the views and seal, or use pages that are not hugetlb"
    )]
    HugeTlbInPlace {
        /// The name.
        name: String,
    },
    /// Replacing the writable mapping by a copy-on-write one, before sealing
    /// in place, failed; the writable mapping is back.
    #[error("segment {name:?}: mapping its pages copy-on-write before sealing failed: {errno}")]
    Remap {
        /// The name.
        name: String,
        /// What the kernel said.
        errno: Errno,
    },
    /// Sealing in place failed, and the memfd could not be mapped back at
    /// its pages' addresses: views of them now read zeros, and the writer
    /// is gone.
    #[error(
        "segment {name:?}: after {after}, mapping its pages back failed ({errno}); \
         what was written is lost, and views of the pages read zeros"
    )]
    PagesLost {
        /// The name.
        name: String,
        /// What the kernel said when mapping them back.
        errno: Errno,
        /// The failure that came first.
        after: Box<SegmentError>,
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
