//! `cargo xtask hostile`: peers that break the rules on purpose, for the
//! fault tests (the VM guests, `soak`). Each prints what it heard back, one
//! line, and exits 0 when it heard an answer, 3 when the connection closed
//! without one (the receiver refused to read, or died).

use std::path::PathBuf;

use anyhow::{Context, bail};
use sealpass_proto::{Message, Seals};
use sealpass_receiver::conformance::fixtures::{
    Answer, answer, memfd_with_holes, segment, send, transfer_bytes,
};

const USAGE: &str = "\
usage: cargo xtask hostile sparse --socket PATH --size BYTES
  sparse   one transfer of a memfd sealed SEAL|SHRINK|GROW|WRITE with nothing
           allocated (all holes), kept open until the answer comes";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut socket = None;
    let mut size = None;
    let (kind, mut rest) = match args.split_first() {
        Some((kind, rest)) => (kind.as_str(), rest.iter()),
        None => bail!("{USAGE}"),
    };
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--size" => size = Some(sealpass_proto::parse_size(value).map_err(anyhow::Error::msg)?),
            other => bail!("unknown flag {other:?}\n{USAGE}"),
        }
    }
    let socket = socket.context("--socket is required")?;
    match kind {
        "sparse" => sparse(socket, size.context("--size is required")?),
        other => bail!("unknown peer {other:?}\n{USAGE}"),
    }
}

fn sparse(socket: PathBuf, size: u64) -> anyhow::Result<()> {
    let seals = Seals::SENDER_DEFAULT;
    let fd = memfd_with_holes("holes", size, seals, true).map_err(anyhow::Error::msg)?;
    let payload =
        transfer_bytes(1, vec![segment("holes", size, seals)]).map_err(anyhow::Error::msg)?;
    let connection = sealpass_kernel::fdpass::connect(&socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    send(&connection, &payload, &[fd]).map_err(anyhow::Error::msg)?;
    match answer(&connection).map_err(anyhow::Error::msg)? {
        Answer::Message(Message::Ack(ack)) => println!("Ack {}", ack.id),
        Answer::Message(Message::Reject(reject)) => {
            println!("Reject {}: {}", reject.reason, reject.message);
        }
        Answer::Message(other) => println!("unexpected {}", other.kind()),
        Answer::Closed => {
            println!("closed without an answer");
            std::process::exit(3);
        }
    }
    Ok(())
}
