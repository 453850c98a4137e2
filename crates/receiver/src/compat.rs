//! Compat mode: bare fd passing, as plain programs do it. The peer connects
//! over `SOCK_STREAM` and sends fds beside arbitrary bytes, with no header.
//! There is no header to check against, so each fd gets every check that
//! needs none: it must be a memfd carrying the seals the receiver requires,
//! possibly none. Without SHRINK and WRITE the peer may still truncate or
//! rewrite it, so bytes are copied out with `pread`, never mapped. A memfd
//! that shrinks mid-copy yields [`CompatError::Shrunk`], never SIGBUS.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use std::path::Path;

use sealpass_kernel::fdpass::{self, ControlBuffer, TransportError};
use sealpass_proto::Seals;
use sealpass_proto::session::unknown_fd_facts;
use sealpass_proto::verify::{BareMemfd, FdCheckError, check_bare_fd};

use crate::connection::ServeError;
use crate::inspect;
use crate::listener::{BindError, Listener};

impl Listener {
    /// Listens at `path` on `SOCK_STREAM`, for bare fd-passing peers that
    /// speak no sealpass header; accept them with [`Listener::accept_bare`].
    pub fn bind_compat(path: impl AsRef<Path>) -> Result<Listener, BindError> {
        Listener::bind_with(path.as_ref(), fdpass::listen_stream)
    }

    /// Waits for the next bare peer (on a listener from
    /// [`Listener::bind_compat`]); its socket waits at most the idle timeout
    /// of the listener's configuration.
    pub fn accept_bare(&self) -> Result<BareConnection, ServeError> {
        let socket = self.accept_socket().map_err(ServeError::Accept)?;
        let idle = self.config().idle_timeout();
        fdpass::set_timeouts(socket.as_fd(), idle, idle).map_err(ServeError::SetTimeout)?;
        Ok(BareConnection::new(socket))
    }
}

