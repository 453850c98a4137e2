//! The receiving side of sealpass: accept memfds from a peer you do not
//! trust, verify each with the kernel (never the header), map it read-only
//! and answer.
//!
//! ```no_run
//! use sealpass_receiver::{Listener, Outcome};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = Listener::bind("/run/user/1000/sealpass.sock".as_ref())?;
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
//! # Ok(())
//! # }
//! ```

pub mod compat;
pub mod inspect;
pub mod limits;
mod mapping;
pub mod server;
pub mod service;

pub use limits::Limits;
pub use server::{
    BindError, Connection, Listener, Outcome, ServeError, VerifiedSegment, VerifiedTransfer,
};
pub use service::{Access, Delivery, Service, ServiceStats, ShutdownHandle};
