//! A bare peer in compat mode: the child sends two 4 MiB memfds, `shma` of
//! 'A' and `shmb` of 'B', the way a plain C program does it (one `sendmsg`
//! over `SOCK_STREAM`, 256 bytes of junk payload, an `SCM_RIGHTS` control
//! message, no header, no answer awaited). This process receives them in
//! compat mode, checks each is a memfd, and copies the bytes out with
//! `pread`: an unsealed memfd is never mapped.
//!
//! Run: `cargo run --example bare_peer -p sealpass-receiver`

use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use sealpass_receiver::{Listener, Seals};

const SIZE: usize = 4 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    if let (Some(role), Some(socket)) = (args.next(), args.next()) {
        if role == "--bare-send-to" {
            return bare_send(&socket);
        }
    }
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("bare.sock");
    let listener = Listener::bind_compat(&socket)?;
    let mut peer = Command::new(std::env::current_exe()?)
        .arg("--bare-send-to")
        .arg(&socket)
        .spawn()?;

    let mut connection = listener.accept_bare()?;
    let mut received = Vec::new();
    // Reads until the peer's fds come; bytes without fds are its filler.
    while received.is_empty() {
        let batch = connection
            .receive(Seals::empty())?
            .ok_or("the peer closed")?;
        for result in batch {
            // Each fd was judged: a memfd (by the kernel's word), any seals.
            received.push(result?);
        }
    }
    for segment in &received {
        let mut bytes = Vec::with_capacity(SIZE);
        segment.copy_to(&mut bytes)?;
        let first = bytes.first().copied().unwrap_or_default();
        let uniform = bytes.iter().all(|&b| b == first);
        println!(
            "{}: {} bytes, sealed {}, all {:?}: {uniform}",
            segment.name(),
            segment.size(),
            segment.seals(),
            char::from(first)
        );
        assert!(uniform && bytes.len() == SIZE);
    }
    let names: Vec<&str> = received.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["shma", "shmb"]);
    assert!(peer.wait()?.success());
    drop(listener);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// What a plain C peer does, call for call.
fn bare_send(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let memfd = |name: &str, byte: u8| -> Result<OwnedFd, Box<dyn std::error::Error>> {
        let fd = memfd_create(name, MFdFlags::empty())?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&vec![byte; SIZE])?;
        Ok(OwnedFd::from(file))
    };
    let (shma, shmb) = (memfd("shma", b'A')?, memfd("shmb", b'B')?);
    let stream = UnixStream::connect(socket)?;
    let junk = [0x5a_u8; 256];
    let fds = [shma.as_raw_fd(), shmb.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&junk)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}
