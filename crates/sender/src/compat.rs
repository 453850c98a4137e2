//! Compat mode: bare fd passing, as plain programs do it, for receivers that
//! speak no sealpass (`sealpass-recv --compat`, or any program that reads
//! fds beside a fixed payload over `SOCK_STREAM`). No header, no answer.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use sealpass_kernel::fdpass;

use crate::client::{SendError, connect_error};
use crate::memfd::SealedSegment;

/// The filler bytes a bare send carries: plain fd-passing receivers read a
/// fixed-size payload beside the fds.
pub const BARE_PAYLOAD_LEN: usize = 256;

/// Sends `segments` the way plain fd-passing programs do, for receivers that
/// speak no sealpass (compat mode): over `SOCK_STREAM`, with
/// [`BARE_PAYLOAD_LEN`] zero bytes and no header, and no answer awaited.
/// Each memfd's file offset is 0, so a receiver that `read()`s it gets the
/// bytes from the start.
///
/// ```
/// use sealpass_sender::{Seals, SealedSegment, send_bare};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let socket = dir.path().join("bare.sock");
/// // A receiver in compat mode (sealpass-recv --compat, or any plain program).
/// let listener = sealpass_receiver::Listener::bind_compat(&socket)?;
/// let shma = SealedSegment::filled("shma", b'A', 4 << 20, Seals::empty())?;
/// send_bare(&socket, &[shma])?; // no answer is awaited
/// let mut bare = listener.accept_bare()?;
/// let batch = loop {
///     let batch = bare.receive(Seals::empty())?.expect("the fds");
///     if !batch.is_empty() { break batch; } // bytes without fds are filler
/// };
/// let mut bytes = Vec::new();
/// batch.into_iter().next().expect("one fd")?.copy_to(&mut bytes)?;
/// assert!(bytes.len() == 4 << 20 && bytes.iter().all(|&b| b == b'A'));
/// # Ok(())
/// # }
/// ```
pub fn send_bare(path: impl AsRef<Path>, segments: &[SealedSegment]) -> Result<(), SendError> {
    let path = path.as_ref();
    let socket = fdpass::connect_stream(path).map_err(|source| connect_error(path, source))?;
    let fds: Vec<BorrowedFd<'_>> = segments.iter().map(SealedSegment::fd).collect();
    fdpass::send(socket.as_fd(), &[0; BARE_PAYLOAD_LEN], &fds).map_err(SendError::Send)
}
