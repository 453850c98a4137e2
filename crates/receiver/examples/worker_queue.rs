//! Owned transfers queued to worker threads. The connection's thread only
//! receives; two workers check the bytes and answer, in whatever order they
//! finish. The sender, another process, keeps 16 transfers in flight and
//! still gets its answers in order.
//!
//! Run: `cargo run --example worker_queue -p sealpass-receiver`

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};

use sealpass_receiver::{IncomingTransfer, Listener, Seals};
use sealpass_sender::{SealedSegment, Sender, Verdict};

const TRANSFERS: u64 = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    if let (Some(role), Some(socket)) = (args.next(), args.next()) {
        if role == "--send-to" {
            return send(&socket);
        }
    }
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("queue.sock");
    let listener = Listener::bind(&socket)?;
    let sender = Command::new(std::env::current_exe()?)
        .arg("--send-to")
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()?;

    let (queue, inbox) = mpsc::channel::<IncomingTransfer>();
    let inbox = Arc::new(Mutex::new(inbox));
    let workers: Vec<_> = (0..2)
        .map(|worker| {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                loop {
                    let next = inbox.lock().map(|inbox| inbox.recv());
                    let Ok(Ok(transfer)) = next else { break };
                    let expected = transfer.id() as u8;
                    let whole = transfer
                        .segments()
                        .iter()
                        .all(|segment| segment.bytes().iter().all(|&b| b == expected));
                    println!("worker {worker}: transfer {} whole: {whole}", transfer.id());
                    // Odd ids are refused, to show rejections keep their place.
                    let answered = if transfer.id() % 2 == 1 {
                        transfer.reject("odd ids are not wanted here")
                    } else {
                        transfer.accept()
                    };
                    if let Err(error) = answered {
                        eprintln!("worker {worker}: answering failed: {error}");
                    }
                }
            })
        })
        .collect();

    let mut connection = listener.accept()?;
    while let Some(transfer) = connection.receive()? {
        queue.send(transfer)?;
    }
    drop(queue);
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked")?;
    }
    let output = sender.wait_with_output()?;
    let verdicts = String::from_utf8(output.stdout)?;
    print!("{verdicts}");
    let expected: Vec<String> = (1..=TRANSFERS)
        .map(|id| {
            format!(
                "{id}: {}",
                if id % 2 == 1 { "rejected" } else { "accepted" }
            )
        })
        .collect();
    assert_eq!(verdicts.lines().collect::<Vec<_>>(), expected);
    assert!(output.status.success());
    drop(listener);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn send(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut sender = Sender::connect(socket)?;
    for id in 1..=TRANSFERS {
        let segment = SealedSegment::filled(
            &format!("item-{id}"),
            id as u8,
            256 << 10,
            Seals::SENDER_DEFAULT,
        )?;
        sender.submit(&[segment])?;
    }
    for _ in 1..=TRANSFERS {
        match sender.next_verdict()? {
            Verdict::Accepted { id } => println!("{id}: accepted"),
            Verdict::Rejected { id, .. } => println!("{id}: rejected"),
            other => return Err(format!("{other:?}").into()),
        }
    }
    Ok(())
}
