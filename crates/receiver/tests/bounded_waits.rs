//! Waits with a limit, for callers that must stay responsive (a signal, a
//! stop flag, a binding that runs Python's signal handlers between waits):
//! `Listener::accept_within` and `Sender::next_verdict_within` return `None`
//! when the limit passes, `Connection::receive_within` the error
//! `NothingWithin`, and what came otherwise; the connection's own deadlines
//! still hold.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use sealpass_receiver::{Config, Listener, ServeError};
use sealpass_sender::{SealedSegment, Seals, Sender, Verdict};

const SLICE: Duration = Duration::from_millis(50);

fn waited_about(started: Instant, limit: Duration) {
    let waited = started.elapsed();
    assert!(
        waited >= limit,
        "returned after {waited:?}, before {limit:?}"
    );
    assert!(
        waited < limit * 40,
        "returned after {waited:?}, long past {limit:?}"
    );
}

#[test]
fn each_bounded_wait_returns_none_at_its_limit_and_what_came_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bounded.sock");
    let listener = Listener::bind(&socket).unwrap();

    let started = Instant::now();
    assert!(listener.accept_within(SLICE).unwrap().is_none());
    waited_about(started, SLICE);

    let mut sender = Sender::connect(&socket).unwrap();
    let mut connection = listener
        .accept_within(Duration::from_secs(10))
        .unwrap()
        .expect("a connection");

    let started = Instant::now();
    assert!(matches!(
        connection.receive_within(SLICE),
        Err(ServeError::NothingWithin(limit)) if limit == SLICE
    ));
    waited_about(started, SLICE);

    let segment = SealedSegment::from_bytes("a", b"bounded", Seals::SENDER_DEFAULT).unwrap();
    let id = sender.submit(&[segment]).unwrap();
    let started = Instant::now();
    assert!(sender.next_verdict_within(SLICE).unwrap().is_none());
    waited_about(started, SLICE);
    assert_eq!(
        sender.in_flight(),
        1,
        "a wait that timed out keeps the transfer in flight"
    );

    let transfer = connection
        .receive_within(Duration::from_secs(10))
        .unwrap()
        .expect("the transfer");
    assert_eq!(transfer.segments()[0].bytes(), b"bounded");
    transfer.accept().unwrap();
    assert_eq!(
        sender.next_verdict_within(Duration::from_secs(10)).unwrap(),
        Some(Verdict::Accepted { id })
    );

    drop(sender);
    assert!(
        connection
            .receive_within(Duration::from_secs(10))
            .unwrap()
            .is_none(),
        "the end"
    );
}

#[test]
fn a_bounded_wait_still_ends_a_silent_connection_at_its_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("idle.sock");
    let mut listener = Listener::bind(&socket).unwrap();
    listener.set_config(
        Config::builder()
            .timeouts(Some(Duration::from_millis(300)))
            .build()
            .unwrap(),
    );
    let _silent = Sender::connect(&socket).unwrap();
    let mut connection = listener
        .accept_within(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let started = Instant::now();
    loop {
        // Slices shorter than the timeout: the deadline is the connection's,
        // which answers Reject(Timeout) and ends the connection.
        match connection.receive_within(SLICE) {
            Err(ServeError::NothingWithin(_)) => {}
            Ok(None) => break,
            other => panic!("expected the end at the idle timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never timed out"
        );
    }
    assert_eq!(connection.refused(), 1, "the Timeout counts as refused");
    waited_about(started, Duration::from_millis(300));
}
