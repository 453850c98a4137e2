//! The sending side: each function starts a fresh peer, measures one thing
//! and returns it. Times are means per operation in µs.

use std::collections::HashMap;
use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_proto::Seals;
use sealpass_sender::{Pages, SealedSegment, Sender};

use crate::{allocations, peer};

pub(crate) struct Peer {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    pub(crate) socket: PathBuf,
}

impl Peer {
    /// Starts `role` with `parameter`, on `cpu` if given, and waits until it
    /// listens.
    pub(crate) fn start(role: &str, parameter: usize, cpu: Option<usize>) -> Peer {
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
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .env(peer::ROLE, role)
            .env(peer::SOCKET, &socket)
            .env(peer::PARAMETER, parameter.to_string())
            .stdout(Stdio::piped());
        if let Some(cpu) = cpu {
            command.env(peer::CPU, cpu.to_string());
        }
        let peer = Peer {
            child: Some(command.spawn().unwrap()),
            _dir: dir,
            socket,
        };
        if role != "pipe" {
            let deadline = Instant::now() + Duration::from_secs(10);
            // Listening, not just bound: between bind and listen a connect
            // is refused.
            while !listening(&peer.socket) {
                assert!(
                    Instant::now() < deadline,
                    "bench peer {role} never listened"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        peer
    }

    /// Waits for the peer to end (the caller closed its connection first)
    /// and returns the `key=value` lines it printed.
    pub(crate) fn finish(mut self) -> HashMap<String, f64> {
        let child = self.child.take().unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "bench peer failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (key, value) = line.split_once('=')?;
                Some((key.to_owned(), value.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Mean time per iteration of `step` in µs, after a warm-up.
pub(crate) fn per_op(iterations: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..iterations.div_ceil(10) {
        step();
    }
    let started = Instant::now();
    for _ in 0..iterations {
        step();
    }
    started.elapsed().as_secs_f64() * 1e6 / iterations as f64
}

/// Bare `sendmsg`/`recvmsg` round trip carrying `fds` fds and 64 bytes.
pub(crate) fn floor(fds: usize, iterations: usize, cpu: Option<usize>) -> f64 {
    let peer = Peer::start("floor", 0, cpu);
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

/// Bare one-way messages per second, each with one fd and 64 bytes, the
/// sender never waiting for more than the socket's own flow control.
pub(crate) fn floor_one_way_rate(messages: usize) -> f64 {
    let peer = Peer::start("floor-sink", messages, None);
    let connection = fdpass::connect(&peer.socket).unwrap();
    let memfd = SealedSegment::filled("floor", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
    let mut buffer = [0u8; 64];
    let mut control = ControlBuffer::new();
    let mut batch = || {
        for _ in 0..messages {
            fdpass::send(connection.as_fd(), &[7; 64], &[memfd.fd()]).unwrap();
        }
        fdpass::receive(connection.as_fd(), &mut buffer, &mut control).unwrap();
    };
    batch(); // warm-up
    let started = Instant::now();
    batch();
    messages as f64 / started.elapsed().as_secs_f64()
}

/// What one handoff measurement saw.
pub(crate) struct Handoff {
    pub micros: f64,
    /// Heap allocations per message in the sending process.
    pub sender_allocations: f64,
    /// Heap allocations per message in the receiving process.
    pub receiver_allocations: f64,
}

/// A pre-sealed segment handed over `iterations` times; with a reading
/// `role`, the receiver reads every byte (filling stays outside the timing,
/// as it does for the copy baselines' pre-filled source).
pub(crate) fn handoff(size: usize, iterations: usize, role: &str, cpu: Option<usize>) -> Handoff {
    let peer = Peer::start(role, 0, cpu);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    let segment =
        SealedSegment::filled("handoff", b'x', size as u64, Seals::SENDER_DEFAULT).unwrap();
    let before = allocations();
    let micros = per_op(iterations, || {
        assert!(
            sender
                .send(std::slice::from_ref(&segment))
                .unwrap()
                .is_accepted()
        )
    });
    let sent = (iterations + iterations.div_ceil(10)) as f64;
    let sender_allocations = (allocations() - before) as f64 / sent;
    drop(sender);
    let report = peer.finish();
    Handoff {
        micros,
        sender_allocations,
        receiver_allocations: report["allocations"] / report["messages"],
    }
}

/// What a user pays to move `size` fresh bytes: make a memfd, fill it,
/// seal it, hand it over; the receiver verifies, maps, reads every byte and
/// answers. The sender closes its fd as soon as the transfer is sent, as a
/// producer that is done with the buffer would, so the pages are freed by
/// whichever side lets go last. With `cpu`, the receiver runs there (the
/// caller pins itself elsewhere). The memfds' pages come from `pages`; a
/// segment that fell back from the hugetlb pool to shmem stops the run, so
/// a figure never mixes the two.
pub(crate) fn end_to_end(size: usize, iterations: usize, cpu: Option<usize>, pages: Pages) -> f64 {
    let peer = Peer::start("sealpass-read", 0, cpu);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    per_op(iterations, || {
        let segment = SealedSegment::builder("e2e")
            .pages(pages)
            .filled(b'x', size as u64)
            .unwrap();
        assert!(
            pages != Pages::HugeTlb || segment.pages() == Pages::HugeTlb,
            "a {size}-byte segment got no hugetlb pages: the pool (vm.nr_hugepages) is too small"
        );
        sender.submit(&[segment]).unwrap();
        assert!(sender.next_verdict().unwrap().is_accepted());
    })
}

/// The fresh-page floor of a memfd handoff, no protocol: a plain memfd made,
/// filled with `pwrite` (as `SealedSegment::filled` fills), sealed and sent
/// per round; the reader (on `cpu`)
/// maps it, reads every byte, unmaps and closes it, and answers a byte.
pub(crate) fn fresh_page_floor(size: usize, iterations: usize, cpu: Option<usize>) -> f64 {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let peer = Peer::start("fresh-floor", 0, cpu);
    let connection = fdpass::connect(&peer.socket).unwrap();
    // Written as `SealedSegment::filled` writes: the same 1 MiB (at most)
    // again and again, so neither side pays for reading a big source.
    let chunk = vec![b'x'; size.min(1 << 20)];
    let mut answer = [0u8; 64];
    let mut control = ControlBuffer::new();
    per_op(iterations, || {
        let fd =
            memfd_create("floor", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let file = File::from(fd);
        let mut offset = 0;
        while offset < size {
            let length = chunk.len().min(size - offset);
            std::os::unix::fs::FileExt::write_all_at(&file, &chunk[..length], offset as u64)
                .unwrap();
            offset += length;
        }
        let fd = OwnedFd::from(file);
        let seals = SealFlag::F_SEAL_SEAL
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
        fdpass::send(connection.as_fd(), &[0], &[fd.as_fd()]).unwrap();
        drop(fd);
        fdpass::receive(connection.as_fd(), &mut answer, &mut control).unwrap();
    })
}

pub(crate) fn stream_copy(iterations: usize, source: &[u8]) -> f64 {
    stream_copy_on(iterations, source, None)
}

/// [`stream_copy`], with the reader on `cpu`.
pub(crate) fn stream_copy_on(iterations: usize, source: &[u8], cpu: Option<usize>) -> f64 {
    let peer = Peer::start("stream", source.len(), cpu);
    let mut connection = File::from(fdpass::connect_stream(&peer.socket).unwrap());
    let mut ack = [0u8; 1];
    per_op(iterations, || {
        connection.write_all(source).unwrap();
        connection.read_exact(&mut ack).unwrap();
    })
}

pub(crate) fn pipe_copy(iterations: usize, source: &[u8]) -> f64 {
    let peer = Peer::start("pipe", source.len(), None);
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

pub(crate) fn memcpy(iterations: usize, source: &[u8]) -> f64 {
    let mut target = vec![0u8; source.len()];
    per_op(iterations, || {
        target.copy_from_slice(black_box(source));
        black_box(&mut target);
    })
}

/// The receiver's memory when handed one segment of `size` bytes, read or
/// not: peak RSS before and after, and the resident anonymous and shared
/// pages while the mapping is held. KiB.
pub(crate) fn receiver_memory(size: usize, read: bool) -> HashMap<String, f64> {
    let peer = Peer::start(if read { "memory-read" } else { "memory" }, 0, None);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    let segment =
        SealedSegment::filled("memory", b'x', size as u64, Seals::SENDER_DEFAULT).unwrap();
    assert!(sender.send(&[segment]).unwrap().is_accepted());
    drop(sender);
    peer.finish()
}

/// Messages per second through one connection, each carrying `segments`
/// pre-sealed 4 KiB segments, with up to `window` transfers in flight.
pub(crate) fn pipelined_rate(segments: usize, messages: usize, window: usize) -> f64 {
    pipelined_rate_against("sealpass-service", segments, messages, window)
}

/// [`pipelined_rate`] against the receiver `role` of the peer process.
pub(crate) fn pipelined_rate_against(
    role: &str,
    segments: usize,
    messages: usize,
    window: usize,
) -> f64 {
    let peer = Peer::start(role, 0, None);
    let mut sender = Sender::connect(&peer.socket).unwrap();
    let list: Vec<SealedSegment> = (0..segments)
        .map(|index| {
            SealedSegment::filled(&format!("s{index}"), b'x', 4096, Seals::SENDER_DEFAULT).unwrap()
        })
        .collect();
    let mut run = |count: usize| {
        for _ in 0..count {
            sender.submit(&list).unwrap();
            if sender.in_flight() >= window {
                assert!(sender.next_verdict().unwrap().is_accepted());
            }
        }
        while sender.in_flight() > 0 {
            assert!(sender.next_verdict().unwrap().is_accepted());
        }
    };
    run(messages.div_ceil(10)); // warm-up
    let started = Instant::now();
    run(messages);
    messages as f64 / started.elapsed().as_secs_f64()
}

/// The 4 KiB round trip with tokio at both ends (async sender, async
/// receiver), in µs.
pub(crate) fn async_round_trip(iterations: usize) -> f64 {
    let peer = Peer::start("sealpass-async", 0, None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let segment = SealedSegment::filled("handoff", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
    let micros = runtime.block_on(async {
        let mut sender = sealpass_sender::tokio::Sender::connect(&peer.socket)
            .await
            .unwrap();
        let mut run = async |count: usize| {
            for _ in 0..count {
                let verdict = sender.send(std::slice::from_ref(&segment)).await.unwrap();
                assert!(verdict.is_accepted());
            }
        };
        run(iterations.div_ceil(10)).await; // warm-up
        let started = Instant::now();
        run(iterations).await;
        started.elapsed().as_secs_f64() * 1e6 / iterations as f64
    });
    drop(runtime);
    peer.finish();
    micros
}

/// Messages per second, one 4 KiB segment each, `window` in flight, tokio at
/// both ends.
pub(crate) fn async_pipelined_rate(messages: usize, window: usize) -> f64 {
    let peer = Peer::start("sealpass-async", 0, None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let segment = SealedSegment::filled("s", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
    let rate = runtime.block_on(async {
        let mut sender = sealpass_sender::tokio::Sender::connect(&peer.socket)
            .await
            .unwrap();
        let mut run = async |count: usize| {
            for _ in 0..count {
                sender.submit(std::slice::from_ref(&segment)).await.unwrap();
                if sender.in_flight() >= window {
                    assert!(sender.next_verdict().await.unwrap().is_accepted());
                }
            }
            while sender.in_flight() > 0 {
                assert!(sender.next_verdict().await.unwrap().is_accepted());
            }
        };
        run(messages.div_ceil(10)).await;
        let started = Instant::now();
        run(messages).await;
        messages as f64 / started.elapsed().as_secs_f64()
    });
    drop(runtime);
    peer.finish();
    rate
}

/// How a fresh memfd gets its bytes, for the fill rows.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fill {
    /// Through a writable shared mapping: a page fault (and a zeroed page)
    /// per 4 KiB, then the copy.
    Mapping,
    /// The same with `MAP_POPULATE`: every page faulted in by the `mmap`.
    MappingPopulated,
    /// `pwrite` from a buffer: the kernel allocates pages as it copies.
    Pwrite,
    /// Through a writable mapping with `MADV_HUGEPAGE`: where shmem huge
    /// pages are `advise`, a fault and a zeroed page per 2 MiB.
    MappingHuge,
}

impl Fill {
    pub(crate) const ALL: [Fill; 4] = [
        Fill::Mapping,
        Fill::MappingPopulated,
        Fill::Pwrite,
        Fill::MappingHuge,
    ];

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Fill::Mapping => "fill a fresh memfd through a writable mapping",
            Fill::MappingPopulated => "fill a fresh memfd through a MAP_POPULATE mapping",
            Fill::Pwrite => "fill a fresh memfd with pwrite",
            Fill::MappingHuge => "fill a fresh memfd through a MADV_HUGEPAGE mapping",
        }
    }
}

/// How a fresh memfd gets a file's bytes, for the file rows.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FileFill {
    /// `std::io::copy` from the file: `copy_file_range`, or `sendfile`
    /// across file systems.
    Copy,
    /// `read` into a writable mapping with `MADV_HUGEPAGE`.
    IntoHugeMapping,
}

impl FileFill {
    pub(crate) const ALL: [FileFill; 2] = [FileFill::Copy, FileFill::IntoHugeMapping];

    pub(crate) fn describe(self) -> &'static str {
        match self {
            FileFill::Copy => "copy a cached file into a fresh memfd (copy_file_range)",
            FileFill::IntoHugeMapping => "read a cached file into a MADV_HUGEPAGE mapping",
        }
    }
}

/// A fresh memfd of `size` bytes mapped for writing, asking for huge pages
/// with `huge`.
fn fresh_mapping(size: usize, populate: bool, huge: bool) -> (OwnedFd, memmap2::MmapMut) {
    let fd = fresh_memfd();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    let mut options = memmap2::MmapOptions::new();
    options.len(size);
    if populate {
        options.populate();
    }
    // SAFETY: the memfd was just created here and nothing else maps or
    // truncates it while this mapping lives.
    let mapping = unsafe { options.map_mut(&fd) }.unwrap();
    if huge {
        mapping.advise(memmap2::Advice::HugePage).unwrap();
    }
    (fd, mapping)
}

fn fresh_memfd() -> OwnedFd {
    nix::sys::memfd::memfd_create(
        "fill",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap()
}

/// µs to create a memfd and put the bytes of the file at `path` (in the
/// page cache already) in it by `method`, closing it after.
pub(crate) fn fill_from_file(path: &std::path::Path, method: FileFill, iterations: usize) -> f64 {
    let size = std::fs::metadata(path).unwrap().len() as usize;
    per_op(iterations, || {
        let mut source = File::open(path).unwrap();
        match method {
            FileFill::Copy => {
                let mut memfd = File::from(fresh_memfd());
                std::io::copy(&mut source, &mut memfd).unwrap();
            }
            FileFill::IntoHugeMapping => {
                let (_fd, mut mapping) = fresh_mapping(size, false, true);
                source.read_exact(&mut mapping).unwrap();
            }
        }
    })
}

/// µs to create a memfd and put `source` in it by `method`, closing it
/// after: what a producer pays before sealing.
pub(crate) fn fill(source: &[u8], method: Fill, iterations: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let size = source.len();
    per_op(iterations, || match method {
        Fill::Pwrite => File::from(fresh_memfd()).write_all_at(source, 0).unwrap(),
        Fill::Mapping | Fill::MappingPopulated | Fill::MappingHuge => {
            let populate = matches!(method, Fill::MappingPopulated);
            let huge = matches!(method, Fill::MappingHuge);
            let (_fd, mut mapping) = fresh_mapping(size, populate, huge);
            mapping.copy_from_slice(source);
        }
    })
}

/// Whether a unix socket listens at `path`: `/proc/net/unix` lists it with
/// `__SO_ACCEPTCON` (0x10000) in its flags.
fn listening(path: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// How long, at worst, in ms, a current-thread runtime could not run a
/// 1 ms ticker beyond its period (the worst gap between ticks, less 1 ms)
/// while a transfer of `segments` segments of `size` bytes (filled
/// beforehand by a thread of this process) is received on it, has every
/// page read on the blocking pool, and is accepted on it. With `baseline`,
/// the same memfds are mapped, read and unmapped on the blocking pool with
/// no sealpass call on the runtime: the stalls the machine itself causes
/// under that load, measured in the same run.
pub(crate) fn async_worst_stall(segments: usize, size: u64, baseline: bool) -> f64 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stall.sock");
    let worst = runtime.block_on(async move {
        let listener = sealpass_receiver::tokio::Listener::bind(&socket).unwrap();
        // The segments are filled before the ticker starts: the fill is the
        // sender's work, on a CPU of its own, not the receiver's.
        let (filled, is_filled) = std::sync::mpsc::channel();
        let sender = std::thread::spawn(move || {
            let segments: Vec<_> = (0..segments)
                .map(|index| {
                    SealedSegment::filled(&format!("s{index}"), b'x', size, Seals::SENDER_DEFAULT)
                        .unwrap()
                })
                .collect();
            if baseline {
                filled.send(Some(segments)).unwrap();
                return true;
            }
            filled.send(None).unwrap();
            Sender::connect(&socket)
                .unwrap()
                .send(&segments)
                .unwrap()
                .is_accepted()
        });
        let plain = tokio::task::spawn_blocking(move || is_filled.recv().unwrap())
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = tokio::spawn({
            let stop = Arc::clone(&stop);
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
        let touch = |bytes: &[u8]| {
            black_box(
                bytes
                    .iter()
                    .step_by(4096)
                    .map(|&b| u64::from(b))
                    .sum::<u64>(),
            );
        };
        if let Some(plain) = plain {
            let mappings = tokio::task::spawn_blocking(move || {
                let mappings: Vec<_> = plain
                    .iter()
                    // SAFETY: the memfds are sealed against shrinking and
                    // writing, and stay open while mapped.
                    .map(|segment| unsafe { memmap2::Mmap::map(&segment.fd()) }.unwrap())
                    .collect();
                mappings.iter().for_each(|mapping| touch(mapping));
                (mappings, plain)
            })
            .await
            .unwrap();
            tokio::task::spawn_blocking(move || drop(mappings));
        } else {
            let mut connection = listener.accept().await.unwrap();
            let transfer = connection.receive().await.unwrap().unwrap();
            let transfer = tokio::task::spawn_blocking(move || {
                transfer
                    .segments()
                    .iter()
                    .for_each(|segment| touch(segment.bytes()));
                transfer
            })
            .await
            .unwrap();
            transfer.accept().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::Relaxed);
        let worst = ticker.await.unwrap();
        let delivered = tokio::task::spawn_blocking(move || sender.join().unwrap())
            .await
            .unwrap();
        assert!(delivered);
        worst
    });
    (worst.as_secs_f64() * 1e3 - 1.0).max(0.0)
}
