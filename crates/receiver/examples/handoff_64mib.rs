//! Two processes hand over a 64 MiB buffer: this one receives, and starts a
//! copy of itself to send. The sender writes straight into a memfd, seals
//! it and passes the fd; the receiver maps the same pages read-only.
//!
//! Run: `cargo run --example handoff_64mib -p sealpass-receiver`

use std::process::Command;
use std::time::Instant;

use sealpass_receiver::{Listener, Seals};
use sealpass_sender::{SealedSegment, Sender};

const SIZE: u64 = 64 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    if let (Some(role), Some(socket)) = (args.next(), args.next()) {
        if role == "--send-to" {
            return send(&socket);
        }
    }
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("handoff.sock");
    let listener = Listener::bind(&socket)?;
    let mut sender = Command::new(std::env::current_exe()?)
        .arg("--send-to")
        .arg(&socket)
        .spawn()?;

    let mut connection = listener.accept()?;
    let transfer = connection.receive()?.ok_or("the sender sent nothing")?;
    let started = Instant::now();
    let segment = transfer.segments().first().ok_or("no segment")?;
    // Sealed against writes and shrinking: these bytes cannot change under us.
    let sum: u64 = segment.bytes().iter().map(|&b| u64::from(b)).sum();
    println!(
        "received {:?}: {} bytes sealed {}, from pid {:?}; read every byte in {:?}, sum {sum}",
        segment.name(),
        segment.size(),
        segment.seals(),
        transfer.peer().pid,
        started.elapsed()
    );
    assert_eq!(sum, SIZE * u64::from(b'A'));
    transfer.accept()?; // answers Ack, then unmaps
    let status = sender.wait()?;
    drop(listener);
    std::fs::remove_dir_all(&dir)?;
    if !status.success() {
        return Err(format!("the sender failed: {status}").into());
    }
    Ok(())
}

fn send(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let frame = SealedSegment::with_mapping("frame", SIZE, Seals::SENDER_DEFAULT, |bytes| {
        bytes.fill(b'A');
        Ok::<(), std::io::Error>(())
    })?;
    let filled = started.elapsed();
    let verdict = Sender::connect(socket)?.send(&[frame])?;
    println!("sender: filled 64 MiB in {filled:?}; verdict {verdict:?}");
    if verdict.is_accepted() {
        Ok(())
    } else {
        Err(format!("{verdict:?}").into())
    }
}
