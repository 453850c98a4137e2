//! The receiving side of sealpass: accept memfds from a peer you do not
//! trust, verify each with the kernel (never the header), map it read-only
//! and answer.
//!
//! The decisions are [`sealpass_proto::Session`]'s, a state machine without
//! I/O; this crate drives it with blocking calls: [`Listener`] and
//! [`Connection`] for one peer at a time, [`Service`] for many at once.
//! [`Connection::receive`] hands out owned [`IncomingTransfer`]s, one per
//! call, reading whatever the peer queued with one `recvmmsg`:
//!
//! ```
//! use sealpass_receiver::Listener;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let socket = dir.path().join("doc.sock");
//! # let path = socket.clone();
//! # let sender = std::thread::spawn(move || -> Result<sealpass_sender::Verdict, sealpass_sender::SendError> {
//! #     // The listener may not be bound yet: wait for it.
//! #     let mut sender = sealpass_sender::Sender::connect_with_retry(&path, std::time::Duration::from_secs(20))?;
//! #     sender.send(&[sealpass_sender::SealedSegment::from_bytes("frame", b"hello", sealpass_sender::Seals::SENDER_DEFAULT)?])
//! # });
//! let listener = Listener::bind(&socket)?;
//! let mut connection = listener.accept()?;
//! while let Some(transfer) = connection.receive()? {
//!     for segment in transfer.segments() {
//!         // Sealed against writes and shrinking: these bytes cannot change.
//!         println!("{}: {} bytes", segment.name(), segment.bytes().len());
//!     }
//!     transfer.accept()?; // or reject(why), or drop it: Reject(ApplicationRejected)
//! }
//! eprintln!("{} message(s) refused", connection.refused());
//! # assert!(sender.join().expect("sender")?.is_accepted());
//! # Ok(())
//! # }
//! ```
//!
//! [`Service::run`] serves many peers with a handler, each connection on a
//! thread of its own, and answers the messages it read together in one
//! `sendmmsg`: what a pipelining sender's receiver wants.

pub mod compat;
#[cfg(feature = "conformance")]
pub mod conformance;
mod connection;
pub mod inspect;
mod listener;
mod mapping;
pub mod service;
#[cfg(feature = "tokio")]
pub mod tokio;
mod transfer;

pub use connection::{AnswerError, Connection, ServeError};
pub use listener::{BindError, Listener};
pub use sealpass_proto::PeerCredentials;
pub use sealpass_proto::{
    Access, Config, ConfigBuilder, ConfigError, MappedBudget, Metadata, RejectReason, Seals,
    Version,
};
pub use service::{Delivery, Service, ServiceStats, ShutdownHandle};
pub use transfer::{IncomingTransfer, Responder, VerifiedSegment};

/// Displays an error and each of its sources, `: `-separated. Every error of
/// sealpass says only what failed at its own level and returns the cause as
/// its `source()`, so a log line shows each cause exactly once.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
