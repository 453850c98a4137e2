//! The sealpass protocol: hand sealed memfds from one process to another over
//! an `AF_UNIX` `SOCK_SEQPACKET` socket, with a typed header beside the fds.
//!
//! Everything here is I/O-free and safe code: message types, the codec,
//! limits, the receiver's decision rules ([`verify`]), which judge the
//! facts the kernel reported about each fd, and the session state machine
//! ([`session::Session`]) that applies them. The system calls both sides
//! make live in `sealpass-kernel`.
//!
//! The normative byte-level specification is `PROTOCOL.md` at the repository root.
//!
//! ```
//! use sealpass_proto::{Message, Seals, Segment, Transfer, decode, encode};
//!
//! let transfer = Message::Transfer(Transfer::new(1, vec![
//!     Segment::new("shma", 4 << 20, Seals::SENDER_DEFAULT),
//! ]));
//! let bytes = encode(&transfer)?; // 12-byte preamble, then the body
//! assert_eq!(&bytes[..4], b"SLPS");
//! assert_eq!(decode(&bytes)?.message, transfer);
//!
//! // Untrusted bytes get a typed error that says what a Reject would.
//! let error = decode(b"SLPX\x01\x00\x00\x00\x00\x00\x00\x00").unwrap_err();
//! assert_eq!(error.reject_reason().name(), "BadMagic");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod budget;
pub mod codec;
pub mod config;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod limits;
pub mod message;
pub mod metadata;
mod outbox;
pub mod seals;
pub mod session;
pub mod size;
mod steps;
pub mod verify;

pub use codec::{DecodeError, Decoded, EncodeError, MAGIC, VERSION, Version, decode, encode};
pub use config::{Access, Config, ConfigBuilder, ConfigError, PeerCredentials};
pub use message::{
    Ack, FieldError, Message, Reject, RejectReason, Segment, Transfer, validate_transfer,
};
pub use metadata::{Entry, Metadata};
pub use seals::{ParseSealsError, Seals};
pub use session::{MappedBudget, Reservation, Session};
pub use size::{ParseSizeError, parse_size};
pub use verify::{FdCheckError, FdFacts, FileKind, Policy};
