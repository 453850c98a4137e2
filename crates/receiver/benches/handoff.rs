//! `cargo xtask bench [--quick]`: what a handoff costs, against the kernel's
//! floor and against copying, sender and receiver in separate processes.
//! The parent is the sender; it re-runs this binary as the receiving peer.
//! Every figure is a per-operation mean over many iterations; each is
//! measured in several runs and reported as the median with the spread.
//! Ratios are taken pair by pair within the same run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sealpass_proto::Seals;
use sealpass_proto::fdpass::{self, ControlBuffer};
use sealpass_receiver::Listener;
use sealpass_sender::{SealedSegment, Sender};

const PEER_ROLE: &str = "SEALPASS_BENCH_PEER";
const PEER_SOCKET: &str = "SEALPASS_BENCH_SOCKET";
const PEER_SIZE: &str = "SEALPASS_BENCH_SIZE";

// ---- the receiving peer ---------------------------------------------------

fn peer(role: &str) {
    let socket = PathBuf::from(std::env::var_os(PEER_SOCKET).unwrap());
    let size: usize = std::env::var(PEER_SIZE).unwrap().parse().unwrap();
    match role {
        // Bare recvmsg/sendmsg echo: no header, no checks, no mapping.
        "floor" => {
            let listener = fdpass::listen(&socket, 1).unwrap();
            let connection = fdpass::accept(listener.as_fd()).unwrap();
            let mut buffer = [0u8; 64];
            let mut control = ControlBuffer::new();
            loop {
                let received =
                    fdpass::receive(connection.as_fd(), &mut buffer, &mut control).unwrap();
                if received.is_end_of_stream() {
                    return;
                }
                drop(received);
                fdpass::send(connection.as_fd(), &[0; 64], &[]).unwrap();
            }
        }
        // The real receiver: every kernel check, mapping, Ack. With "read",
        // the handler also reads every byte.
        "sealpass" | "sealpass-read" | "sealpass-read-populate" => {
            let listener = Listener::bind(&socket).unwrap();
            let mut connection = listener.accept().unwrap();
            connection.set_idle_timeout(None).unwrap();
            connection.set_populate(role == "sealpass-read-populate");
            let read = role != "sealpass";
            while connection.is_open() {
                connection
                    .serve_one(|transfer| {
                        if read {
                            for segment in transfer.segments() {
                                black_box(checksum(segment.bytes()));
                            }
                        }
                        Ok::<(), String>(())
                    })
                    .unwrap();
            }
        }
        // Copy baselines: read every byte of `size`, answer one byte.
        "stream" => {
            let listener = fdpass::listen_stream(&socket, 1).unwrap();
            let mut connection = File::from(fdpass::accept(listener.as_fd()).unwrap());
            let mut answer = connection.try_clone().unwrap();
            copy_loop(&mut connection, &mut answer, size);
        }
        "pipe" => {
            let mut data = File::open(socket.with_extension("data")).unwrap();
            let mut done = File::options()
                .write(true)
                .open(socket.with_extension("done"))
                .unwrap();
            copy_loop(&mut data, &mut done, size);
        }
        other => panic!("unknown peer role {other}"),
    }
}

fn copy_loop(input: &mut File, answer: &mut File, size: usize) {
    let mut buffer = vec![0u8; size.clamp(1, 1 << 20)];
    loop {
        let mut left = size;
        while left > 0 {
            let want = left.min(buffer.len());
            match input.read(&mut buffer[..want]).unwrap() {
                0 => return,
                got => {
                    black_box(checksum(&buffer[..got]));
                    left -= got;
                }
            }
        }
        answer.write_all(&[1]).unwrap();
    }
}

/// Touches every byte, at memory speed: the reader's cost of consuming the
/// data, the same function on every path.
fn checksum(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words.remainder().iter().map(|&b| u64::from(b)).sum();
    words.fold(tail, |sum, word| {
        sum.wrapping_add(u64::from_le_bytes(word.try_into().unwrap_or_default()))
    })
}

// ---- the sending side: measurements ---------------------------------------

