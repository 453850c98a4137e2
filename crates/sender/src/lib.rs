//! The sending side of sealpass: put bytes into memfds, seal them, and hand
//! them to a receiver in one message.
//!
//! ```
//! use sealpass_sender::{Seals, SealedSegment, Sender, Verdict};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let socket = dir.path().join("doc.sock");
//! # let listener = sealpass_receiver::Listener::bind(&socket)?;
//! # let receiver = std::thread::spawn(move || -> Result<(), sealpass_receiver::ServeError> {
//! #     let mut connection = listener.accept()?;
//! #     let transfer = connection.receive()?.expect("a transfer");
//! #     Ok(transfer.accept()?)
//! # });
//! let frame = SealedSegment::with_mapping("frame-0001", 4 << 20, Seals::SENDER_DEFAULT, |pixels| {
//!     pixels.fill(0x80); // render straight into the shared memory
//!     Ok::<(), std::io::Error>(())
//! })?;
//! let text = SealedSegment::from_bytes("caption", b"hello", Seals::SENDER_DEFAULT)?;
//!
//! let mut sender = Sender::connect(&socket)?;
//! match sender.send(&[frame, text])? {
//!     Verdict::Accepted { id } => println!("transfer {id} accepted"),
//!     Verdict::Rejected { reason, message, .. } => eprintln!("rejected: {reason}: {message}"),
//!     _ => {}
//! }
//! # receiver.join().expect("receiver")?;
//! # Ok(())
//! # }
//! ```

mod calls;
pub mod client;
pub mod compat;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod memfd;
#[cfg(feature = "tokio")]
pub mod tokio;
mod verdict;

pub use calls::{FanOutVerdict, fan_out, send_bytes, send_metadata};
pub use client::Sender;
pub use compat::{BARE_PAYLOAD_LEN, send_bare};
pub use memfd::{
    Pages, SealInPlaceError, SealedPages, SealedSegment, SegmentBuilder, SegmentError,
    SegmentWriter,
};
pub use sealpass_proto::metadata::Fields;
pub use sealpass_proto::size::{ParseSizeError, parse_size};
pub use sealpass_proto::{Metadata, RejectReason, Seals};
pub use verdict::{SendError, Verdict};

/// The README's example is compiled and run as a test of this crate.
#[cfg(all(doctest, feature = "tokio"))]
#[doc = include_str!("../../../README.md")]
struct ReadmeExample;

/// So are the examples of `docs/library.md`.
#[cfg(all(doctest, feature = "tokio"))]
#[doc = include_str!("../../../docs/library.md")]
struct LibraryDocExamples;