/// A failure in compat mode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompatError {
    /// Reading from the peer failed.
    #[error("receiving from the peer failed")]
    Receive(#[source] TransportError),
    /// The memfd shrank while its bytes were copied out.
    #[error(
        "memfd {name:?} measured {measured} bytes on arrival but shrank to {now} while being read"
    )]
    Shrunk {
        /// Its name.
        name: String,
        /// The size measured on arrival.
        measured: u64,
        /// Its size once reading found the end early (`fstat` after the
        /// short read).
        now: u64,
    },
    /// Reading the memfd failed.
    #[error("reading memfd {name:?} failed")]
    Read {
        /// Its name.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// Writing the bytes out failed.
    #[error("writing the bytes of {name:?} failed")]
    Write {
        /// Its name.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// A memfd that arrived without a header and passed the checks.
#[derive(Debug)]
pub struct BareSegment {
    memfd: BareMemfd,
    file: File,
}

/// Bytes copied per `pread`.
const CHUNK: usize = 1 << 20;

impl BareSegment {
    /// The name, from the kernel.
    pub fn name(&self) -> &str {
        &self.memfd.name
    }

    /// The size measured on arrival.
    pub fn size(&self) -> u64 {
        self.memfd.size
    }

    /// The seals, from the kernel.
    pub fn seals(&self) -> Seals {
        self.memfd.seals
    }

    /// Copies the bytes from offset 0 to `out`, never past the size
    /// measured on arrival, and in chunks, so memory use stays bounded.
    pub fn copy_to(&self, out: &mut impl Write) -> Result<u64, CompatError> {
        let name = || self.memfd.name.clone();
        let mut buffer = vec![0; CHUNK.min(usize::try_from(self.memfd.size).unwrap_or(CHUNK))];
        let mut offset = 0u64;
        while offset < self.memfd.size {
            let want = usize::try_from(self.memfd.size - offset)
                .map_or(buffer.len(), |left| left.min(buffer.len()));
            let chunk = buffer.get_mut(..want).unwrap_or_default();
            let got = match self.file.read_at(chunk, offset) {
                Ok(0) => {
                    // The peer truncated it: report the size it has now, not
                    // where this read stopped (those differ once a chunk was
                    // read before the truncation).
                    let now = self.file.metadata().map_or(offset, |m| m.len());
                    return Err(CompatError::Shrunk {
                        name: name(),
                        measured: self.memfd.size,
                        now,
                    });
                }
                Ok(got) => got,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(CompatError::Read {
                        name: name(),
                        source,
                    });
                }
            };
            out.write_all(chunk.get(..got).unwrap_or_default())
                .map_err(|source| CompatError::Write {
                    name: name(),
                    source,
                })?;
            offset += got as u64;
        }
        Ok(offset)
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Judges one bare fd; on success it keeps the fd to read from.
pub fn judge(index: usize, fd: OwnedFd, required: Seals) -> Result<BareSegment, FdCheckError> {
    let facts = inspect::facts(fd.as_fd()).unwrap_or_else(|_| unknown_fd_facts());
    let memfd = check_bare_fd(index, &facts, required)?;
    Ok(BareSegment {
        memfd,
        file: File::from(fd),
    })
}

/// A bare peer's connection.
#[derive(Debug)]
pub struct BareConnection {
    socket: OwnedFd,
    payload: Vec<u8>,
    control: Box<ControlBuffer>,
}

/// What the peer's bytes carried: one result per fd, in order.
pub type Batch = Vec<Result<BareSegment, FdCheckError>>;

impl BareConnection {
    /// Serves a connected socket (normally `SOCK_STREAM`).
    pub fn new(socket: OwnedFd) -> BareConnection {
        BareConnection {
            socket,
            payload: vec![0; 4096],
            control: ControlBuffer::new(),
        }
    }

    /// Reads once from the peer, ignoring the bytes, and judges each fd that
    /// came with them: an empty batch when the read carried none (a bare
    /// peer's filler), `None` once the peer has closed.
    pub fn receive(&mut self, required: Seals) -> Result<Option<Batch>, CompatError> {
        let received = fdpass::receive(self.socket.as_fd(), &mut self.payload, &mut self.control)
            .map_err(CompatError::Receive)?;
        if received.is_end_of_stream() {
            return Ok(None);
        }
        let batch = received
            .fds
            .into_iter()
            .enumerate()
            .map(|(index, fd)| judge(index, fd, required))
            .collect();
        Ok(Some(batch))
    }

    /// The socket, to wait on.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};

    fn unsealed(name: &str, size: i64) -> OwnedFd {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, size).unwrap();
        fd
    }

    #[test]
    fn copies_exactly_the_measured_bytes() {
        let fd = unsealed("shma", 3 * CHUNK as i64 + 5);
        File::from(fd.try_clone().unwrap())
            .write_all_at(b"A", 0)
            .unwrap();
        let segment = judge(0, fd, Seals::empty()).unwrap();
        assert_eq!(segment.name(), "shma");
        let mut out = Vec::new();
        assert_eq!(segment.copy_to(&mut out).unwrap(), 3 * CHUNK as u64 + 5);
        assert_eq!(out.len(), 3 * CHUNK + 5);
        assert_eq!(out[0], b'A');
    }

    #[test]
    fn a_memfd_truncated_after_arrival_is_an_error_not_a_crash() {
        let fd = unsealed("shrinking", 1 << 20);
        let peer_copy = fd.try_clone().unwrap();
        let segment = judge(0, fd, Seals::empty()).unwrap();
        nix::unistd::ftruncate(&peer_copy, 100).unwrap();
        let error = segment.copy_to(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(
                error,
                CompatError::Shrunk {
                    measured: 1_048_576,
                    now: 100,
                    ..
                }
            ),
            "{error}"
        );
    }

    /// Truncates the memfd to `to` bytes at the first write, i.e. once the
    /// first chunk has been read.
    struct TruncateOnFirstWrite {
        fd: OwnedFd,
        to: i64,
        written: usize,
    }

    impl Write for TruncateOnFirstWrite {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if self.written == 0 {
                nix::unistd::ftruncate(&self.fd, self.to)?;
            }
            self.written += bytes.len();
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_shrink_mid_copy_reports_the_new_size_not_the_read_position() {
        let fd = unsealed("shrinks-later", 3 * CHUNK as i64);
        let mut peer = TruncateOnFirstWrite {
            fd: fd.try_clone().unwrap(),
            to: 100,
            written: 0,
        };
        let segment = judge(0, fd, Seals::empty()).unwrap();
        let error = segment.copy_to(&mut peer).unwrap_err();
        assert_eq!(peer.written, CHUNK, "one whole chunk was read first");
        assert!(
            matches!(error, CompatError::Shrunk { measured, now: 100, .. } if measured == 3 * CHUNK as u64),
            "{error}"
        );
        assert!(error.to_string().contains("shrank to 100 "), "{error}");
    }

    #[test]
    fn required_seals_and_memfd_checks_still_apply() {
        let (pipe, _writer) = nix::unistd::pipe().unwrap();
        assert!(judge(0, pipe, Seals::empty()).is_err());
        assert!(judge(0, unsealed("s", 1), Seals::WRITE).is_err());
    }
}
