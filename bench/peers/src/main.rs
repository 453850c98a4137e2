//! sealpass end to end beside what users would pick instead, in one run:
//! a unix stream socket, a pipe, ipc-channel's `IpcSharedMemory` and
//! iceoryx2's publish-subscribe. `cargo xtask bench --peers` builds and runs
//! it (this workspace is its own: `cargo xtask test` never builds it).
//!
//! Each round, the producer (this process, on one CPU) writes every byte of
//! a buffer of the size, each byte `b` (a new `b` each round), and hands it
//! over; the consumer (a child process, on another CPU) reads every byte
//! into a checksum and answers with it, which must be the checksum of
//! `size` bytes of `b`. The time
//! is the producer's per round, averaged over many rounds; each figure is
//! the median of several such runs.
//!
//! - sealpass: a new memfd filled by `SealedSegment::filled` (the fill path
//!   sealpass chooses for the machine's huge page mode), sealed, sent; the
//!   consumer verifies, maps, reads, and answers `Ack` only if the sum is
//!   right.
//! - unix stream, pipe: `write_all` from a buffer the producer rewrites each
//!   round; `read_exact` into a buffer the consumer reuses.
//! - ipc-channel 0.23: `IpcSharedMemory::from_byte` (a new shared memory
//!   object each round, as its API makes it) sent over an `IpcSender`.
//! - iceoryx2 0.10: a sample loaned from the publisher's shared memory
//!   (allocated once, reused), written, sent; the consumer waits for an
//!   event (`Listener::blocking_wait`, no polling) and answers through a
//!   second service and event.
//!
//! `--fanout=1,2,4,8` measures instead one producer to N consumers (sealpass
//! and unix streams; `cargo xtask bench --fanout`).
//!
//! Output: one JSON line per mechanism and size (`median_us`, `min_us`,
//! `max_us`), for xtask to tabulate. Run by hand, `--quick`,
//! `--mechanisms=sealpass,unix-stream` and `--sizes=4096,67108864` (bytes)
//! narrow it to the rows being profiled.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use sealpass_sender::{SealedSegment, Seals, Sender};

const ROLE: &str = "SEALPASS_PEERS_ROLE";
const SIZE: &str = "SEALPASS_PEERS_SIZE";
const PLACE: &str = "SEALPASS_PEERS_PLACE";
const CPU: &str = "SEALPASS_PEERS_CPU";
/// For an iceoryx2 fan-out consumer: `N:SCOPE`, the number of consumers and
/// the services' scope, which all N share.
const ICEORYX2_FAN_OUT: &str = "SEALPASS_PEERS_ICEORYX2_FAN_OUT";

const MECHANISMS: &[&str] = &["sealpass", "unix-stream", "pipe", "ipc-channel", "iceoryx2"];

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        if let Some(cpu) = std::env::var(CPU).ok().and_then(|c| c.parse().ok()) {
            pin(cpu);
        }
        let size: usize = std::env::var(SIZE).unwrap().parse().unwrap();
        let place = PathBuf::from(std::env::var_os(PLACE).unwrap());
        consume(&role, size, &place);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<&str> = args
        .iter()
        .find_map(|a| a.strip_prefix("--mechanisms="))
        .map_or_else(|| MECHANISMS.to_vec(), |list| list.split(',').collect());
    let all_sizes: &[usize] = if quick {
        &[4 << 10, 1 << 20, 64 << 20]
    } else {
        &[4 << 10, 1 << 20, 64 << 20, 1 << 30]
    };
    // `--sizes=4096,1048576`: only those rows, for profiling one size.
    let sizes: Vec<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("--sizes="))
        .map_or_else(
            || all_sizes.to_vec(),
            |list| list.split(',').map(|s| s.parse().unwrap()).collect(),
        );
    let runs = if quick { 3 } else { 5 };
    // `--fanout=1,2,4,8`: instead, one producer to N consumers (sealpass and
    // unix streams only), each consumer reading every byte.
    if let Some(list) = args.iter().find_map(|a| a.strip_prefix("--fanout=")) {
        let counts: Vec<usize> = list.split(',').map(|n| n.parse().unwrap()).collect();
        return fan_out_rows(&counts, &sizes, runs, quick);
    }
    let cpus = allowed_cpus();
    let (producer_cpu, consumer_cpu) = match cpus.as_slice() {
        [one, two, ..] => (Some(*one), Some(*two)),
        _ => (None, None),
    };
    if let Some(cpu) = producer_cpu {
        pin(cpu);
    }
    for &size in &sizes {
        let rounds = rounds_for(size, quick);
        for mechanism in &only {
            let mut per_round = Vec::new();
            for _ in 0..runs {
                per_round.push(measure(mechanism, size, rounds, consumer_cpu));
            }
            per_round.sort_by(f64::total_cmp);
            println!(
                "{}",
                serde_json::json!({
                    "mechanism": mechanism,
                    "bytes": size,
                    "rounds": rounds,
                    "runs": runs,
                    "median_us": per_round[per_round.len() / 2],
                    "min_us": per_round[0],
                    "max_us": per_round[per_round.len() - 1],
                })
            );
        }
    }
}

