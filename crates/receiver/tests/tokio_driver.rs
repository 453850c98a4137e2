//! The async driver (feature `tokio`): blocking and async peers mixed, the
//! whole hostile suite, cancellation, and 1000 connections served by one
//! `current_thread` runtime, with the fd count back where it was.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass;
use sealpass_proto::{Message, RejectReason, Seals, Segment, Transfer, encode};
use sealpass_receiver::conformance::fixtures::{self, Answer, Fallible};
use sealpass_receiver::conformance::{self, Target};
use sealpass_receiver::tokio::{Listener, Service};
use sealpass_receiver::{Config, ServiceStats};
use sealpass_sender::{SealedSegment, Verdict};

mod support;

use support::{own_memfd_mappings as memfd_mappings, serial};

fn open_fds() -> usize {
    // tokio opens a pipe for its signal driver the first time a runtime is
    // built, and keeps it for the life of the process: open it before
    // counting.
    drop(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    support::own_open_fds()
}

fn segment(name: &str, size: u64) -> SealedSegment {
    SealedSegment::filled(name, b'x', size, Seals::SENDER_DEFAULT).unwrap()
}

/// Waits, bounded, for `condition`.
fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An async service on its own `current_thread` runtime, in its own thread.
struct Running {
    socket: PathBuf,
    stats: std::sync::Arc<ServiceStats>,
    budget: std::sync::Arc<sealpass_receiver::MappedBudget>,
    shutdown: sealpass_receiver::tokio::ShutdownHandle,
    thread: std::thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(config: Config) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("async.sock");
    let (handles, ready) = std::sync::mpsc::channel();
    let path = socket.clone();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut listener = Listener::bind(&path).unwrap();
            listener.set_config(config);
            let service = Service::new(listener).unwrap();
            handles
                .send((
                    service.stats(),
                    service.mapped_budget(),
                    service.shutdown_handle(),
                ))
                .unwrap();
            service
                .run(|delivery| async move {
                    for segment in &delivery.segments {
                        // Touch the bytes: the senders here write 'x', the
                        // conformance fixtures 'C', then zeros.
                        if segment
                            .bytes()
                            .first()
                            .is_some_and(|&b| b != b'x' && b != b'C')
                        {
                            return Err("not the bytes sent".to_owned());
                        }
                    }
                    Ok(())
                })
                .await
                .unwrap();
        });
    });
    let (stats, budget, shutdown) = ready.recv().unwrap();
    Running {
        socket,
        stats,
        budget,
        shutdown,
        thread,
        _dir: dir,
    }
}

impl Running {
    fn stop(self) {
        self.shutdown.shutdown();
        self.thread.join().unwrap();
        assert!(!self.socket.exists(), "the service removes its socket");
    }
}

struct AtPath<'a>(&'a Path);

impl Target for AtPath<'_> {
    fn connect(&self) -> Fallible<OwnedFd> {
        fdpass::connect(self.0).map_err(|e| format!("connecting: {e}"))
    }
}

#[test]
fn the_whole_hostile_suite_against_the_async_service() {
    let _serial = serial();
    let fds_before = open_fds();
    let running = start(Config::default());
    let scratch = tempfile::tempdir().unwrap();
    let target = AtPath(&running.socket);
    let cases = conformance::cases(scratch.path());
    assert!(cases.len() > 60);
    for case in cases {
        if let Err(why) = (case.script)(&target) {
            panic!("{}: {why}", case.name);
        }
        let verdict = sealpass_sender::send_bytes(&running.socket, "valid", b"xxxx").unwrap();
        assert!(verdict.is_accepted(), "{}: then {verdict:?}", case.name);
        eventually(&format!("{}: every connection closed", case.name), || {
            running.stats.active_connections.load(Ordering::Acquire) == 0
        });
    }
    assert_eq!(running.budget.in_use(), 0);
    running.stop();
    drop(scratch);
    eventually("the fd count back where it was", || {
        open_fds() == fds_before
    });
    assert_eq!(memfd_mappings(), 0);
}

