//! A `Service` whose handler panics: the peer is answered, the connection
//! slot comes back, and the service goes on serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sealpass_proto::{RejectReason, Seals};
use sealpass_receiver::{Config, Listener, Service};
use sealpass_sender::{SealedSegment, Sender, Verdict};

fn segment() -> SealedSegment {
    SealedSegment::filled("frame", b'f', 4096, Seals::SENDER_DEFAULT).unwrap()
}

fn connect(socket: &std::path::Path) -> Sender {
    let mut sender = Sender::connect(socket).unwrap();
    sender
        .set_answer_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sender
}

#[test]
fn a_panicking_handler_costs_neither_an_answer_nor_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("panics.sock");
    let mut listener = Listener::bind(&socket).unwrap();
    // One slot: had the panic leaked it, the next peer would be refused.
    listener.set_config(Config::builder().max_connections(1).build().unwrap());
    let service = Service::new(listener).unwrap();
    let stats = service.stats();
    let shutdown = service.shutdown_handle();
    let panicked = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&panicked);
    let running = std::thread::spawn(move || {
        service.run(move |_delivery| {
            if !seen.swap(true, Ordering::SeqCst) {
                panic!("the handler's first transfer blows up");
            }
            Ok::<(), String>(())
        })
    });

    let mut first = connect(&socket);
    match first.send(&[segment()]).unwrap() {
        Verdict::Rejected {
            id,
            reason,
            message,
        } => {
            assert_eq!((id, reason), (1, RejectReason::ApplicationRejected));
            assert!(
                message.contains("panicked: the handler's first transfer blows up"),
                "{message}"
            );
        }
        other => panic!("expected Reject(ApplicationRejected), got {other:?}"),
    }
    assert!(panicked.load(Ordering::SeqCst));
    // The connection that met the panic is still served.
    assert_eq!(
        first.send(&[segment()]).unwrap(),
        Verdict::Accepted { id: 2 }
    );
    drop(first);
    // The slot comes back once that connection's thread has seen the end;
    // a leaked one never would.
    let slot_released = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while stats.active_connections.load(Ordering::Acquire) != 0 {
            assert!(
                Instant::now() < deadline,
                "active connections stuck at {}",
                stats.active_connections.load(Ordering::Acquire)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    slot_released();

    // A new connection gets the one slot and is served.
    let mut second = connect(&socket);
    assert_eq!(
        second.send(&[segment()]).unwrap(),
        Verdict::Accepted { id: 1 }
    );
    drop(second);
    slot_released();
    shutdown.shutdown();
    running.join().unwrap().unwrap();
    assert!(!socket.exists(), "the service removes its socket");
}