/// One producer (this process, on the first allowed CPU) to `n` consumer
/// processes (on the other CPUs, in turn), per size: sealpass makes one
/// sealed memfd per round and submits it on each consumer's connection,
/// then takes each verdict; a unix stream copies the round's buffer to each
/// consumer in turn (one after another: with every other CPU busy reading,
/// a thread per consumer has no CPU to run on here), then reads each sum;
/// iceoryx2 publishes one loaned sample, written in place, that all N
/// subscribers read, and collects N answers (every side sleeps in blocking
/// event waits).
/// Every consumer reads every byte and answers its sum. Alongside, the peak
/// extra memory system-wide while the rounds run: `Shmem` from
/// /proc/meminfo, less what it was before, plus the consumers' anonymous
/// memory, sampled every 2 ms.
fn fan_out_rows(counts: &[usize], sizes: &[usize], runs: usize, quick: bool) {
    let cpus = allowed_cpus();
    let producer = cpus.first().copied();
    let others: Vec<usize> = cpus.iter().skip(1).copied().collect();
    if let Some(cpu) = producer {
        pin(cpu);
    }
    for &size in sizes {
        let rounds = rounds_for(size, quick).min(if quick { 40 } else { 200 });
        for &n in counts {
            for mechanism in ["sealpass", "unix-stream", "iceoryx2"] {
                let (mut times, mut peaks) = (Vec::new(), Vec::new());
                for _ in 0..runs {
                    let (micros, peak) = fan_out(mechanism, size, rounds, n, &others);
                    times.push(micros);
                    peaks.push(peak);
                }
                times.sort_by(f64::total_cmp);
                peaks.sort_by(f64::total_cmp);
                println!(
                    "{}",
                    serde_json::json!({
                        "mechanism": mechanism,
                        "consumers": n,
                        "bytes": size,
                        "rounds": rounds,
                        "runs": runs,
                        "median_us": times[times.len() / 2],
                        "min_us": times[0],
                        "max_us": times[times.len() - 1],
                        "peak_extra_kib": peaks[peaks.len() / 2],
                    })
                );
            }
        }
    }
}

/// `kB` fields of a /proc file, summed.
fn kib(path: &str, fields: &[&str]) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            fields.contains(&key).then(|| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })?
        })
        .sum()
}