#[test]
fn blocking_and_async_peers_mix_both_ways() {
    let _serial = serial();
    let runtime = current_thread_runtime();
    let dir = tempfile::tempdir().unwrap();

    // A blocking sender to an async receiver.
    let to_async = dir.path().join("to-async.sock");
    let path = to_async.clone();
    let verdicts = runtime.block_on(async move {
        let listener = Listener::bind(&path).unwrap();
        let sender = std::thread::spawn(move || {
            let mut sender = sealpass_sender::Sender::connect(&path).unwrap();
            (1..=3)
                .map(|n| sender.send(&[segment(&format!("b{n}"), 4096)]).unwrap())
                .collect::<Vec<_>>()
        });
        let mut connection = listener.accept().await.unwrap();
        while let Some(transfer) = connection.receive().await.unwrap() {
            assert_eq!(transfer.segments()[0].bytes(), &[b'x'; 4096][..]);
            transfer.accept().unwrap();
        }
        tokio::task::spawn_blocking(move || sender.join().unwrap())
            .await
            .unwrap()
    });
    let ids: Vec<_> = verdicts
        .iter()
        .map(|v| matches!(v, Verdict::Accepted { .. }))
        .collect();
    assert_eq!(ids, [true, true, true]);

    // An async sender to a blocking receiver.
    let to_blocking = dir.path().join("to-blocking.sock");
    let listener = sealpass_receiver::Listener::bind(&to_blocking).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut connection = listener.accept().unwrap();
        let mut seen = 0;
        while let Some(transfer) = connection.receive().unwrap() {
            seen += transfer.segments().len();
            transfer.accept().unwrap();
        }
        seen
    });
    runtime.block_on(async {
        let mut sender = sealpass_sender::tokio::Sender::connect(&to_blocking)
            .await
            .unwrap();
        for n in 0..10 {
            sender
                .submit(&[segment(&format!("a{n}"), 4096)])
                .await
                .unwrap();
        }
        for id in 1..=10 {
            assert_eq!(
                sender.next_verdict().await.unwrap(),
                Verdict::Accepted { id }
            );
        }
    });
    assert_eq!(receiver.join().unwrap(), 10);
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A raw blocking peer connected to an async listener at `socket`, and the
/// async side of that connection.
async fn raw_peer_and_connection(socket: &Path) -> (OwnedFd, sealpass_receiver::tokio::Connection) {
    let listener = Listener::bind(socket).unwrap();
    let (peer, connection) = tokio::join!(
        tokio::task::spawn_blocking({
            let socket = socket.to_owned();
            move || fdpass::connect(&socket).unwrap()
        }),
        async { listener.accept().await.unwrap() }
    );
    (peer.unwrap(), connection)
}

