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
        // The real receiver: every kernel check, mapping, Ack, serving what
        // is queued in batches (`serve_batch`). With "read", the handler
        // also reads every byte; "sealpass-one" serves one message at a time
        // (`serve_one`), for comparison.
        "sealpass" | "sealpass-one" | "sealpass-read" | "sealpass-read-populate" => {
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
            let handler = |transfer: &sealpass_receiver::IncomingTransfer| {
                if read {
                    for segment in transfer.segments() {
                        black_box(checksum(segment.bytes()));
                    }
                }
                Ok::<(), String>(())
            };
            let accepted = |outcome: &sealpass_receiver::Outcome| {
                matches!(outcome, sealpass_receiver::Outcome::Accepted { .. })
            };
            let mut messages = 0u64;
            let mut outcomes = Vec::new();
            let before = allocations();
            while connection.is_open() {
                if role == "sealpass-one" {
                    messages += u64::from(accepted(&connection.serve_one(handler).unwrap()));
                } else {
                    outcomes.clear();
                    connection.serve_batch(handler, &mut outcomes).unwrap();
                    messages += outcomes.iter().filter(|o| accepted(o)).count() as u64;
                }
            }
            let allocated = allocations() - before;
            println!("messages={messages}");
            println!("allocations={allocated}");
        }
        // One message, then the memory figures: peak RSS (VmHWM), and the
        // resident anonymous and shared-memory pages while the handler holds
        // the mapping.
        "memory" | "memory-read" => {
            let mut listener = Listener::bind(&socket).unwrap();
            listener.set_config(Config::builder().timeouts(None).build().unwrap());
            let mut connection = listener.accept().unwrap();
            println!("idle_hwm_kib={}", status_kib("VmHWM"));
            connection
                .serve_one(|transfer| {
                    if role == "memory-read" {
                        for segment in transfer.segments() {
                            black_box(checksum(segment.bytes()));
                        }
                    }
                    println!("held_anon_kib={}", status_kib("RssAnon"));
                    println!("held_shmem_kib={}", status_kib("RssShmem"));
                    Ok::<(), String>(())
                })
                .unwrap();
            println!("peak_hwm_kib={}", status_kib("VmHWM"));
        }
        // The async receiver: the same session and checks, served in
        // batches as the blocking one is, on a tokio current_thread runtime.
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
                let mut outcomes = Vec::new();
                while connection.is_open() {
                    outcomes.clear();
                    connection
                        .serve_batch(|_transfer| Ok::<(), String>(()), &mut outcomes)
                        .await
                        .unwrap();
                    messages += outcomes
                        .iter()
                        .filter(|o| matches!(o, sealpass_receiver::Outcome::Accepted { .. }))
                        .count() as u64;
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
