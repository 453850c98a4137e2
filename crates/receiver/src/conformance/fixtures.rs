//! Building blocks of scripted peers: memfds sealed exactly as asked, other
//! kinds of fds, and message bytes, valid and not.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_kernel::memfd::{MFdFlags, memfd_create};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::{Message, Seals, Segment, Transfer, decode, encode};

pub type Fallible<T> = Result<T, String>;

/// A memfd of `size` bytes (zeros, except the first byte, `C`), every page
/// allocated, carrying exactly `seals`, and `EXEC` as well where
/// `vm.memfd_noexec=2` refuses memfds made without `MFD_NOEXEC_SEAL`
/// (receivers judge seals as a superset, so no case depends on it).
pub fn memfd(name: &str, size: u64, seals: Seals) -> Fallible<OwnedFd> {
    memfd_with_holes(name, size, seals, false)
}

/// [`memfd`], with every page but the first left a hole when `holes`: a
/// sparse memfd, as no conforming sender sends.
pub fn memfd_with_holes(name: &str, size: u64, seals: Seals, holes: bool) -> Fallible<OwnedFd> {
    let plain = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
    let fd = match memfd_create(name, plain) {
        Err(nix::errno::Errno::EACCES) => memfd_create(
            name,
            plain | MFdFlags::from_bits_retain(nix::libc::MFD_NOEXEC_SEAL),
        ),
        other => other,
    }
    .map_err(|e| format!("memfd_create({name:?}): {e}"))?;
    let length = i64::try_from(size).map_err(|_| format!("size {size} too large"))?;
    nix::unistd::ftruncate(&fd, length).map_err(|e| format!("ftruncate: {e}"))?;
    if size > 0 && !holes {
        nix::fcntl::fallocate(&fd, nix::fcntl::FallocateFlags::empty(), 0, length)
            .map_err(|e| format!("fallocate {size} bytes: {e}"))?;
    }
    if size > 0 {
        nix::sys::uio::pwrite(&fd, b"C", 0).map_err(|e| format!("pwrite: {e}"))?;
    }
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals.bits() as i32)),
    )
    .map_err(|e| format!("F_ADD_SEALS {seals}: {e}"))?;
    Ok(fd)
}

/// The sealing a conforming sender applies.
pub const SEALED: Seals = Seals::SENDER_DEFAULT;

pub fn segment(name: &str, size: u64, seals: Seals) -> Segment {
    Segment::new(name.to_owned(), size, seals)
}

pub fn transfer_bytes(id: u64, segments: Vec<Segment>) -> Fallible<Vec<u8>> {
    encode(&Message::Transfer(Transfer::new(id, segments))).map_err(|e| e.to_string())
}

/// A transfer with one sealed memfd per `(name, size)`, declared truthfully.
pub fn valid_transfer(id: u64, segments: &[(&str, u64)]) -> Fallible<(Vec<u8>, Vec<OwnedFd>)> {
    let fds = segments
        .iter()
        .map(|(name, size)| memfd(name, *size, SEALED))
        .collect::<Fallible<Vec<_>>>()?;
    let declared = segments
        .iter()
        .map(|(name, size)| segment(name, *size, SEALED))
        .collect();
    Ok((transfer_bytes(id, declared)?, fds))
}

/// Encodes by hand the body of a Transfer whose fields the encoder would refuse.
pub fn raw_transfer_body(id: u64, names: &[&[u8]], size: u64, seals: Seals) -> Vec<u8> {
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&id.to_le_bytes());
    body.extend_from_slice(&(names.len() as u64).to_le_bytes());
    for name in names {
        body.extend_from_slice(&(name.len() as u64).to_le_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&seals.bits().to_le_bytes());
    }
    body
}

/// A preamble of this version, `body_len` as given, then `body`.
pub fn framed(major: u16, minor: u16, body_len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = sealpass_proto::MAGIC.to_vec();
    out.extend_from_slice(&major.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

pub fn framed_exact(major: u16, minor: u16, body: &[u8]) -> Vec<u8> {
    framed(major, minor, body.len() as u32, body)
}

/// Opens `path` read-only, as an fd of the kind the path is.
pub fn open(path: &Path) -> Fallible<OwnedFd> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

/// How long a scripted peer waits on the other side before calling it a hang.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Sends one message on `connection`.
pub fn send(connection: &OwnedFd, payload: &[u8], fds: &[OwnedFd]) -> Fallible<()> {
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    fdpass::send(connection.as_fd(), payload, &borrowed).map_err(|e| format!("sending: {e}"))
}

/// What came back on a connection.
#[derive(Debug)]
pub enum Answer {
    Message(Message),
    Closed,
}

/// Reads one answer, waiting at most [`PATIENCE`].
pub fn answer(connection: &OwnedFd) -> Fallible<Answer> {
    fdpass::set_timeouts(connection.as_fd(), Some(PATIENCE), Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    let mut buffer = vec![0; MAX_MESSAGE_LEN];
    let mut control = ControlBuffer::new();
    let received = match fdpass::receive(connection.as_fd(), &mut buffer, &mut control) {
        Ok(received) => received,
        Err(error) if error.errno() == Some(nix::errno::Errno::ECONNRESET) => {
            return Ok(Answer::Closed);
        }
        Err(error) => return Err(format!("no answer: {error}")),
    };
    if received.is_end_of_stream() {
        return Ok(Answer::Closed);
    }
    if !received.fds.is_empty() {
        return Err(format!(
            "answer carried {} fds; answers carry none",
            received.fds.len()
        ));
    }
    let bytes = buffer.get(..received.len).unwrap_or_default();
    decode(bytes)
        .map(|decoded| Answer::Message(decoded.message))
        .map_err(|e| format!("answer does not decode: {e}"))
}