#[test]
fn cancelled_futures_leak_nothing_and_leave_the_connection_usable() {
    let _serial = serial();
    let fds_before = open_fds();
    let runtime = current_thread_runtime();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cancel.sock");
    runtime.block_on(async {
        let (peer, mut connection) = raw_peer_and_connection(&socket).await;

        // A receive dropped while waiting: nothing taken, nothing held.
        let waited = tokio::time::timeout(Duration::from_millis(20), connection.receive()).await;
        assert!(waited.is_err(), "nothing was sent yet");
        assert_eq!(connection.mapped(), 0);
        let one = segment("after-cancel", 1 << 20);
        let header = encode(&Message::Transfer(Transfer::new(
            1,
            vec![one.declaration().clone()],
        )))
        .unwrap();
        fdpass::send(peer.as_fd(), &header, &[one.fd()]).unwrap();
        // Dropped again, now with a message queued: it is still there after.
        let raced = connection.receive();
        drop(raced);
        let transfer = connection.receive().await.unwrap().unwrap();
        assert_eq!(transfer.id(), 1);
        assert_eq!(connection.mapped(), 1 << 20);
        drop(transfer); // unanswered: rejected
        assert_eq!(connection.mapped(), 0);
        drop(connection);
        drop(peer);
    });

    // A send dropped while the receiver's queue is full: not sent, and the
    // connection goes on; nothing is half-sent.
    let socket = dir.path().join("cancel-send.sock");
    let listener = sealpass_receiver::Listener::bind(&socket).unwrap();
    let (accepted, accepted_rx) = std::sync::mpsc::channel::<()>();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let receiver = std::thread::spawn(move || {
        let mut connection = listener.accept().unwrap();
        accepted.send(()).unwrap();
        go_rx.recv().unwrap(); // read nothing until told
        let mut ids = Vec::new();
        while let Some(transfer) = connection.receive().unwrap() {
            ids.push(transfer.id());
            transfer.accept().unwrap();
        }
        ids
    });
    let sent = runtime.block_on(async {
        let mut sender = sealpass_sender::tokio::Sender::connect(&socket)
            .await
            .unwrap();
        accepted_rx.recv().unwrap();
        let mut sent = 0u64;
        loop {
            let header = segment("fill", 64);
            match tokio::time::timeout(Duration::from_millis(50), sender.submit(&[header])).await {
                Ok(id) => sent = id.unwrap(),
                Err(_) => break, // queue full: the submit was dropped mid-way
            }
            assert!(sent < 100_000, "the queue never filled");
        }
        go.send(()).unwrap();
        // The connection is usable: one more goes out, and every verdict
        // comes, ids contiguous (the dropped submit sent nothing).
        let last = sender.submit(&[segment("after", 64)]).await.unwrap();
        assert_eq!(last, sent + 1);
        for id in 1..=last {
            assert_eq!(
                sender.next_verdict().await.unwrap(),
                Verdict::Accepted { id }
            );
        }
        last
    });
    let ids = receiver.join().unwrap();
    assert_eq!(
        ids,
        (1..=sent).collect::<Vec<_>>(),
        "the dropped submit sent nothing"
    );
    drop(runtime);
    drop(dir);
    eventually("the fd count back where it was", || {
        open_fds() == fds_before
    });
}