/// One fan-out measurement: the producer's time per round (µs), and the
/// peak extra memory (KiB) while it ran.
fn fan_out(mechanism: &str, size: usize, rounds: usize, n: usize, cpus: &[usize]) -> (f64, f64) {
    let baseline = kib("/proc/meminfo", &["Shmem"]);
    // iceoryx2's consumers share one set of services, scoped to this
    // measurement.
    let scope = tempfile::tempdir().unwrap();
    let shared = format!("{n}:{}", ice::scope_of(scope.path()));
    let extra = (mechanism == "iceoryx2").then_some((ICEORYX2_FAN_OUT, shared.as_str()));
    let consumers: Vec<Consumer> = (0..n)
        .map(|i| {
            Consumer::start(
                mechanism,
                size,
                cpus.get(i % cpus.len().max(1)).copied(),
                extra,
            )
        })
        .collect();
    let pids: Vec<u32> = consumers.iter().map(|c| c.child.id()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let shmem = kib("/proc/meminfo", &["Shmem"]).saturating_sub(baseline);
                let private: u64 = pids
                    .iter()
                    .map(|pid| kib(&format!("/proc/{pid}/status"), &["RssAnon"]))
                    .sum();
                peak = peak.max(shmem + private);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        })
    };
    let warm = rounds.div_ceil(10);
    let mut started = None;
    let mut iceoryx2_producer = None;
    match mechanism {
        "sealpass" => {
            let mut senders: Vec<Sender> = consumers
                .iter()
                .map(|c| Sender::connect(c.place.path().join("sealpass.sock")).unwrap())
                .collect();
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                let segment = SealedSegment::filled(
                    "peers",
                    byte_of(round),
                    size as u64,
                    Seals::SENDER_DEFAULT,
                )
                .unwrap();
                for sender in &mut senders {
                    sender.submit(std::slice::from_ref(&segment)).unwrap();
                }
                drop(segment);
                for sender in &mut senders {
                    assert!(sender.next_verdict().unwrap().is_accepted());
                }
            }
        }
        "unix-stream" => {
            let mut streams: Vec<UnixStream> = consumers
                .iter()
                .map(|c| UnixStream::connect(c.place.path().join("stream.sock")).unwrap())
                .collect();
            let mut buffer = vec![0u8; size];
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                buffer.fill(byte_of(round));
                for stream in &mut streams {
                    stream.write_all(&buffer).unwrap();
                }
                for stream in &mut streams {
                    assert_eq!(read_u64(stream), expected_sum(byte_of(round), size));
                }
            }
        }
        "iceoryx2" => {
            let producer = ice::Producer::open(&ice::scope_of(scope.path()), size, n);
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                let expected = expected_sum(byte_of(round), size);
                for answer in producer.round(byte_of(round), size, n) {
                    assert_eq!(answer, expected);
                }
            }
            iceoryx2_producer = Some(producer);
        }
        other => panic!("no fan-out for {other}"),
    }
    let micros = started.unwrap().elapsed().as_secs_f64() * 1e6 / rounds as f64;
    if let Some(producer) = iceoryx2_producer {
        producer.stop();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    for consumer in consumers {
        consumer.finish();
    }
    (micros, peak as f64)
}

fn rounds_for(size: usize, quick: bool) -> usize {
    let budget: usize = if quick { 128 << 20 } else { 1 << 30 };
    (budget / size).clamp(3, if quick { 200 } else { 1000 })
}

fn allowed_cpus() -> Vec<usize> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
    (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect()
}

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &set).unwrap();
}

/// The byte of round `round`: never 0, so an all-zero page is caught.
fn byte_of(round: usize) -> u8 {
    (round % 250) as u8 + 1
}

/// Every byte read, at memory speed: the 8-byte words added (wrapping),
/// then the tail's bytes. The same function the handoff benchmark's readers
/// use.
fn sum(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words.remainder().iter().map(|&b| u64::from(b)).sum();
    words.fold(tail, |total, word| {
        total.wrapping_add(u64::from_le_bytes(word.try_into().unwrap()))
    })
}

/// What [`sum`] gives for `size` bytes, each `byte`.
fn expected_sum(byte: u8, size: usize) -> u64 {
    let word = u64::from_le_bytes([byte; 8]);
    word.wrapping_mul((size / 8) as u64)
        .wrapping_add(u64::from(byte) * (size % 8) as u64)
}

/// A consumer child, started for one measurement.
struct Consumer {
    child: Child,
    place: tempfile::TempDir,
}

