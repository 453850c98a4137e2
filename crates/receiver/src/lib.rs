//! The receiving side of sealpass: accept memfds from a peer you do not
//! trust, verify each with the kernel (never the header), map it read-only
//! and answer.
//!
//! The decisions are [`sealpass_proto::Session`]'s, a state machine without
//! I/O; this crate drives it with blocking calls: [`Listener`] and
//! [`Connection`] for one peer at a time, [`Service`] for many at once.
//! [`Connection::receive`] hands out owned [`IncomingTransfer`]s, and
//! [`Connection::serve_one`] runs a handler on one:
//!
//! ```
//! use sealpass_receiver::{Listener, Outcome};
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
//! while connection.is_open() {
//!     let outcome = connection.serve_one(|transfer| {
//!         for segment in transfer.segments() {
//!             // Sealed against writes and shrinking: these bytes cannot change.
//!             println!("{}: {} bytes", segment.name(), segment.bytes().len());
//!         }
//!         Ok::<(), std::io::Error>(()) // an Err here becomes Reject(ApplicationRejected)
//!     })?;
//!     if let Outcome::Rejected { reason, message, .. } = outcome {
//!         eprintln!("refused: {reason}: {message}");
//!     }
//! }
//! # assert!(sender.join().expect("sender")?.is_accepted());
//! # Ok(())
//! # }
//! ```
//!
//! [`Connection::serve_batch`] does the same for every message already
//! queued, read in one `recvmmsg` and answered in one `sendmmsg`: what a
//! pipelining sender's receiver wants. [`Service`] serves that way.

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

pub use connection::{AnswerError, Connection, Event, Outcome, ServeError};
pub use listener::{BindError, Listener};
pub use sealpass_proto::PeerCredentials;
pub use sealpass_proto::{
    Access, Config, ConfigBuilder, ConfigError, MappedBudget, RejectReason, Seals, Version,
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