/// A hostile peer, blocking, on its own thread.
fn hostile(socket: &Path, kind: usize) {
    let connection = fdpass::connect(socket).unwrap();
    fdpass::set_timeouts(
        connection.as_fd(),
        Some(Duration::from_secs(20)),
        Some(Duration::from_secs(20)),
    )
    .unwrap();
    let answer = || fixtures::answer(&connection).unwrap();
    match kind % 4 {
        // Garbage, again and again.
        0 => {
            for _ in 0..20 {
                fdpass::send(connection.as_fd(), b"not a sealpass message", &[]).unwrap();
                assert!(matches!(answer(), Answer::Message(Message::Reject(_))));
            }
        }
        // 253 pipes behind a one-segment header.
        1 => {
            let (read, _write) = nix::unistd::pipe().unwrap();
            let header = encode(&Message::Transfer(Transfer::new(
                1,
                vec![Segment::new("flood", 1, Seals::SENDER_DEFAULT)],
            )))
            .unwrap();
            for _ in 0..5 {
                fdpass::send(connection.as_fd(), &header, &vec![read.as_fd(); 253]).unwrap();
                match answer() {
                    Answer::Message(Message::Reject(reject)) => {
                        assert_eq!(reject.reason, RejectReason::FdCountMismatch)
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // An unsealed memfd.
        2 => {
            let loose = SealedSegment::filled("loose", b'x', 64, Seals::empty()).unwrap();
            let header = encode(&Message::Transfer(Transfer::new(
                1,
                vec![Segment::new("loose", 64, Seals::empty())],
            )))
            .unwrap();
            fdpass::send(connection.as_fd(), &header, &[loose.fd()]).unwrap();
            match answer() {
                Answer::Message(Message::Reject(reject)) => {
                    assert_eq!(reject.reason, RejectReason::MissingSeals)
                }
                other => panic!("{other:?}"),
            }
        }
        // Sends a valid transfer and vanishes before the answer.
        _ => {
            let one = segment("gone", 64);
            let header = encode(&Message::Transfer(Transfer::new(
                1,
                vec![one.declaration().clone()],
            )))
            .unwrap();
            fdpass::send(connection.as_fd(), &header, &[one.fd()]).unwrap();
        }
    }
}

#[test]
fn one_current_thread_runtime_serves_1000_connections() {
    const CONNECTIONS: usize = 1000;
    const SILENT: usize = 200;
    const HOSTILE: usize = 50;
    const VALID: usize = CONNECTIONS - SILENT - HOSTILE;
    let _serial = serial();
    let fds_before = open_fds();
    let running = start(
        Config::builder()
            .max_connections(CONNECTIONS + 10)
            .first_message_deadline(Some(Duration::from_secs(60)))
            .build()
            .unwrap(),
    );
    // 200 silent peers, held open while everyone else is served.
    let silent: Vec<OwnedFd> = (0..SILENT)
        .map(|_| fdpass::connect(&running.socket).unwrap())
        .collect();
    eventually("the silent peers are served", || {
        running.stats.active_connections.load(Ordering::Acquire) == SILENT
    });
    let hostiles: Vec<_> = (0..HOSTILE)
        .map(|kind| {
            let socket = running.socket.clone();
            std::thread::spawn(move || hostile(&socket, kind))
        })
        .collect();
    // 750 valid senders, each its own connection, two transfers each.
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let accepted = clients.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..VALID {
            let socket = running.socket.clone();
            tasks.spawn(async move {
                let mut sender = sealpass_sender::tokio::Sender::connect(&socket)
                    .await
                    .unwrap();
                sender
                    .set_answer_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut accepted = 0;
                for round in 0..2 {
                    let frame = segment(&format!("c{n}-{round}"), 4096);
                    accepted += usize::from(sender.send(&[frame]).await.unwrap().is_accepted());
                }
                accepted
            });
        }
        let mut accepted = 0;
        while let Some(result) = tasks.join_next().await {
            accepted += result.unwrap();
        }
        accepted
    });
    assert_eq!(accepted, 2 * VALID, "every valid transfer is accepted");
    for hostile in hostiles {
        hostile.join().unwrap();
    }
    assert!(
        running.stats.active_connections.load(Ordering::Acquire) >= SILENT,
        "the silent peers were held all along"
    );
    drop(silent);
    drop(clients);
    eventually("every connection closed", || {
        running.stats.active_connections.load(Ordering::Acquire) == 0
    });
    assert_eq!(running.budget.in_use(), 0);
    running.stop();
    eventually("the fd count back where it was", || {
        open_fds() == fds_before
    });
    assert_eq!(memfd_mappings(), 0);
}

#[test]
fn async_answers_wait_for_room_in_order_and_reading_waits_for_them() {
    let _serial = serial();
    let runtime = current_thread_runtime();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("async-room.sock");
    const MESSAGES: u64 = 64;
    runtime.block_on(async {
        let (peer, mut connection) = raw_peer_and_connection(&socket).await;
        // The smallest send buffer the kernel allows: a few answers fill it,
        // and the rest must wait for room, in order.
        nix::sys::socket::setsockopt(&connection, nix::sys::socket::sockopt::SndBuf, &1).unwrap();
        // Each declares a segment and carries no fd: FdCountMismatch, with
        // its id, and the connection goes on.
        for id in 1..=MESSAGES {
            let header = encode(&Message::Transfer(Transfer::new(
                id,
                vec![Segment::new("s", 1, Seals::SENDER_DEFAULT)],
            )))
            .unwrap();
            fdpass::send(peer.as_fd(), &header, &[]).unwrap();
        }
        nix::sys::socket::shutdown(peer.as_raw_fd(), nix::sys::socket::Shutdown::Write).unwrap();
        // The peer reads nothing yet: the receiver answers what has room,
        // then waits for room before it reads on (cancelled here).
        let waited = tokio::time::timeout(Duration::from_millis(300), connection.receive()).await;
        assert!(
            waited.is_err(),
            "receive() waits while answers wait for room"
        );
        let mut buffer = vec![0u8; sealpass_proto::limits::MAX_MESSAGE_LEN];
        let mut control = fdpass::ControlBuffer::new();
        let mut ids = Vec::new();
        while let Ok(Some(received)) =
            fdpass::try_receive_reusing(peer.as_fd(), &mut buffer, &mut control, Vec::new())
        {
            match sealpass_proto::decode(&buffer[..received.len])
                .unwrap()
                .message
            {
                Message::Reject(reject) => ids.push(reject.id),
                other => panic!("expected a Reject; got {other:?}"),
            }
        }
        let had_room = ids.len() as u64;
        assert!(
            had_room > 0 && had_room < MESSAGES,
            "{had_room} of {MESSAGES} answers had room before the peer read: the rest waited"
        );
        // The rest go out, in order, as the peer reads on its own thread.
        let reader = tokio::task::spawn_blocking(move || {
            while (ids.len() as u64) < MESSAGES {
                match fixtures::answer(&peer).unwrap() {
                    Answer::Message(Message::Reject(reject)) => {
                        assert_eq!(reject.reason, RejectReason::FdCountMismatch);
                        ids.push(reject.id);
                    }
                    other => panic!("expected a Reject; got {other:?}"),
                }
            }
            ids
        });
        assert!(connection.receive().await.unwrap().is_none(), "the end");
        assert_eq!(connection.refused(), MESSAGES);
        let expected: Vec<u64> = (1..=MESSAGES).collect();
        assert_eq!(reader.await.unwrap(), expected, "every answer, in order");
    });
}

#[test]
fn answers_held_for_a_batch_go_once_the_task_waits_on_anything() {
    let _serial = serial();
    let runtime = current_thread_runtime();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("async-held.sock");
    runtime.block_on(async {
        let (peer, mut connection) = raw_peer_and_connection(&socket).await;
        // The peer's reads end by themselves: a failure here is a failed
        // test, not a runtime that waits forever for its blocking tasks.
        fdpass::set_timeouts(peer.as_fd(), Some(Duration::from_secs(10)), None).unwrap();
        // Queued before the receiver reads: one recvmmsg takes all three.
        for id in 1..=3 {
            let (header, fds) = fixtures::valid_transfer(id, &[("s", 4096)]).unwrap();
            fixtures::send(&peer, &header, &fds).unwrap();
        }
        let first = connection.receive().await.unwrap().expect("transfer 1");
        first.accept().unwrap();
        // The application now waits for its peer, which waits for Ack 1,
        // before it takes the next transfer: the held answer must go.
        let reader = tokio::task::spawn_blocking(move || {
            let answer = fixtures::answer(&peer).unwrap();
            (answer, peer)
        });
        let (answer, peer) = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("Ack 1 went out while the receiving task waited")
            .unwrap();
        assert!(
            matches!(answer, Answer::Message(Message::Ack(ack)) if ack.id == 1),
            "{answer:?}"
        );
        for id in 2..=3 {
            let transfer = connection.receive().await.unwrap().expect("the next");
            assert_eq!(transfer.id(), id);
            transfer.accept().unwrap();
        }
        let later = tokio::task::spawn_blocking(move || {
            (2..=3)
                .map(|_| fixtures::answer(&peer).unwrap())
                .collect::<Vec<_>>()
        });
        let answers = tokio::time::timeout(Duration::from_secs(10), later)
            .await
            .expect("the rest were answered")
            .unwrap();
        let ids: Vec<u64> = answers
            .iter()
            .map(|answer| match answer {
                Answer::Message(Message::Ack(ack)) => ack.id,
                other => panic!("expected an Ack, got {other:?}"),
            })
            .collect();
        assert_eq!(ids, [2, 3]);
    });
}

/// The worst gap between the ticks of a 1 ms ticker on the runtime while a
/// transfer of `segments` segments of `size` bytes is received, every page
/// read (on the blocking pool), and accepted on the runtime's thread.
fn worst_runtime_stall(segments: usize, size: u64) -> Duration {
    // Its 253 fds would disturb the tests that count this process's fds.
    let _serial = serial();
    let runtime = current_thread_runtime();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stall.sock");
    runtime.block_on(async move {
        let listener = Listener::bind(&socket).unwrap();
        // Filled before the ticker starts: the fill is the sender's work.
        let (filled, is_filled) = std::sync::mpsc::channel();
        let sender = std::thread::spawn(move || {
            let segments: Vec<_> = (0..segments)
                .map(|index| segment(&format!("s{index}"), size))
                .collect();
            filled.send(()).unwrap();
            sealpass_sender::Sender::connect(&socket)
                .unwrap()
                .send(&segments)
                .unwrap()
        });
        tokio::task::spawn_blocking(move || is_filled.recv().unwrap())
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = tokio::spawn({
            let stop = std::sync::Arc::clone(&stop);
            async move {
                let (mut worst, mut last) = (Duration::ZERO, Instant::now());
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let now = Instant::now();
                    worst = worst.max(now - last);
                    last = now;
                }
                worst
            }
        });
        let mut connection = listener.accept().await.unwrap();
        let transfer = connection.receive().await.unwrap().unwrap();
        let transfer = tokio::task::spawn_blocking(move || {
            for segment in transfer.segments() {
                let touched: u64 = segment
                    .bytes()
                    .iter()
                    .step_by(4096)
                    .map(|&b| u64::from(b))
                    .sum();
                assert!(touched > 0);
            }
            transfer
        })
        .await
        .unwrap();
        transfer.accept().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::Relaxed);
        let worst = ticker.await.unwrap();
        assert!(
            tokio::task::spawn_blocking(move || sender.join().unwrap())
                .await
                .unwrap()
                .is_accepted()
        );
        worst
    })
}

