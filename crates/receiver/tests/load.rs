//! The receiving service under load, in-process so that what its handler saw
//! can be compared with what every sender was told. Bounded in count and
//! time; `SEALPASS_SOAK=1` (`cargo xtask soak`) makes it heavier.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use sealpass_kernel::fdpass;
use sealpass_proto::{Message, RejectReason, Seals, Segment, Transfer, encode};
use sealpass_receiver::{Config, Listener, MappedBudget, Service};
use sealpass_sender::{SealedSegment, Sender, Verdict};

mod support;

use support::{own_memfd_mappings as memfd_mappings, own_open_fds as open_fds, serial};

fn soak() -> bool {
    std::env::var_os("SEALPASS_SOAK").is_some()
}

/// A running service whose handler records every segment name it sees.
struct Running {
    socket: std::path::PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
    shutdown: sealpass_receiver::ShutdownHandle,
    budget: Arc<MappedBudget>,
    thread: thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(config: Config) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("load.sock");
    let mut listener = Listener::bind(&socket).unwrap();
    listener.set_config(config);
    let service = Service::new(listener).unwrap();
    let shutdown = service.shutdown_handle();
    let budget = service.mapped_budget();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Arc::clone(&seen);
    let thread = thread::spawn(move || {
        service
            .run(move |delivery| {
                let mut seen = recorder.lock().unwrap();
                for segment in delivery.transfer.segments() {
                    // Touch the bytes: the first must be the one the sender wrote.
                    assert_eq!(segment.bytes().first(), Some(&b'x'));
                    seen.push(segment.name().to_owned());
                }
                Ok::<(), String>(())
            })
            .unwrap();
    });
    Running {
        socket,
        seen,
        shutdown,
        budget,
        thread,
        _dir: dir,
    }
}

