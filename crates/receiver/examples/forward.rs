//! Forwarding: a segment received from one process is passed on, as the
//! same sealed memfd, to a third process, without touching its bytes.
//!
//! ```text
//! origin (child) ──frame──▶ this process ──same fd──▶ destination (child)
//! ```
//!
//! Run: `cargo run --example forward -p sealpass-receiver`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use sealpass_receiver::{Listener, Seals};
use sealpass_sender::{SealedSegment, Sender};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--origin"), Some(socket)) => return origin(&socket),
        (Some("--destination"), Some(socket)) => return destination(&socket),
        _ => {}
    }
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (inbound, outbound) = (dir.join("in.sock"), dir.join("out.sock"));
    let listener = Listener::bind(&inbound)?;
    let me = std::env::current_exe()?;
    let mut destination = Command::new(&me)
        .arg("--destination")
        .arg(&outbound)
        .stdout(Stdio::piped())
        .spawn()?;
    // Wait until the destination listens: it says so on its stdout.
    let mut said = BufReader::new(destination.stdout.take().ok_or("no stdout")?).lines();
    assert_eq!(said.next().transpose()?.as_deref(), Some("listening"));
    let mut origin = Command::new(&me).arg("--origin").arg(&inbound).spawn()?;

    let mut connection = listener.accept()?;
    let transfer = connection.receive()?.ok_or("the origin sent nothing")?;
    let (mut segments, responder) = transfer.into_parts();
    let segment = segments.pop().ok_or("no segment")?;
    println!(
        "forwarder: got {:?}, {} bytes; passing its fd on",
        segment.name(),
        segment.size()
    );
    // The fd leaves the mapping behind; the sealed memfd goes on as it is.
    let forwarded = SealedSegment::from_sealed_fd(segment.into_fd(), Seals::SENDER_DEFAULT)?;
    let verdict = Sender::connect(&outbound)?.send(&[forwarded])?;
    println!("forwarder: destination says {verdict:?}");
    // Answer the origin with the destination's verdict.
    if verdict.is_accepted() {
        responder.accept()?;
    } else {
        responder.reject(format!("the destination refused it: {verdict:?}"))?;
    }
    let report = said
        .next()
        .transpose()?
        .ok_or("the destination said nothing")?;
    println!("destination: {report}");
    assert!(origin.wait()?.success() && destination.wait()?.success());
    drop(listener);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn origin(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let frame = SealedSegment::from_bytes("frame", &[42; 8 << 20], Seals::SENDER_DEFAULT)?;
    let verdict = Sender::connect(socket)?.send(&[frame])?;
    println!("origin: {verdict:?}");
    if verdict.is_accepted() {
        Ok(())
    } else {
        Err(format!("{verdict:?}").into())
    }
}

fn destination(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let listener = Listener::bind(socket)?;
    println!("listening");
    let mut connection = listener.accept()?;
    let transfer = connection.receive()?.ok_or("nothing forwarded")?;
    let segment = transfer.segments().first().ok_or("no segment")?;
    let whole = segment.bytes().iter().all(|&b| b == 42);
    println!(
        "{:?} from pid {:?}: {} bytes, all 42: {whole}, sealed {}",
        segment.name(),
        transfer.peer().pid,
        segment.size(),
        segment.seals()
    );
    transfer.accept()?;
    if whole {
        Ok(())
    } else {
        Err("the bytes changed".into())
    }
}
