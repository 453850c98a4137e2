//! An async receiver on one tokio thread, with the async `Service`.
//!
//! With `--socket PATH` it serves at PATH until SIGINT/SIGTERM (the
//! conformance suite runs it so: `cargo xtask conformance --receiver
//! 'target/debug/examples/async_receiver'`). Without arguments it starts an
//! async sender of its own, receives its transfers, stops and exits 0.
//!
//! Run: `cargo run --example async_receiver -p sealpass-receiver --features tokio`

use std::process::Command;

use sealpass_receiver::tokio::{Listener, Service};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    if let (Some(flag), Some(socket)) = (args.next(), args.next()) {
        if flag == "--socket" {
            return serve(&socket).await;
        }
    }
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("async.sock");
    let service = Service::new(Listener::bind(&socket)?)?;
    let shutdown = service.shutdown_handle();
    let stats = service.stats();
    let running = tokio::spawn(service.run(|delivery| async move {
        let bytes: usize = delivery.segments.iter().map(|s| s.bytes().len()).sum();
        println!(
            "receiver: transfer {} from pid {}: {bytes} bytes",
            delivery.id, delivery.peer.pid
        );
        Ok::<(), String>(())
    }));
    // The sender, another process: the async_sender example.
    let sender = std::env::current_exe()?.with_file_name("async_sender");
    let status = tokio::process::Command::from(Command::new(&sender))
        .arg("--socket")
        .arg(&socket)
        .status()
        .await
        .map_err(|e| {
            format!(
                "starting {}: {e} (build the examples first)",
                sender.display()
            )
        })?;
    shutdown.shutdown();
    running.await??;
    println!(
        "receiver: {} accepted; sender exited {status}",
        stats.accepted.load(std::sync::atomic::Ordering::Relaxed)
    );
    std::fs::remove_dir_all(&dir)?;
    if status.success() {
        Ok(())
    } else {
        Err("the sender failed".into())
    }
}

/// Serves at `socket` until SIGINT or SIGTERM.
async fn serve(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    // Signals first: their handling holds fds of its own, which are then
    // open before the socket is, as a conforming receiver's should be.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let service = Service::new(Listener::bind(socket)?)?;
    let shutdown = service.shutdown_handle();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        shutdown.shutdown();
    });
    service
        .run(|delivery| async move {
            // Look at each segment, as sealpass-recv does by default; work
            // that reads gigabytes belongs on spawn_blocking, not here.
            let first_bytes: Vec<u8> = delivery
                .segments
                .iter()
                .filter_map(|s| s.bytes().first().copied())
                .collect();
            std::hint::black_box(first_bytes);
            Ok::<(), String>(())
        })
        .await?;
    Ok(())
}