#[test]
fn a_big_transfer_never_stalls_the_runtime() {
    // 253 segments of 4 MiB less a page, every page read: unmapping them on
    // the runtime's thread stalled it for 65 to 206 ms. The target, in
    // `cargo xtask bench --async`, is 2 ms; this bound only has to be sure.
    let worst = worst_runtime_stall(253, (4 << 20) - 4096);
    assert!(
        worst < Duration::from_millis(30),
        "the runtime stalled for {worst:?}"
    );
}

#[test]
fn a_receive_dropped_while_its_message_is_judged_off_the_runtime_loses_nothing() {
    let _serial = serial();
    let fds_before = open_fds();
    let runtime = current_thread_runtime();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cancelled.sock");
    runtime.block_on(async move {
        let listener = Listener::bind(&socket).unwrap();
        // 20 segments: judged on the blocking pool, across polls.
        let (sent, was_sent) = std::sync::mpsc::channel();
        let sender = std::thread::spawn(move || {
            let segments: Vec<_> = (0..20).map(|i| segment(&format!("s{i}"), 4096)).collect();
            let mut sender = sealpass_sender::Sender::connect(&socket).unwrap();
            sender.submit(&segments).unwrap();
            sent.send(()).unwrap();
            let first = sender.next_verdict().unwrap();
            let second = sender.send(&segments[..1]).unwrap();
            (first, second)
        });
        let mut connection = listener.accept().await.unwrap();
        // The message is queued before the first poll: the first poll
        // receives it and starts its job.
        tokio::task::spawn_blocking(move || was_sent.recv().unwrap())
            .await
            .unwrap();
        let mut cancelled = 0;
        let transfer = loop {
            // Dropped after one poll each time, until a poll finishes it.
            tokio::select! {
                biased;
                received = connection.receive() => break received.unwrap().unwrap(),
                () = std::future::ready(()) => cancelled += 1,
            }
            tokio::task::yield_now().await;
        };
        assert!(cancelled > 0, "the job was left pending at least once");
        assert_eq!((transfer.id(), transfer.segments().len()), (1, 20));
        transfer.accept().unwrap();
        let next = connection.receive().await.unwrap().unwrap();
        assert_eq!(next.id(), 2);
        next.accept().unwrap();
        let (first, second) = tokio::task::spawn_blocking(move || sender.join().unwrap())
            .await
            .unwrap();
        assert!(
            first.is_accepted() && second.is_accepted(),
            "{first:?} {second:?}"
        );
    });
    drop(runtime);
    eventually("the fd count back where it was", || {
        open_fds() == fds_before
    });
}