impl Consumer {
    fn start(role: &str, size: usize, cpu: Option<usize>, extra: Option<(&str, &str)>) -> Consumer {
        let place = tempfile::tempdir().unwrap();
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .env(ROLE, role)
            .env(SIZE, size.to_string())
            .env(PLACE, place.path())
            .stdout(Stdio::piped());
        if let Some((key, value)) = extra {
            command.env(key, value);
        }
        if let Some(cpu) = cpu {
            command.env(CPU, cpu.to_string());
        }
        let mut child = command.spawn().unwrap();
        // The consumer says `ready` once it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "{role} consumer did not start");
        Consumer { child, place }
    }

    fn finish(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "consumer failed: {status}");
    }
}

/// The name of ipc-channel's one-shot server, for the consumer to connect.
const IPC_NAME: &str = "SEALPASS_PEERS_IPC_NAME";

type IpcData = ipc_channel::ipc::IpcSharedMemory;
/// What the consumer hands the producer: where to send data, where answers come.
type IpcEnds = (
    ipc_channel::ipc::IpcSender<IpcData>,
    ipc_channel::ipc::IpcReceiver<u64>,
);

/// The producer's time per round, in µs, for `rounds` rounds.
fn measure(mechanism: &str, size: usize, rounds: usize, cpu: Option<usize>) -> f64 {
    let expected = |round: usize| expected_sum(byte_of(round), size);
    let mut server = None;
    let extra = if mechanism == "ipc-channel" {
        let (one_shot, name) = ipc_channel::ipc::IpcOneShotServer::<IpcEnds>::new().unwrap();
        server = Some(one_shot);
        Some(name)
    } else {
        None
    };
    let consumer = Consumer::start(
        mechanism,
        size,
        cpu,
        extra.as_deref().map(|n| (IPC_NAME, n)),
    );
    let place = consumer.place.path().to_owned();
    // Untimed rounds first: connections settle, buffers and caches warm.
    let warm = rounds.div_ceil(10);
    let mut started = None;
    // Told to stop once the clock has stopped.
    let mut iceoryx2_producer = None;
    match mechanism {
        "sealpass" => {
            let mut sender = Sender::connect(place.join("sealpass.sock")).unwrap();
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                let segment = SealedSegment::filled(
                    "peers",
                    byte_of(round),
                    size as u64,
                    Seals::SENDER_DEFAULT,
                )
                .unwrap();
                sender.submit(&[segment]).unwrap();
                // The consumer answers Ack only when the sum is right.
                assert!(sender.next_verdict().unwrap().is_accepted());
            }
        }
        "unix-stream" => {
            let mut stream = UnixStream::connect(place.join("stream.sock")).unwrap();
            let mut buffer = vec![0u8; size];
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                buffer.fill(byte_of(round));
                stream.write_all(&buffer).unwrap();
                assert_eq!(read_u64(&mut stream), expected(round));
            }
        }
        "pipe" => {
            let mut data = std::fs::OpenOptions::new()
                .write(true)
                .open(place.join("data.fifo"))
                .unwrap();
            let mut answers = std::fs::File::open(place.join("answers.fifo")).unwrap();
            let mut buffer = vec![0u8; size];
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                buffer.fill(byte_of(round));
                data.write_all(&buffer).unwrap();
                assert_eq!(read_u64(&mut answers), expected(round));
            }
        }
        "ipc-channel" => {
            let (_, (data, answers)) = server.take().unwrap().accept().unwrap();
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                data.send(IpcData::from_byte(byte_of(round), size)).unwrap();
                assert_eq!(answers.recv().unwrap(), expected(round));
            }
        }
        "iceoryx2" => {
            let producer = ice::Producer::open(&ice::scope_of(&place), size, 1);
            for round in 0..warm + rounds {
                if round == warm {
                    started = Some(Instant::now());
                }
                assert_eq!(producer.round(byte_of(round), size, 1), [expected(round)]);
            }
            iceoryx2_producer = Some(producer);
        }
        other => panic!("unknown mechanism {other}"),
    }
    let micros = started.unwrap().elapsed().as_secs_f64() * 1e6 / rounds as f64;
    if let Some(producer) = iceoryx2_producer {
        producer.stop();
    }
    consumer.finish();
    micros
}

