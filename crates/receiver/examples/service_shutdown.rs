//! A `Service` serving several senders at once, then stopped cleanly: it
//! stops accepting, answers what was already sent, removes its socket and
//! returns.
//!
//! Run: `cargo run --example service_shutdown -p sealpass-receiver`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sealpass_receiver::{Config, Listener, Seals, Service};
use sealpass_sender::{SealedSegment, Sender};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("sealpass-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("service.sock");
    let mut listener = Listener::bind(&socket)?;
    listener.set_config(
        Config::builder()
            .max_connections(8)
            .idle_timeout(Some(Duration::from_secs(5)))
            .build()?,
    );
    let service = Service::new(listener)?;
    let shutdown = service.shutdown_handle();
    let stats = service.stats();
    let bytes_seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&bytes_seen);
    let running = std::thread::spawn(move || {
        service.run(move |delivery| {
            let bytes: u64 = delivery.transfer.total_bytes();
            counter.fetch_add(bytes, Ordering::Relaxed);
            println!(
                "connection {} (pid {}): transfer {}, {bytes} bytes",
                delivery.connection,
                delivery.peer.pid,
                delivery.transfer.id()
            );
            Ok::<(), String>(())
        })
    });

    // Four senders, three transfers each, at once.
    let senders: Vec<_> = (0..4u8)
        .map(|sender| {
            let socket = socket.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut connection = Sender::connect(&socket).map_err(|e| e.to_string())?;
                for round in 0..3 {
                    let segment = SealedSegment::filled(
                        &format!("s{sender}-r{round}"),
                        b'a' + sender,
                        64 << 10,
                        Seals::SENDER_DEFAULT,
                    )
                    .map_err(|e| e.to_string())?;
                    let verdict = connection.send(&[segment]).map_err(|e| e.to_string())?;
                    if !verdict.is_accepted() {
                        return Err(format!("{verdict:?}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for sender in senders {
        sender.join().map_err(|_| "a sender panicked")??;
    }

    shutdown.shutdown();
    running.join().map_err(|_| "the service panicked")??;
    println!(
        "stopped: {} transfers accepted, {} bytes; socket removed: {}",
        stats.accepted.load(Ordering::Relaxed),
        bytes_seen.load(Ordering::Relaxed),
        !socket.exists()
    );
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 12);
    assert!(!socket.exists());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
