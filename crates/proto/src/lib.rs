//! The sealpass protocol: hand sealed memfds from one process to another over
//! an `AF_UNIX` `SOCK_SEQPACKET` socket, with a typed header beside the fds.
//!
//! Everything here but [`fdpass`] is I/O-free: message types, the codec,
//! limits, and the receiver's decision rules ([`verify`]), which judge the
//! facts the kernel reported about each fd. [`fdpass`] is the one module that
//! moves fds through a socket; sender and receiver both use it.
//!
//! The normative byte-level specification is `PROTOCOL.md` at the repository root.

pub mod codec;
pub mod config;
pub mod fdpass;
pub mod limits;
pub mod message;
pub mod seals;
pub mod session;
pub mod size;
pub mod verify;

pub use codec::{DecodeError, Decoded, EncodeError, MAGIC, VERSION, Version, decode, encode};
pub use config::{Access, Config, ConfigBuilder, ConfigError};
pub use message::{
    Ack, FieldError, Message, Reject, RejectReason, Segment, Transfer, validate_transfer,
};
pub use seals::{ParseSealsError, Seals};
pub use session::{MappedBudget, Reservation, Session};
pub use size::{ParseSizeError, parse_size};
pub use verify::{FdFacts, FileKind, Policy, SegmentError};