fn read_u64(from: &mut impl Read) -> u64 {
    let mut answer = [0u8; 8];
    from.read_exact(&mut answer).unwrap();
    u64::from_le_bytes(answer)
}

fn ready() {
    println!("ready");
    std::io::stdout().flush().unwrap();
}

/// The consumer's side of `role`: reads every byte of each round, answers
/// the sum, until the producer goes.
fn consume(role: &str, size: usize, place: &Path) {
    match role {
        "sealpass" => {
            let listener = sealpass_receiver::Listener::bind(place.join("sealpass.sock")).unwrap();
            ready();
            let mut connection = listener.accept().unwrap();
            let mut round = 0;
            while let Some(transfer) = connection.receive().unwrap() {
                let total = sum(transfer.segments()[0].bytes());
                let right = total == expected_sum(byte_of(round), size);
                round += 1;
                if right {
                    transfer.accept().unwrap();
                } else {
                    transfer.reject(format!("sum {total}")).unwrap();
                }
            }
        }
        "unix-stream" => {
            let listener = UnixListener::bind(place.join("stream.sock")).unwrap();
            ready();
            let (mut stream, _) = listener.accept().unwrap();
            let mut buffer = vec![0u8; size];
            while stream.read_exact(&mut buffer).is_ok() {
                stream.write_all(&sum(&buffer).to_le_bytes()).unwrap();
            }
        }
        "pipe" => {
            for fifo in ["data.fifo", "answers.fifo"] {
                nix::unistd::mkfifo(
                    &place.join(fifo),
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                )
                .unwrap();
            }
            ready();
            let mut data = std::fs::File::open(place.join("data.fifo")).unwrap();
            let mut answers = std::fs::OpenOptions::new()
                .write(true)
                .open(place.join("answers.fifo"))
                .unwrap();
            let mut buffer = vec![0u8; size];
            while data.read_exact(&mut buffer).is_ok() {
                answers.write_all(&sum(&buffer).to_le_bytes()).unwrap();
            }
        }
        "ipc-channel" => {
            let name = std::env::var(IPC_NAME).unwrap();
            let (data_tx, data_rx) = ipc_channel::ipc::channel::<IpcData>().unwrap();
            let (answer_tx, answer_rx) = ipc_channel::ipc::channel::<u64>().unwrap();
            ipc_channel::ipc::IpcSender::<IpcEnds>::connect(name)
                .unwrap()
                .send((data_tx, answer_rx))
                .unwrap();
            ready();
            while let Ok(shared) = data_rx.recv() {
                if answer_tx.send(sum(&shared)).is_err() {
                    break;
                }
            }
        }
        "iceoryx2" => match std::env::var(ICEORYX2_FAN_OUT) {
            Ok(shared) => {
                let (n, scope) = shared.split_once(':').unwrap();
                ice::consume(scope, n.parse().unwrap());
            }
            Err(_) => ice::consume(&ice::scope_of(place), 1),
        },
        other => panic!("unknown role {other}"),
    }
}

/// iceoryx2: a `[u8]` publish-subscribe service for the data, a `u64` one
/// for the answers, and an event service for each direction, so that each
/// side sleeps in `Listener::blocking_wait` instead of polling.
mod ice {
    use std::path::Path;

    use iceoryx2::prelude::*;

    /// A scope for service names unique to one measurement: the name of
    /// its temporary directory.
    pub(crate) fn scope_of(place: &Path) -> String {
        place
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace('.', "")
    }

    fn name(scope: &str, what: &str) -> ServiceName {
        format!("sealpass-peers/{scope}/{what}")
            .as_str()
            .try_into()
            .unwrap()
    }

    /// The producer's ports, dropped before their node (field order).
    pub(crate) struct Producer {
        data: iceoryx2::port::publisher::Publisher<ipc::Service, [u8], ()>,
        answers: iceoryx2::port::subscriber::Subscriber<ipc::Service, u64, ()>,
        go: iceoryx2::port::notifier::Notifier<ipc::Service>,
        done: iceoryx2::port::listener::Listener<ipc::Service>,
        _node: Node<ipc::Service>,
    }