struct Peer {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Peer {
    fn start(role: &str, size: usize) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bench.sock");
        if role == "pipe" {
            for end in ["data", "done"] {
                nix::unistd::mkfifo(
                    &socket.with_extension(end),
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                )
                .unwrap();
            }
        }
        let child = Command::new(std::env::current_exe().unwrap())
            .env(PEER_ROLE, role)
            .env(PEER_SOCKET, &socket)
            .env(PEER_SIZE, size.to_string())
            .spawn()
            .unwrap();
        let peer = Peer {
            child,
            _dir: dir,
            socket,
        };
        if role != "pipe" {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !peer.socket.exists() {
                assert!(
                    Instant::now() < deadline,
                    "bench peer {role} never listened"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        peer
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mean time per iteration of `step`, after a warm-up.
fn per_op(iterations: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..iterations.div_ceil(10) {
        step();
    }
    let started = Instant::now();
    for _ in 0..iterations {
        step();
    }
    started.elapsed().as_secs_f64() * 1e6 / iterations as f64
}

fn floor(fds: usize, iterations: usize) -> f64 {
    let peer = Peer::start("floor", 0);
    let connection = fdpass::connect(&peer.socket).unwrap();
    let memfd = SealedSegment::filled("floor", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
    let fd_list = vec![memfd.fd(); fds];
    let mut buffer = [0u8; 64];
    let mut control = ControlBuffer::new();
    per_op(iterations, || {
        fdpass::send(connection.as_fd(), &[7; 64], &fd_list).unwrap();
        fdpass::receive(connection.as_fd(), &mut buffer, &mut control).unwrap();
    })
}

/// A pre-sealed segment handed over `iterations` times; with a reading
/// `role`, the receiver reads every byte (filling stays outside the timing, as it does
/// for the copy baselines' pre-filled source).
fn handoff(size: usize, iterations: usize, role: &str) -> f64 {
    let peer = Peer::start(role, size);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    let segment =
        SealedSegment::filled("handoff", b'x', size as u64, Seals::SENDER_DEFAULT).unwrap();
    per_op(iterations, || {
        assert!(
            sender
                .send(std::slice::from_ref(&segment))
                .unwrap()
                .is_accepted()
        )
    })
}

fn end_to_end(size: usize, iterations: usize) -> f64 {
    let peer = Peer::start("sealpass-read", size);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    per_op(iterations, || {
        let segment =
            SealedSegment::filled("e2e", b'x', size as u64, Seals::SENDER_DEFAULT).unwrap();
        assert!(sender.send(&[segment]).unwrap().is_accepted());
    })
}

fn stream_copy(size: usize, iterations: usize, source: &[u8]) -> f64 {
    let peer = Peer::start("stream", size);
    let mut connection = File::from(fdpass::connect_stream(&peer.socket).unwrap());
    let mut ack = [0u8; 1];
    per_op(iterations, || {
        connection.write_all(source).unwrap();
        connection.read_exact(&mut ack).unwrap();
    })
}

fn pipe_copy(size: usize, iterations: usize, source: &[u8]) -> f64 {
    let peer = Peer::start("pipe", size);
    let mut data = File::options()
        .write(true)
        .open(peer.socket.with_extension("data"))
        .unwrap();
    let mut done = File::open(peer.socket.with_extension("done")).unwrap();
    let mut ack = [0u8; 1];
    per_op(iterations, || {
        data.write_all(source).unwrap();
        done.read_exact(&mut ack).unwrap();
    })
}

fn memcpy(iterations: usize, source: &[u8]) -> f64 {
    let mut target = vec![0u8; source.len()];
    per_op(iterations, || {
        target.copy_from_slice(black_box(source));
        black_box(&mut target);
    })
}

// ---- runs, statistics, report ---------------------------------------------

// The measurements made at each size, in table order.
const HANDOFF: usize = 0;
const READ: usize = 1;
const READ_POPULATE: usize = 2;
const END_TO_END: usize = 3;
const STREAM: usize = 4;
const PIPE: usize = 5;
const MEMCPY: usize = 6;
const COLUMNS: usize = 7;

#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut samples: Vec<f64>) -> Stat {
    samples.sort_by(f64::total_cmp);
    Stat {
        median: samples[samples.len() / 2],
        min: samples[0],
        max: samples[samples.len() - 1],
    }
}

fn iterations_for(size: usize, quick: bool) -> usize {
    let budget: usize = if quick { 64 << 20 } else { 512 << 20 };
    (budget / size.max(1)).clamp(3, if quick { 300 } else { 2000 })
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 30 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

fn main() {
    if let Ok(role) = std::env::var(PEER_ROLE) {
        return peer(&role);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 3 } else { 5 };
    let sizes: &[usize] = if quick {
        &[4 << 10, 1 << 20, 64 << 20]
    } else {
        &[4 << 10, 1 << 20, 64 << 20, 1 << 30]
    };
    let round_trips = if quick { 500 } else { 3000 };

    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut by_size: Vec<(usize, [f64; COLUMNS])> = Vec::new();
    let mut table: Vec<(String, String, Stat, Option<Stat>)> = Vec::new();

    let (mut floor1, mut floor0) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        floor1.push(floor(1, round_trips));
        floor0.push(floor(0, round_trips));
    }
    let floor1 = stat(floor1);
    table.push((
        "floor: sendmsg/recvmsg round trip, 1 fd".into(),
        "-".into(),
        floor1,
        None,
    ));
    table.push((
        "floor: round trip, 0 fds".into(),
        "-".into(),
        stat(floor0),
        None,
    ));

    for &size in sizes {
        let iterations = iterations_for(size, quick);
        let round_trip_iterations = if size >= 1 << 30 { 200 } else { round_trips };
        let source = vec![b'x'; size];
        let mut samples: [Vec<f64>; COLUMNS] = Default::default();
        let mut handoff_ratio = Vec::new();
        for _ in 0..runs {
            let floor_now = floor(1, round_trips);
            let handoff_now = handoff(size, round_trip_iterations, "sealpass");
            handoff_ratio.push(handoff_now / floor_now);
            samples[HANDOFF].push(handoff_now);
            samples[READ].push(handoff(size, iterations, "sealpass-read"));
            samples[READ_POPULATE].push(handoff(size, iterations, "sealpass-read-populate"));
            samples[END_TO_END].push(end_to_end(size, iterations));
            samples[STREAM].push(stream_copy(size, iterations, &source));
            samples[PIPE].push(pipe_copy(size, iterations, &source));
            samples[MEMCPY].push(memcpy(iterations, &source));
        }
        let names = [
            "sealpass handoff (sealed segment, all checks, map, Ack)",
            "sealpass handoff, reader reads all",
            "sealpass handoff, reader reads all, MAP_POPULATE",
            "sealpass end to end (create+fill+seal+send+verify+map+read)",
            "copy through a unix stream socket, reader reads all",
            "copy through a pipe, reader reads all",
            "memcpy, one core",
        ];
        let mut medians = [0.0; COLUMNS];
        for (index, name) in names.iter().enumerate() {
            let measured = stat(std::mem::take(&mut samples[index]));
            medians[index] = measured.median;
            let ratio = (index == HANDOFF).then(|| stat(handoff_ratio.clone()));
            rows.push(serde_json::json!({
                "method": name,
                "bytes": size,
                "us_per_op": { "median": measured.median, "min": measured.min, "max": measured.max },
                "ratio_to_floor_same_run": ratio.map(|r| serde_json::json!({ "median": r.median, "min": r.min, "max": r.max })),
            }));
            table.push((name.to_string(), human(size), measured, ratio));
        }
        by_size.push((size, medians));
    }

    println!(
        "{:<62} {:>8} {:>12} {:>22} {:>10}",
        "method", "size", "median us", "spread us", "x floor"
    );
    for (name, size, measured, ratio) in &table {
        println!(
            "{name:<62} {size:>8} {:>12.1} {:>22} {:>10}",
            measured.median,
            format!("{:.1}..{:.1}", measured.min, measured.max),
            ratio.map_or("".into(), |r| format!("{:.2}", r.median))
        );
    }
    // Ratios of medians measured in the same run.
    let mut summary = serde_json::Map::new();
    if let (Some((small, first)), Some((large, last))) = (by_size.first(), by_size.last()) {
        let lines = [
            (
                format!("handoff {} / handoff {}", human(*large), human(*small)),
                last[HANDOFF] / first[HANDOFF],
            ),
            (
                format!("stream copy / handoff at {}", human(*large)),
                last[STREAM] / last[HANDOFF],
            ),
            (
                format!(
                    "(stream copy + read) / (handoff + read) at {}",
                    human(*large)
                ),
                last[STREAM] / last[READ],
            ),
            (
                format!(
                    "(stream copy + read) / (handoff + MAP_POPULATE + read) at {}",
                    human(*large)
                ),
                last[STREAM] / last[READ_POPULATE],
            ),
        ];
        println!();
        for (what, ratio) in lines {
            println!("{what}: {ratio:.2}");
            summary.insert(what, serde_json::json!(ratio));
        }
    }
    let out = PathBuf::from(
        std::env::var_os("SEALPASS_BENCH_OUT").unwrap_or_else(|| "target/bench".into()),
    );
    std::fs::create_dir_all(&out).unwrap();
    let document = serde_json::json!({
        "runs": runs,
        "quick": quick,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "floor_round_trip_1fd_us": { "median": floor1.median, "min": floor1.min, "max": floor1.max },
        "results": rows,
        "summary": summary,
    });
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&document).unwrap()).unwrap();
    println!("wrote {}", Path::new(&path).display());
}
