//! The receiving peer: this same binary, re-run with `SEALPASS_BENCH_PEER`
//! naming its role. It reports what only it can see (its allocations, its
//! memory) as `key=value` lines on stdout when its connection ends.

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_receiver::{Config, Listener};

use crate::{allocations, checksum, pin_to_cpu};

pub(crate) const ROLE: &str = "SEALPASS_BENCH_PEER";
pub(crate) const SOCKET: &str = "SEALPASS_BENCH_SOCKET";
/// Bytes per message for the copy roles; messages per batch for the sink.
pub(crate) const PARAMETER: &str = "SEALPASS_BENCH_PARAMETER";
/// Pin the peer to this CPU (the one-CPU regime).
pub(crate) const CPU: &str = "SEALPASS_BENCH_CPU";

pub(crate) fn run(role: &str) {
    let socket = PathBuf::from(std::env::var_os(SOCKET).unwrap());
    let parameter: usize = std::env::var(PARAMETER).unwrap().parse().unwrap();
    if let Some(cpu) = std::env::var(CPU).ok().and_then(|cpu| cpu.parse().ok()) {
        pin_to_cpu(Some(cpu));
    }
    match role {
        // Bare recvmsg/sendmsg echo: no header, no checks, no mapping.
        "floor" => bare_peer(&socket, 1, &[0; 64]),
        // Bare one-way sink: receive (and close) every fd, answer one byte
        // per batch of `parameter` messages so the sender can time a batch.
        "floor-sink" => bare_peer(&socket, parameter, &[1]),
        // The fresh-page floor's reader: takes each memfd, maps it, reads
        // every byte, answers one byte, then unmaps and closes it. No
        // header, no checks: what any memfd handoff of fresh pages pays.
        "fresh-floor" => fresh_floor_peer(&socket),
        // The real receiver: every kernel check, mapping, Ack, one owned
        // transfer per `receive()` (reading what is queued with one
        // `recvmmsg`). With "read", it also reads every byte.
        "sealpass" | "sealpass-read" | "sealpass-read-populate" => {
            let mut listener = Listener::bind(&socket).unwrap();
            listener.set_config(
                Config::builder()
                    .timeouts(None)
                    .populate(role == "sealpass-read-populate")
                    .build()
                    .unwrap(),
            );
            let mut connection = listener.accept().unwrap();
            let read = role.starts_with("sealpass-read");
            let mut messages = 0u64;
            let before = allocations();
            while let Some(transfer) = connection.receive().unwrap() {
                if read {
                    for segment in transfer.segments() {
                        black_box(checksum(segment.bytes()));
                    }
                }
                transfer.accept().unwrap();
                messages += 1;
            }
            let allocated = allocations() - before;
            println!("messages={messages}");
            println!("allocations={allocated}");
        }
        // The same checks served by a `Service`: the messages read together
        // are answered together, in one `sendmmsg`. Serves one connection.
        "sealpass-service" => {
            let mut listener = Listener::bind(&socket).unwrap();
            listener.set_config(Config::builder().timeouts(None).build().unwrap());
            let service = sealpass_receiver::Service::new(listener).unwrap();
            let (stats, stop) = (service.stats(), service.shutdown_handle());
            let serving = std::thread::spawn(move || {
                service.run(|_transfer| Ok::<(), String>(())).unwrap();
            });
            let count = |stats: &sealpass_receiver::ServiceStats| {
                stats
                    .active_connections
                    .load(std::sync::atomic::Ordering::Relaxed)
            };
            while count(&stats) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            while count(&stats) > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            stop.shutdown();
            serving.join().unwrap();
            let accepted = stats.accepted.load(std::sync::atomic::Ordering::Relaxed);
            println!("messages={accepted}");
        }
        // One message, then the memory figures: peak RSS (VmHWM), and the
        // resident anonymous and shared-memory pages while the application
        // holds the mapping.
        "memory" | "memory-read" => {
            let mut listener = Listener::bind(&socket).unwrap();
            listener.set_config(Config::builder().timeouts(None).build().unwrap());
            let mut connection = listener.accept().unwrap();
            println!("idle_hwm_kib={}", status_kib("VmHWM"));
            if let Some(transfer) = connection.receive().unwrap() {
                if role == "memory-read" {
                    for segment in transfer.segments() {
                        black_box(checksum(segment.bytes()));
                    }
                }
                println!("held_anon_kib={}", status_kib("RssAnon"));
                println!("held_shmem_kib={}", status_kib("RssShmem"));
                transfer.accept().unwrap();
            }
            println!("peak_hwm_kib={}", status_kib("VmHWM"));
        }
        // The async receiver: the same session and checks, one owned
        // transfer per `receive().await`, on a tokio current_thread runtime.
        "sealpass-async" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut listener = sealpass_receiver::tokio::Listener::bind(&socket).unwrap();
                listener.set_config(Config::builder().timeouts(None).build().unwrap());
                let mut connection = listener.accept().await.unwrap();
                let mut messages = 0u64;
                while let Some(transfer) = connection.receive().await.unwrap() {
                    transfer.accept().unwrap();
                    messages += 1;
                }
                println!("messages={messages}");
            });
        }
        // Copy baselines: read every byte of `parameter`, answer one byte.
        "stream" => {
            let listener = fdpass::listen_stream(&socket, 1).unwrap();
            let mut connection = File::from(fdpass::accept(listener.as_fd()).unwrap());
            let mut answer = connection.try_clone().unwrap();
            copy_loop(&mut connection, &mut answer, parameter);
        }
        "pipe" => {
            let mut data = File::open(socket.with_extension("data")).unwrap();
            let mut done = File::options()
                .write(true)
                .open(socket.with_extension("done"))
                .unwrap();
            copy_loop(&mut data, &mut done, parameter);
        }
        other => panic!("unknown peer role {other}"),
    }
}