    /// The four services of one measurement, opened (or created) by
    /// either side.
    struct Services {
        node: Node<ipc::Service>,
        data:
            iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>,
        answers:
            iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, u64, ()>,
        go: iceoryx2::service::port_factory::event::PortFactory<ipc::Service>,
        done: iceoryx2::service::port_factory::event::PortFactory<ipc::Service>,
    }

    impl Services {
        /// For one producer and `consumers` consumers: the data service has
        /// room for that many subscribers, the answers for that many
        /// publishers, the events for that many listeners and notifiers
        /// (never less than iceoryx2's defaults, so that one to one runs
        /// as configured out of the box).
        fn open(scope: &str, consumers: usize) -> Services {
            // Without this each node warns that no config file was loaded;
            // the defaults are what this benchmark wants.
            set_log_level(LogLevel::Error);
            let node = NodeBuilder::new().create::<ipc::Service>().unwrap();
            let event = |what| {
                node.service_builder(&name(scope, what))
                    .event()
                    .max_listeners(consumers.max(16))
                    .max_notifiers(consumers.max(16))
                    .open_or_create()
                    .unwrap()
            };
            let (go, done) = (event("go"), event("done"));
            let data = node
                .service_builder(&name(scope, "data"))
                .publish_subscribe::<[u8]>()
                .max_subscribers(consumers.max(8))
                .open_or_create()
                .unwrap();
            let answers = node
                .service_builder(&name(scope, "answers"))
                .publish_subscribe::<u64>()
                .max_publishers(consumers.max(2))
                .open_or_create()
                .unwrap();
            Services {
                node,
                data,
                answers,
                go,
                done,
            }
        }
    }

    impl Producer {
        pub(crate) fn open(scope: &str, size: usize, consumers: usize) -> Producer {
            let services = Services::open(scope, consumers);
            Producer {
                data: services
                    .data
                    .publisher_builder()
                    .initial_max_slice_len(size)
                    .create()
                    .unwrap(),
                answers: services.answers.subscriber_builder().create().unwrap(),
                go: services.go.notifier_builder().create().unwrap(),
                done: services.done.listener_builder().create().unwrap(),
                _node: services.node,
            }
        }

        /// One round: write every byte of a loaned sample, send it to
        /// every subscriber, wake them, sleep until all `consumers` have
        /// answered; returns their sums.
        pub(crate) fn round(&self, byte: u8, size: usize, consumers: usize) -> Vec<u64> {
            let sample = self.data.loan_slice_uninit(size).unwrap();
            let sample = sample.write_from_fn(|_| byte);
            sample.send().unwrap();
            self.go.notify().unwrap();
            let mut sums = Vec::with_capacity(consumers);
            while sums.len() < consumers {
                match self.answers.receive().unwrap() {
                    Some(answer) => sums.push(*answer),
                    None => {
                        self.done.blocking_wait(|_| {}).unwrap();
                    }
                }
            }
            sums
        }

        /// Tells the consumer to end (an empty sample), so that both sides
        /// drop their ports and iceoryx2 removes its shared memory.
        pub(crate) fn stop(&self) {
            self.data
                .loan_slice_uninit(0)
                .unwrap()
                .write_from_fn(|_| 0)
                .send()
                .unwrap();
            self.go.notify().unwrap();
        }
    }

    pub(crate) fn consume(scope: &str, consumers: usize) {
        let services = Services::open(scope, consumers);
        let data = services.data.subscriber_builder().create().unwrap();
        let answers = services.answers.publisher_builder().create().unwrap();
        let go = services.go.listener_builder().create().unwrap();
        let done = services.done.notifier_builder().create().unwrap();
        super::ready();
        loop {
            match data.receive().unwrap() {
                // The producer's last word.
                Some(sample) if sample.payload().is_empty() => return,
                Some(sample) => {
                    answers.send_copy(super::sum(sample.payload())).unwrap();
                    done.notify().unwrap();
                }
                None => {
                    go.blocking_wait(|_| {}).unwrap();
                }
            }
        }
    }
}
