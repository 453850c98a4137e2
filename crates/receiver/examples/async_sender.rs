//! An async sender: with `--socket PATH`, one transfer of a 64 KiB segment
//! to the receiver at PATH; exit 0 on `Ack`, 3 on a `Reject` (its reason on
//! stderr), 1 otherwise. The conformance suite runs it so:
//! `cargo xtask conformance --sender 'target/debug/examples/async_sender'`.
//! Without arguments it starts a blocking receiver of its own, sends it
//! eight transfers pipelined, and exits 0.
//!
//! Run: `cargo run --example async_sender -p sealpass-receiver --features tokio`

use std::process::ExitCode;

use sealpass_sender::tokio::Sender;
use sealpass_sender::{SealedSegment, Seals, Verdict};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match (args.next().as_deref(), args.next()) {
        (Some("--socket"), Some(socket)) => send_one(&socket).await,
        _ => demo().await,
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("async_sender: error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn send_one(socket: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut sender = Sender::connect(socket).await?;
    let segment = SealedSegment::filled("conformance", b'C', 64 << 10, Seals::SENDER_DEFAULT)?;
    match sender.send(&[segment]).await? {
        Verdict::Accepted { id } => {
            println!("accepted transfer {id}");
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Rejected {
            id,
            reason,
            message,
        } => {
            eprintln!("async_sender: rejected transfer {id}: {reason}: {message}");
            Ok(ExitCode::from(3))
        }
        other => Err(format!("unexpected verdict {other:?}").into()),
    }
}

async fn demo() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("to-blocking.sock");
    // A blocking receiver on a thread of its own: the two kinds interoperate.
    let listener = sealpass_receiver::Listener::bind(&socket)?;
    let receiver = std::thread::spawn(move || -> Result<usize, sealpass_receiver::ServeError> {
        let mut connection = listener.accept()?;
        let mut count = 0;
        while let Some(transfer) = connection.receive()? {
            count += 1;
            transfer.accept()?;
        }
        Ok(count)
    });
    let mut sender = Sender::connect(&socket).await?;
    for n in 0..8u8 {
        let frame =
            SealedSegment::filled(&format!("frame-{n}"), n, 1 << 20, Seals::SENDER_DEFAULT)?;
        sender.submit(&[frame]).await?;
    }
    while sender.in_flight() > 0 {
        println!("sender: {:?}", sender.next_verdict().await?);
    }
    drop(sender);
    let count = receiver.join().map_err(|_| "the receiver panicked")??;
    println!("receiver: {count} transfers");
    std::fs::remove_dir_all(&dir)?;
    Ok(if count == 8 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