/// The floor's peer: accepts one `SOCK_SEQPACKET` connection, receives
/// messages (closing their fds) until the sender closes, and sends `answer`
/// after every `answer_every` of them.
fn bare_peer(socket: &Path, answer_every: usize, answer: &[u8]) {
    let listener = fdpass::listen(socket, 1).unwrap();
    let connection = fdpass::accept(listener.as_fd()).unwrap();
    let mut buffer = [0u8; 64];
    let mut control = ControlBuffer::new();
    for count in 1.. {
        let received = fdpass::receive(connection.as_fd(), &mut buffer, &mut control).unwrap();
        if received.is_end_of_stream() {
            return;
        }
        drop(received);
        if count % answer_every == 0 {
            fdpass::send(connection.as_fd(), answer, &[]).unwrap();
        }
    }
}

fn fresh_floor_peer(socket: &Path) {
    use std::os::fd::AsRawFd;
    let listener = fdpass::listen(socket, 1).unwrap();
    let connection = fdpass::accept(listener.as_fd()).unwrap();
    let mut buffer = [0u8; 64];
    let mut control = ControlBuffer::new();
    loop {
        let received = fdpass::receive(connection.as_fd(), &mut buffer, &mut control).unwrap();
        if received.is_end_of_stream() {
            return;
        }
        let mut mappings = Vec::new();
        for fd in &received.fds {
            let size = nix::sys::stat::fstat(fd).unwrap().st_size as usize;
            if size > 0 {
                // SAFETY: the sender sealed the memfd against writes and
                // shrinking before sending it.
                let mapping =
                    unsafe { memmap2::MmapOptions::new().len(size).map(fd.as_raw_fd()) }.unwrap();
                black_box(checksum(&mapping));
                mappings.push(mapping);
            }
        }
        // Answered once read, before the pages are unmapped and freed, as
        // sealpass answers: the floor is not slowed by work a receiver can
        // leave off the sender's path.
        fdpass::send(connection.as_fd(), &[1], &[]).unwrap();
        drop(mappings);
        drop(received);
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

/// A `kB` field of /proc/self/status.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}
