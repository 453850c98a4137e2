//! One set of sealed segments to many receivers: each verdict is its own,
//! and a slow or dead receiver costs the others nothing but the patience.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use sealpass_receiver::{Listener, RejectReason};
use sealpass_sender::{SealedSegment, Seals, SendError, Verdict};

#[test]
fn every_receiver_gets_its_own_verdict_within_the_patience() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let sockets = [
        path("accepts.sock"),
        path("rejects.sock"),
        path("silent.sock"),
        path("nobody.sock"),
        path("accepts-too.sock"),
    ];
    let pages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let serve = |socket: &std::path::Path, accept: bool| {
        let listener = Listener::bind(socket).unwrap();
        let pages = std::sync::Arc::clone(&pages);
        std::thread::spawn(move || {
            let mut connection = listener.accept().unwrap();
            let transfer = connection.receive().unwrap().expect("a transfer");
            assert_eq!(transfer.segments()[0].bytes(), b"shared");
            assert_eq!(transfer.metadata().get_str("seq"), Some("7"));
            // Which memfd each got: one and the same, by its inode.
            let (segments, responder) = transfer.into_parts();
            let fd = segments.into_iter().next().unwrap().into_fd();
            let inode = nix::sys::stat::fstat(&fd).unwrap().st_ino;
            pages.lock().unwrap().push(inode);
            if accept {
                responder.accept().unwrap();
            } else {
                responder.reject("not this one").unwrap();
            }
        })
    };
    let consumers = [
        serve(&sockets[0], true),
        serve(&sockets[1], false),
        serve(&sockets[4], true),
    ];
    // Accepts the connection and never reads or answers.
    let silent = Listener::bind(&sockets[2]).unwrap();
    let _held = std::thread::spawn(move || {
        let connection = silent.accept_socket().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(connection);
    });

    let frame = SealedSegment::from_bytes("frame", b"shared", Seals::SENDER_DEFAULT).unwrap();
    let patience = Duration::from_millis(700);
    let started = Instant::now();
    let verdicts = sealpass_sender::fan_out(&sockets, &[frame], &[("seq", "7")], patience);
    let took = started.elapsed();
    for consumer in consumers {
        consumer.join().unwrap();
    }
    let summary: Vec<String> = verdicts
        .iter()
        .map(|each| match &each.verdict {
            Ok(Verdict::Accepted { .. }) => "accepted".to_owned(),
            Ok(Verdict::Rejected { reason, .. }) => format!("rejected {reason}"),
            Ok(other) => format!("{other:?}"),
            Err(SendError::AnswerTimedOut { .. }) => "no answer in time".to_owned(),
            Err(SendError::Connect { .. }) => "unreachable".to_owned(),
            Err(other) => format!("{other}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "accepted",
            &format!("rejected {}", RejectReason::ApplicationRejected),
            "no answer in time",
            "unreachable",
            "accepted",
        ]
    );
    assert_eq!(verdicts[3].socket, sockets[3].as_path());
    assert!(took >= patience, "the silent one was waited for: {took:?}");
    assert!(
        took < patience * 4,
        "one patience for all, not one each: {took:?}"
    );
    let pages = pages.lock().unwrap();
    assert_eq!(pages.len(), 3);
    assert!(
        pages.iter().all(|inode| *inode == pages[0]),
        "one memfd for all: {pages:?}"
    );
}

#[test]
fn the_async_fan_out_reports_each_receiver_on_the_runtimes_timer() {
    let dir = tempfile::tempdir().unwrap();
    let accepting = dir.path().join("accepting.sock");
    let silent = dir.path().join("silent.sock");
    let listener = Listener::bind(&accepting).unwrap();
    let consumer = std::thread::spawn(move || {
        let transfer = listener.accept().unwrap().receive().unwrap().unwrap();
        transfer.accept().unwrap();
    });
    let quiet = Listener::bind(&silent).unwrap();
    let _held = std::thread::spawn(move || {
        let connection = quiet.accept_socket().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(connection);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let frame = SealedSegment::from_bytes("frame", b"f", Seals::SENDER_DEFAULT).unwrap();
    let sockets = [accepting, silent];
    let started = Instant::now();
    let verdicts = runtime.block_on(sealpass_sender::tokio::fan_out(
        &sockets,
        &[frame],
        &(),
        Duration::from_millis(500),
    ));
    assert!(started.elapsed() < Duration::from_secs(3));
    consumer.join().unwrap();
    assert!(
        matches!(verdicts[0].verdict, Ok(Verdict::Accepted { .. })),
        "{verdicts:?}"
    );
    assert!(
        matches!(verdicts[1].verdict, Err(SendError::AnswerTimedOut { .. })),
        "{verdicts:?}"
    );
}