impl Running {
    fn stop(self) -> Vec<String> {
        self.shutdown.shutdown();
        self.thread.join().unwrap();
        assert_eq!(self.budget.in_use(), 0, "mapped bytes must return to zero");
        assert!(!self.socket.exists(), "the service removes its socket");
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

/// `messages` transfers of 1 to 8 segments from sender `who`; returns the
/// names of every segment whose transfer was acknowledged.
fn valid_sender(socket: &Path, who: usize, messages: usize) -> Vec<String> {
    let mut sender = Sender::connect(socket).unwrap();
    sender.set_answer_timeout(Some(PATIENCE)).unwrap();
    let mut acknowledged = Vec::new();
    for message in 0..messages {
        let count = 1 + (who * 7 + message) % 8;
        let names: Vec<String> = (0..count)
            .map(|k| format!("c{who}-m{message}-s{k}"))
            .collect();
        let segments: Vec<SealedSegment> = names
            .iter()
            .map(|name| SealedSegment::filled(name, b'x', 4096, Seals::SENDER_DEFAULT).unwrap())
            .collect();
        match sender.send(&segments).unwrap() {
            Verdict::Accepted { id } => {
                assert_eq!(id, message as u64 + 1);
                acknowledged.extend(names);
            }
            other => panic!("sender {who}, message {message}: {other:?}"),
        }
    }
    acknowledged
}

/// Runs `senders` valid senders at once; returns every acknowledged name.
fn valid_senders(socket: &Path, senders: usize, messages: usize) -> Vec<String> {
    let workers: Vec<_> = (0..senders)
        .map(|who| {
            let socket = socket.to_owned();
            thread::spawn(move || valid_sender(&socket, who, messages))
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

fn check_nothing_lost_or_duplicated(acknowledged: Vec<String>, seen: Vec<String>, expected: usize) {
    assert_eq!(
        acknowledged.len(),
        expected,
        "every message answered with Ack"
    );
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "the handler saw a segment twice");
    let acknowledged: HashSet<&String> = acknowledged.iter().collect();
    assert_eq!(
        unique, acknowledged,
        "every Ack matches what the handler saw"
    );
}

fn expected_segments(senders: usize, messages: usize) -> usize {
    (0..senders)
        .flat_map(|who| (0..messages).map(move |message| 1 + (who * 7 + message) % 8))
        .sum()
}

#[test]
fn concurrent_senders_every_message_answered_nothing_lost_nothing_duplicated() {
    let _serial = serial();
    let (senders, messages) = if soak() { (64, 2000) } else { (64, 200) };
    let fds_before = open_fds();
    let running = start(Config::default());
    let socket = running.socket.clone();
    let acknowledged = valid_senders(&socket, senders, messages);
    let seen = running.stop();
    check_nothing_lost_or_duplicated(acknowledged, seen, expected_segments(senders, messages));
    assert_eq!(open_fds(), fds_before, "open fds back to where they were");
    assert_eq!(memfd_mappings(), 0, "no memfd left mapped");
}

/// How long a scripted peer waits for the service before failing.
const PATIENCE: Duration = Duration::from_secs(20);

/// Hostile peers of every kind, all at once, beside valid senders.
fn hostile_peer(socket: &Path, kind: usize, start: &Barrier) {
    start.wait();
    let connection = fdpass::connect(socket).unwrap();
    // A bug must fail the test, not hang it.
    fdpass::set_timeouts(connection.as_fd(), Some(PATIENCE), Some(PATIENCE)).unwrap();
    let mut buffer = vec![0; 65536];
    let mut control = fdpass::ControlBuffer::new();
    let mut answer = || fdpass::receive(connection.as_fd(), &mut buffer, &mut control);
    match kind % 5 {
        // Silent: says nothing; the deadline answers Timeout and closes.
        0 => {
            let reject = answer().expect("a silent peer is answered, not left hanging");
            assert!(reject.len > 0, "expected Reject(Timeout) before the close");
            assert!(
                answer()
                    .expect("then the connection closes")
                    .is_end_of_stream()
            );
        }
        // Slow: waits, then sends one valid transfer.
        1 => {
            thread::sleep(Duration::from_millis(300));
            let segment = SealedSegment::filled("slow", b'x', 10, Seals::SENDER_DEFAULT).unwrap();
            let bytes = encode(&Message::Transfer(Transfer::new(
                1,
                vec![segment.declaration().clone()],
            )))
            .unwrap();
            fdpass::send(connection.as_fd(), &bytes, &[segment.fd()]).unwrap();
            assert!(answer().unwrap().len > 0);
        }
        // Malformed: garbage, again and again.
        2 => {
            for _ in 0..50 {
                fdpass::send(connection.as_fd(), b"not a sealpass message at all", &[]).unwrap();
                assert!(answer().unwrap().len > 0);
            }
        }
        // Fd flood: 253 pipes behind a one-segment header.
        3 => {
            let (read, _write) = nix::unistd::pipe().unwrap();
            let header = encode(&Message::Transfer(Transfer::new(
                1,
                vec![Segment::new("flood", 1, Seals::SENDER_DEFAULT)],
            )))
            .unwrap();
            for _ in 0..20 {
                fdpass::send(connection.as_fd(), &header, &vec![read.as_fd(); 253]).unwrap();
                assert!(answer().unwrap().len > 0);
            }
        }
        // Never reads its answers: sends until its queue is full, then stops.
        _ => {
            fdpass::set_timeouts(connection.as_fd(), None, Some(Duration::from_millis(500)))
                .unwrap();
            for _ in 0..2000 {
                if fdpass::send(connection.as_fd(), b"unanswered", &[]).is_err() {
                    break;
                }
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn hostile_peers_delay_no_valid_sender() {
    let _serial = serial();
    let (senders, messages, hostile) = if soak() {
        (64, 2000, 40)
    } else {
        (64, 200, 20)
    };
    let fds_before = open_fds();
    let running = start(
        Config::builder()
            .timeouts(Some(Duration::from_secs(2)))
            .build()
            .unwrap(),
    );
    let socket = running.socket.clone();
    let start_line = Arc::new(Barrier::new(hostile));
    let hostiles: Vec<_> = (0..hostile)
        .map(|kind| {
            let socket = socket.clone();
            let start_line = Arc::clone(&start_line);
            thread::spawn(move || hostile_peer(&socket, kind, &start_line))
        })
        .collect();
    let acknowledged = valid_senders(&socket, senders, messages);
    for hostile in hostiles {
        hostile.join().unwrap();
    }
    let seen: Vec<String> = running
        .stop()
        .into_iter()
        .filter(|name| name.starts_with('c'))
        .collect();
    check_nothing_lost_or_duplicated(acknowledged, seen, expected_segments(senders, messages));
    assert_eq!(open_fds(), fds_before, "open fds back to where they were");
    assert_eq!(memfd_mappings(), 0, "no memfd left mapped");
}

#[test]
fn the_mapped_bytes_budget_is_shared_and_given_back() {
    let _serial = serial();
    let running = start(Config::builder().max_mapped_total(1 << 20).build().unwrap());
    let mut sender = Sender::connect(&running.socket).unwrap();
    let big = SealedSegment::filled("c-big", b'x', 2 << 20, Seals::SENDER_DEFAULT).unwrap();
    match sender.send(&[big]).unwrap() {
        Verdict::Rejected { reason, .. } => assert_eq!(reason, RejectReason::MemoryLimit),
        other => panic!("expected MemoryLimit, got {other:?}"),
    }
    for round in 0..3 {
        let fits = SealedSegment::filled(
            &format!("c-fits-{round}"),
            b'x',
            1 << 20,
            Seals::SENDER_DEFAULT,
        )
        .unwrap();
        assert!(
            sender.send(&[fits]).unwrap().is_accepted(),
            "round {round}: the budget was not given back"
        );
    }
    drop(sender);
    running.stop();
}
