//! `cargo xtask bench [--quick]`: what a handoff costs, against the kernel's
//! floor and against copying, sender and receiver in separate processes.
//! The parent is the sender; it re-runs this binary as the receiving peer
//! (peer.rs). Every time is a per-operation mean over many iterations,
//! measured in several runs and reported as the median with the spread.
//! Ratios are taken pair by pair within the same run. Two regimes: unpinned
//! (the processes land on different CPUs) and both pinned to one CPU.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    unsafe_code
)]

mod measure;
mod meta;
mod peer;
mod report;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use report::{Regime, Report, Stat, Target, human};
use sealpass_sender::Pages;

/// Counts heap allocations, so the table can show how many a message costs.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `realloc`'s contract; `ptr` came from
        // `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Heap allocations so far in this process.
pub(crate) fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Touches every byte, at memory speed: the reader's cost of consuming the
/// data, the same function on every path.
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words.remainder().iter().map(|&b| u64::from(b)).sum();
    words.fold(tail, |sum, word| {
        sum.wrapping_add(u64::from_le_bytes(word.try_into().unwrap_or_default()))
    })
}

/// The CPUs this process may use at start.
static ALLOWED_CPUS: OnceLock<CpuSet> = OnceLock::new();

/// Pins this process to `cpu`, or with `None` gives it back the CPUs it
/// started with.
pub(crate) fn pin_to_cpu(cpu: Option<usize>) {
    let allowed = *ALLOWED_CPUS.get_or_init(|| sched_getaffinity(Pid::from_raw(0)).unwrap());
    let set = match cpu {
        Some(cpu) => {
            let mut set = CpuSet::new();
            set.set(cpu).unwrap();
            set
        }
        None => allowed,
    };
    sched_setaffinity(Pid::from_raw(0), &set).unwrap();
}

pub(crate) fn first_allowed_cpu() -> usize {
    let allowed = *ALLOWED_CPUS.get_or_init(|| sched_getaffinity(Pid::from_raw(0)).unwrap());
    (0..CpuSet::count())
        .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .unwrap()
}

/// Transfers in flight for the pipelined throughput.
const WINDOW: usize = 64;

const HANDOFF: &str = "sealpass handoff (sealed segment, all checks, map, Ack)";

fn iterations_for(size: usize, quick: bool) -> usize {
    let budget: usize = if quick { 64 << 20 } else { 512 << 20 };
    (budget / size.max(1)).clamp(3, if quick { 300 } else { 2000 })
}

fn main() {
    if let Ok(role) = std::env::var(peer::ROLE) {
        return peer::run(&role);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 3 } else { 5 };
    let sizes: &[usize] = if quick {
        &[4 << 10, 1 << 20, 64 << 20]
    } else {
        &[4 << 10, 1 << 20, 64 << 20, 1 << 30]
    };
    let round_trips = if quick { 500 } else { 3000 };
    let round_trips_for = |size: usize| if size >= 1 << 30 { 200 } else { round_trips };
    let mut report = Report::default();
    if std::env::args().any(|a| a == "--hot-path") {
        // Only what sealpass's own code costs: the one-CPU round trip against
        // its floor, and allocations per message. For before/after figures.
        hot_path(&mut report, if quick { 5 } else { 9 }, round_trips);
        report.print();
        return;
    }

    if std::env::args().any(|a| a == "--meta") {
        // Only protocol 1.1's metadata rows, against the ways before it.
        meta::meta_rows(&mut report, runs, round_trips);
        report.print();
        report.write_json("meta.json", runs, quick);
        return;
    }

    if std::env::args().any(|a| a == "--fill") {
        // Only the producer's fill paths, at each size.
        fill_rows(&mut report, runs, sizes, quick);
        report.print();
        return;
    }

    if std::env::args().any(|a| a == "--async") {
        // Only the async rows beside their blocking twins, for comparisons.
        async_rows(
            &mut report,
            runs,
            round_trips,
            if quick { 20_000 } else { 100_000 },
        );
        report.print();
        return;
    }

    if std::env::args().any(|a| a == "--e2e") {
        // Only end to end against a stream copy, sender and receiver pinned
        // to two CPUs: what a user pays to move fresh bytes.
        // With --hugetlb, segments from the hugetlb pool (xtask sizes the
        // pool), at the sizes it takes: whole huge pages.
        if std::env::args().any(|a| a == "--hugetlb") {
            let whole: Vec<usize> = sizes
                .iter()
                .copied()
                .filter(|&s| s as u64 % sealpass_kernel::host::HUGE_PAGE == 0)
                .collect();
            e2e_rows(&mut report, runs, &whole, quick, Pages::HugeTlb);
            report.print();
            report.write_json("e2e-hugetlb.json", runs, quick);
            return;
        }
        let huge = e2e_rows(&mut report, runs, sizes, quick, Pages::Shmem);
        report.print();
        report.write_json(if huge { "e2e-thp.json" } else { "e2e.json" }, runs, quick);
        return;
    }

    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--plot-peers") {
        // The plot of `cargo xtask bench --peers`, from its JSON.
        let (input, output) = (&args[at + 1], &args[at + 2]);
        plot_peers(Path::new(input), Path::new(output));
        return;
    }

    if std::env::args().any(|a| a == "--checks") {
        // What each system call of a 4 KiB handoff costs the receiver.
        check_rows(&mut report, runs, if quick { 20_000 } else { 100_000 });
        report.print();
        return;
    }

    if std::env::args().any(|a| a == "--pipelined") {
        // Only the pipelined 1-segment rate, for profiling the receiver.
        let messages = if quick { 50_000 } else { 200_000 };
        let rate = measure::pipelined_rate(1, messages, WINDOW);
        println!("sealpass pipelined, window {WINDOW}, 1 segment: {rate:.0} msg/s");
        let rate = measure::pipelined_rate_against("sealpass", 1, messages, WINDOW);
        println!("  the same, receiver taking owned transfers (receive()): {rate:.0} msg/s");
        return;
    }

    // ---- Two CPUs (unpinned) -----------------------------------------------
    let (mut floor1, mut floor0) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        floor1.push(measure::floor(1, round_trips, None));
        floor0.push(measure::floor(0, round_trips, None));
    }
    let floor_two_cpus = Stat::of(floor1);
    let floor_text = "floor: sendmsg/recvmsg round trip";
    report.row(
        Regime::TwoCpus,
        format!("{floor_text}, 1 fd"),
        None,
        "µs",
        floor_two_cpus,
        None,
    );
    report.row(
        Regime::TwoCpus,
        format!("{floor_text}, 0 fds"),
        None,
        "µs",
        Stat::of(floor0),
        None,
    );

    const READ: &str = "sealpass handoff, reader reads all";
    const READ_POPULATE: &str = "sealpass handoff, reader reads all, MAP_POPULATE";
    const END_TO_END: &str = "sealpass end to end (create+fill+seal+send+verify+map+read)";
    const STREAM: &str = "copy through a unix stream socket, reader reads all";
    const PIPE: &str = "copy through a pipe, reader reads all";
    const MEMCPY: &str = "memcpy, one core";
    // The methods measured at each size, in table order, and their columns.
    const METHODS: [&str; 7] = [
        HANDOFF,
        READ,
        READ_POPULATE,
        END_TO_END,
        STREAM,
        PIPE,
        MEMCPY,
    ];
    const AT_HANDOFF: usize = 0;
    const AT_READ: usize = 1;
    const AT_READ_POPULATE: usize = 2;
    const AT_END_TO_END: usize = 3;
    const AT_STREAM: usize = 4;
    const AT_PIPE: usize = 5;
    const AT_MEMCPY: usize = 6;
    let mut medians: Vec<(usize, [f64; 7])> = Vec::new();
    let (mut sender_allocations, mut receiver_allocations) = (Vec::new(), Vec::new());
    for &size in sizes {
        let iterations = iterations_for(size, quick);
        let source = vec![b'x'; size];
        let mut samples: [Vec<f64>; 7] = Default::default();
        let mut ratios = Vec::new();
        for _ in 0..runs {
            let floor_now = measure::floor(1, round_trips, None);
            let handoff = measure::handoff(size, round_trips_for(size), "sealpass", None);
            ratios.push(handoff.micros / floor_now);
            samples[AT_HANDOFF].push(handoff.micros);
            if size == sizes[0] {
                sender_allocations.push(handoff.sender_allocations);
                receiver_allocations.push(handoff.receiver_allocations);
            }
            samples[AT_READ].push(measure::handoff(size, iterations, "sealpass-read", None).micros);
            samples[AT_READ_POPULATE]
                .push(measure::handoff(size, iterations, "sealpass-read-populate", None).micros);
            samples[AT_END_TO_END].push(measure::end_to_end(size, iterations, None, Pages::Shmem));
            samples[AT_STREAM].push(measure::stream_copy(iterations, &source));
            samples[AT_PIPE].push(measure::pipe_copy(iterations, &source));
            samples[AT_MEMCPY].push(measure::memcpy(iterations, &source));
        }
        let mut row = [0.0; 7];
        for (index, method) in METHODS.into_iter().enumerate() {
            let value = Stat::of(std::mem::take(&mut samples[index]));
            row[index] = value.median;
            let ratio = (index == AT_HANDOFF).then(|| Stat::of(ratios.clone()));
            report.row(Regime::TwoCpus, method, Some(size), "µs", value, ratio);
        }
        medians.push((size, row));
    }

    // ---- One CPU: both ends pinned to the same CPU -------------------------
    let cpu = first_allowed_cpu();
    pin_to_cpu(Some(cpu));
    let mut floor_one_cpu = Vec::new();
    let mut one_cpu_ratios: Vec<(usize, Stat)> = Vec::new();
    for &size in sizes {
        let (mut handoffs, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let floor_now = measure::floor(1, round_trips, Some(cpu));
            let handoff = measure::handoff(size, round_trips_for(size), "sealpass", Some(cpu));
            floor_one_cpu.push(floor_now);
            handoffs.push(handoff.micros);
            ratios.push(handoff.micros / floor_now);
        }
        let ratio = Stat::of(ratios);
        one_cpu_ratios.push((size, ratio));
        report.row(
            Regime::OneCpu,
            HANDOFF,
            Some(size),
            "µs",
            Stat::of(handoffs),
            Some(ratio),
        );
    }
    pin_to_cpu(None);
    report.row(
        Regime::OneCpu,
        format!("{floor_text}, 1 fd"),
        None,
        "µs",
        Stat::of(floor_one_cpu),
        None,
    );

    // ---- Allocations and memory --------------------------------------------
    report.row(
        Regime::TwoCpus,
        "heap allocations per handoff, sending process",
        Some(sizes[0]),
        "allocs",
        Stat::of(sender_allocations),
        None,
    );
    report.row(
        Regime::TwoCpus,
        "heap allocations per handoff, receiving process",
        Some(sizes[0]),
        "allocs",
        Stat::of(receiver_allocations),
        None,
    );
    let memory_size = 1usize << 30;
    let unread = measure::receiver_memory(memory_size, false);
    let read = measure::receiver_memory(memory_size, true);
    for (what, figures) in [("not read", &unread), ("read", &read)] {
        for (key, label) in [
            ("peak_hwm_kib", "peak RSS (VmHWM)"),
            ("held_anon_kib", "anonymous RSS while held"),
            ("held_shmem_kib", "shared-memory RSS while held"),
        ] {
            let value = figures[key];
            report.row(
                Regime::TwoCpus,
                format!("receiver {label}, 1 segment {what}"),
                Some(memory_size),
                "KiB",
                Stat {
                    median: value,
                    min: value,
                    max: value,
                },
                None,
            );
        }
    }

    // ---- Throughput: messages per second on one connection ----------------
    let messages = if quick { 20_000 } else { 100_000 };
    let (mut raw, mut pipelined_one) = (Vec::new(), Vec::new());
    let mut throughput_ratios = Vec::new();
    for _ in 0..runs {
        let raw_now = measure::floor_one_way_rate(messages);
        let sealpass_now = measure::pipelined_rate(1, messages / 4, WINDOW);
        raw.push(raw_now);
        pipelined_one.push(sealpass_now);
        throughput_ratios.push(sealpass_now / raw_now);
    }
    report.row(
        Regime::TwoCpus,
        "floor: one-way sendmsg, 1 fd, 64 bytes",
        None,
        "msg/s",
        Stat::of(raw),
        None,
    );
    let throughput_ratio = Stat::of(throughput_ratios);
    report.row(
        Regime::TwoCpus,
        format!("sealpass pipelined, window {WINDOW}, 1 segment of 4 KiB"),
        None,
        "msg/s",
        Stat::of(pipelined_one),
        Some(throughput_ratio),
    );
    let served_one_at_a_time = (0..runs)
        .map(|_| measure::pipelined_rate_against("sealpass", 1, messages / 4, WINDOW))
        .collect();
    report.row(
        Regime::TwoCpus,
        format!("sealpass pipelined, window {WINDOW}, 1 segment, receiver receive()"),
        None,
        "msg/s",
        Stat::of(served_one_at_a_time),
        None,
    );
    for segments in [8, 64] {
        // Bounded so fds in flight stay within a default RLIMIT_NOFILE.
        let window = (512 / segments).clamp(1, WINDOW);
        let rates = (0..runs)
            .map(|_| measure::pipelined_rate(segments, messages / 4 / segments, window))
            .collect();
        report.row(
            Regime::TwoCpus,
            format!("sealpass pipelined, window {window}, {segments} segments of 4 KiB"),
            None,
            "msg/s",
            Stat::of(rates),
            None,
        );
    }
    let one_at_a_time = (0..runs)
        .map(|_| measure::pipelined_rate(1, messages / 20, 1))
        .collect();
    report.row(
        Regime::TwoCpus,
        "sealpass one at a time (window 1), 1 segment of 4 KiB",
        None,
        "msg/s",
        Stat::of(one_at_a_time),
        None,
    );

    // ---- What a producer pays to fill a fresh memfd -------------------------
    fill_rows(&mut report, runs, sizes, quick);

    // ---- The async driver beside the blocking one ---------------------------
    async_rows(&mut report, runs, round_trips, messages);
    meta::meta_rows(&mut report, runs, round_trips);

    // ---- Closing figures: ratios of medians within this run ---------------
    let (small, first) = medians[0];
    let (large, last) = medians[medians.len() - 1];
    let flat = last[AT_HANDOFF] / first[AT_HANDOFF];
    report.line(
        format!("handoff {} / handoff {}", human(large), human(small)),
        flat,
        Some(Target::AtMost(1.2)),
    );
    let handoff_ratio = report
        .rows
        .iter()
        .find(|row| {
            row.regime == Regime::TwoCpus && row.bytes == Some(small) && row.method == HANDOFF
        })
        .and_then(|row| row.ratio_to_floor)
        .unwrap();
    // Issue 12 asks for at most 1.5 under this id; an earlier target, 1.15,
    // is stricter, and stays.
    report.line_with_id(
        "roundtrip_vs_floor",
        format!("handoff {} / floor, 2 CPUs", human(small)),
        handoff_ratio.median,
        Some(Target::AtMost(1.15)),
    );
    for (size, ratio) in &one_cpu_ratios {
        report.line(
            format!("handoff {} / floor, 1 CPU", human(*size)),
            ratio.median,
            Some(Target::AtMost(2.0)),
        );
    }
    let copy_ratio = last[AT_STREAM] / last[AT_HANDOFF];
    report.line(
        format!("stream copy / handoff at {}", human(large)),
        copy_ratio,
        // The target is stated for 1 GiB; --quick stops at 64 MiB.
        (large >= 1 << 30).then_some(Target::AtLeast(1000.0)),
    );
    let read_ratio = last[AT_STREAM] / last[AT_READ];
    report.line(
        format!(
            "(stream copy + read) / (handoff + read) at {}",
            human(large)
        ),
        read_ratio,
        Some(Target::AtLeast(3.0)),
    );
    let populate_ratio = last[AT_STREAM] / last[AT_READ_POPULATE];
    report.line(
        format!(
            "(stream copy + read) / (handoff + MAP_POPULATE + read) at {}",
            human(large)
        ),
        populate_ratio,
        Some(Target::AtLeast(3.0)),
    );
    let memcpy_ratio = last[AT_STREAM] / last[AT_MEMCPY];
    report.line(
        format!("(stream copy + read) / memcpy at {}", human(large)),
        memcpy_ratio,
        None,
    );
    report.line_with_id(
        "pipelined_vs_raw",
        "pipelined 1-segment rate / raw one-way 1-fd rate",
        throughput_ratio.median,
        Some(Target::AtLeast(0.30)),
    );
    let peak_mib = unread["peak_hwm_kib"] / 1024.0;
    report.line(
        "receiver peak RSS, 1 GiB segment not read (MiB)",
        peak_mib,
        Some(Target::Below(16.0)),
    );

    report.print();
    let out = report.write_json("results.json", runs, quick);
    let plot = out.join("handoff.svg");
    report.plot(&plot).unwrap();
    println!("wrote {}", plot.display());
}

/// The ways to fill a fresh memfd, at each size: the rows behind the
/// choices of `SealedSegment` (`from_bytes` and `filled` use pwrite;
/// `with_mapping` keeps a plain mapping, `MAP_POPULATE` being no faster;
/// where shmem huge pages are `advise`, a segment of 2 MiB or more, a
/// file's included, is filled through a `MADV_HUGEPAGE` mapping). Run with
/// `--thp` for the huge page rows to differ from the plain ones.
fn fill_rows(report: &mut Report, runs: usize, sizes: &[usize], quick: bool) {
    let mode = sealpass_kernel::host::ShmemHugePages::read();
    for &size in sizes {
        let source = vec![b'x'; size];
        let iterations = iterations_for(size, quick).min(200);
        let medians: Vec<f64> = measure::Fill::ALL
            .into_iter()
            .map(|method| {
                let stat = Stat::of(
                    (0..runs)
                        .map(|_| measure::fill(&source, method, iterations))
                        .collect(),
                );
                fill_row(report, method.describe(), size, stat)
            })
            .collect();
        report.line(
            format!("fill through a mapping / pwrite at {}", human(size)),
            medians[0] / medians[2],
            None,
        );
        report.line(
            format!(
                "fill through a MAP_POPULATE mapping / plain mapping at {}",
                human(size)
            ),
            medians[1] / medians[0],
            None,
        );
        if !mode.advise_for(size as u64) {
            continue;
        }
        report.line(
            format!(
                "fill with pwrite / through a MADV_HUGEPAGE mapping at {} (shmem huge pages {mode:?})",
                human(size)
            ),
            medians[2] / medians[3],
            None,
        );
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &source).unwrap();
        let file_medians: Vec<f64> = measure::FileFill::ALL
            .into_iter()
            .map(|method| {
                let stat = Stat::of(
                    (0..runs)
                        .map(|_| measure::fill_from_file(file.path(), method, iterations))
                        .collect(),
                );
                fill_row(report, method.describe(), size, stat)
            })
            .collect();
        report.line(
            format!(
                "copy a file / read it into a MADV_HUGEPAGE mapping at {} (shmem huge pages {mode:?})",
                human(size)
            ),
            file_medians[0] / file_medians[1],
            None,
        );
    }
}

/// Reports one fill row; returns its median.
fn fill_row(report: &mut Report, method: &str, size: usize, stat: Stat) -> f64 {
    let median = stat.median;
    report.row(Regime::TwoCpus, method, Some(size), "µs", stat, None);
    median
}

/// The async round trip and pipelined rate (tokio at both ends) beside the
/// blocking ones, each pair measured back to back, and their ratios.
fn async_rows(report: &mut Report, runs: usize, round_trips: usize, messages: usize) {
    let (mut blocking_trip, mut async_trip, mut trip_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut blocking_rate, mut async_rate, mut rate_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let blocking = measure::handoff(4096, round_trips, "sealpass", None).micros;
        let tokio = measure::async_round_trip(round_trips);
        blocking_trip.push(blocking);
        async_trip.push(tokio);
        trip_ratios.push(tokio / blocking);
        let blocking = measure::pipelined_rate(1, messages / 4, WINDOW);
        let tokio = measure::async_pipelined_rate(messages / 4, WINDOW);
        blocking_rate.push(blocking);
        async_rate.push(tokio);
        rate_ratios.push(tokio / blocking);
    }
    report.row(
        Regime::TwoCpus,
        "sealpass round trip, blocking both ends",
        Some(4096),
        "µs",
        Stat::of(blocking_trip),
        None,
    );
    report.row(
        Regime::TwoCpus,
        "sealpass round trip, tokio both ends",
        Some(4096),
        "µs",
        Stat::of(async_trip),
        None,
    );
    report.row(
        Regime::TwoCpus,
        format!("sealpass pipelined, window {WINDOW}, blocking both ends"),
        Some(4096),
        "msg/s",
        Stat::of(blocking_rate),
        None,
    );
    report.row(
        Regime::TwoCpus,
        format!("sealpass pipelined, window {WINDOW}, tokio both ends"),
        Some(4096),
        "msg/s",
        Stat::of(async_rate),
        None,
    );
    report.line(
        "async 4 KiB round trip / blocking round trip",
        Stat::of(trip_ratios).median,
        Some(Target::AtMost(1.3)),
    );
    report.line(
        "async pipelined rate / blocking pipelined rate",
        Stat::of(rate_ratios).median,
        Some(Target::AtLeast(1.0)),
    );
    // The runtime's worst stall, by a 1 ms ticker, while 253 segments of
    // 4 MiB less a page (1 GiB) are received, read off the runtime and
    // accepted on it, beside the same load with no sealpass call on the
    // runtime (the machine's own stalls), alternately: the worst of each.
    let (mut sealpass, mut baseline) = (0.0f64, 0.0f64);
    for _ in 0..runs.max(3) {
        sealpass = sealpass.max(measure::async_worst_stall(253, (4 << 20) - 4096, false));
        baseline = baseline.max(measure::async_worst_stall(253, (4 << 20) - 4096, true));
    }
    report.line(
        "worst tokio runtime stall (ms beyond a 1 ms ticker's period), the same 1 GiB mapped, read and unmapped off the runtime, no sealpass call on it",
        baseline,
        None,
    );
    report.line_with_id(
        "async_worst_stall_ms",
        "worst tokio runtime stall (ms beyond a 1 ms ticker's period) over a 253-segment 1 GiB transfer",
        sealpass,
        Some(Target::AtMost(2.0)),
    );
}

fn hot_path(report: &mut Report, runs: usize, round_trips: usize) {
    let cpu = first_allowed_cpu();
    pin_to_cpu(Some(cpu));
    let (mut floors, mut handoffs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sender_allocations, mut receiver_allocations) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let floor = measure::floor(1, round_trips, Some(cpu));
        let handoff = measure::handoff(4096, round_trips, "sealpass", Some(cpu));
        floors.push(floor);
        handoffs.push(handoff.micros);
        ratios.push(handoff.micros / floor);
        sender_allocations.push(handoff.sender_allocations);
        receiver_allocations.push(handoff.receiver_allocations);
    }
    pin_to_cpu(None);
    let floor_text = "floor: sendmsg/recvmsg round trip, 1 fd";
    report.row(
        Regime::OneCpu,
        floor_text,
        None,
        "µs",
        Stat::of(floors),
        None,
    );
    let ratio = Stat::of(ratios);
    report.row(
        Regime::OneCpu,
        HANDOFF,
        Some(4096),
        "µs",
        Stat::of(handoffs),
        Some(ratio),
    );
    report.row(
        Regime::OneCpu,
        "heap allocations per handoff, sending process",
        Some(4096),
        "allocs",
        Stat::of(sender_allocations),
        None,
    );
    report.row(
        Regime::OneCpu,
        "heap allocations per handoff, receiving process",
        Some(4096),
        "allocs",
        Stat::of(receiver_allocations),
        None,
    );
    report.line(
        "handoff 4 KiB / floor, 1 CPU",
        ratio.median,
        Some(Target::AtMost(2.0)),
    );
}

/// `--e2e`: sealpass end to end and a unix stream copy at each size, the
/// sender on one CPU and the receiver on another, and their ratio, with the
/// ids and targets of the performance issue. Returns whether memfds had
/// transparent huge pages. With `Pages::HugeTlb`, the memfds come from the
/// hugetlb pool instead, and the ids end in `_hugetlb`.
fn e2e_rows(report: &mut Report, runs: usize, sizes: &[usize], quick: bool, from: Pages) -> bool {
    let allowed = *ALLOWED_CPUS.get_or_init(|| sched_getaffinity(Pid::from_raw(0)).unwrap());
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .take(2)
        .collect();
    let (sender_cpu, receiver_cpu) = match cpus.as_slice() {
        [one, two] => (Some(*one), Some(*two)),
        _ => (None, None),
    };
    pin_to_cpu(sender_cpu);
    let mode = sealpass_kernel::host::ShmemHugePages::read();
    let huge = mode != sealpass_kernel::host::ShmemHugePages::Never;
    let pages = match (from, mode) {
        (Pages::HugeTlb, _) => "hugetlb pool",
        (_, sealpass_kernel::host::ShmemHugePages::Never) => "4 KiB pages",
        (_, sealpass_kernel::host::ShmemHugePages::Advise) => "shmem THP advise",
        (_, sealpass_kernel::host::ShmemHugePages::Always) => "shmem THP always",
    };
    let suffix = match (from, huge) {
        (Pages::HugeTlb, _) => "_hugetlb",
        (_, true) => "_thp",
        (_, false) => "",
    };
    for &size in sizes {
        let iterations = iterations_for(size, quick);
        let source = vec![b'x'; size];
        let (mut ours, mut stream, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut floors, mut over_floor) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let e2e = measure::end_to_end(size, iterations, receiver_cpu, from);
            let copy = measure::stream_copy_on(iterations, &source, receiver_cpu);
            let floor = measure::fresh_page_floor(size, iterations, receiver_cpu);
            ours.push(e2e);
            stream.push(copy);
            ratios.push(copy / e2e);
            floors.push(floor);
            over_floor.push(e2e / floor);
        }
        report.row(
            Regime::TwoCpus,
            format!("sealpass end to end, pinned, {pages}"),
            Some(size),
            "µs",
            Stat::of(ours),
            None,
        );
        report.row(
            Regime::TwoCpus,
            "copy through a unix stream socket, reader reads all, pinned",
            Some(size),
            "µs",
            Stat::of(stream),
            None,
        );
        report.row(
            Regime::TwoCpus,
            format!("fresh-page floor: plain memfd, pwrite, seal, map and read, pinned, {pages}"),
            Some(size),
            "µs",
            Stat::of(floors),
            None,
        );
        let short = human(size)
            .replace(' ', "")
            .replace("iB", "")
            .to_lowercase();
        let id = format!("e2e_{short}_vs_stream{suffix}");
        // Targets since the big-buffers decisions: with 4 KiB pages one to
        // one, sealpass sits at the fresh-page floor (e2e_*_vs_floor) and a
        // small transfer takes the copy path; with huge pages it beats a
        // stream copy.
        let target = match (id.as_str(), quick) {
            (_, true) => None,
            ("e2e_4k_vs_stream", _) => Some(Target::AtLeast(0.5)),
            ("e2e_64m_vs_stream_thp" | "e2e_1g_vs_stream_thp", _) => Some(Target::AtLeast(2.5)),
            _ => None,
        };
        report.line_with_id(
            id,
            format!(
                "stream copy / sealpass end to end ({pages}) at {}",
                human(size)
            ),
            Stat::of(ratios).median,
            target,
        );
        let floor_id = format!("e2e_{short}_vs_floor{suffix}");
        let floor_target =
            (floor_id == "e2e_64m_vs_floor" && !quick).then_some(Target::AtMost(1.15));
        report.line_with_id(
            floor_id,
            format!(
                "sealpass end to end / the fresh-page floor ({pages}) at {}",
                human(size)
            ),
            Stat::of(over_floor).median,
            floor_target,
        );
    }
    pin_to_cpu(None);
    huge
}

/// `--checks`: the receiver's cost per 4 KiB segment, call by call, in one
/// process on one CPU: each check PROTOCOL.md section 6 asks for, the
/// mapping, the close, and the two messages. The sum against the measured
/// handoff shows where a message's time goes.
fn check_rows(report: &mut Report, runs: usize, iterations: usize) {
    use std::os::fd::{AsFd, AsRawFd};

    use nix::fcntl::{FcntlArg, fcntl};
    use sealpass_kernel::fdpass;
    use sealpass_sender::{SealedSegment, Seals};

    const BATCH: usize = fdpass::MAX_BATCH;
    pin_to_cpu(Some(first_allowed_cpu()));
    let segment = SealedSegment::filled("checks", b'x', 4096, Seals::SENDER_DEFAULT).unwrap();
    let fd = segment.fd();
    let (a, b) = fdpass::pair().unwrap();
    let mut buffer = vec![0u8; 256];
    let mut control = fdpass::ControlBuffer::new();
    let payload = [0u8; 64];
    let mut link = Vec::new();
    let mut rows: Vec<(&str, Vec<f64>)> = Vec::new();
    // `step` handles `per_step` messages; each sample is per message.
    let mut measure_per = |what: &'static str, per_step: usize, step: &mut dyn FnMut()| {
        let mut samples = Vec::new();
        for _ in 0..runs {
            let per_call = measure::per_op(iterations.div_ceil(per_step), &mut *step);
            samples.push(per_call / per_step as f64);
        }
        rows.push((what, samples));
    };
    measure_per(
        "sendmsg + recvmsg of 64 bytes and 1 fd, and close it",
        1,
        &mut || {
            fdpass::send(a.as_fd(), &payload, &[fd]).unwrap();
            let got = fdpass::receive(b.as_fd(), &mut buffer, &mut control).unwrap();
            assert_eq!(got.fds.len(), 1);
        },
    );
    measure_per(
        "sendmsg + recvmsg of 64 bytes, no fd (the answer)",
        1,
        &mut || {
            fdpass::send(a.as_fd(), &payload, &[]).unwrap();
            fdpass::receive(b.as_fd(), &mut buffer, &mut control).unwrap();
        },
    );
    // The same two messages, 32 at a time through recvmmsg/sendmmsg as
    // `serve_batch` moves them: the time per message.
    let mut batch = fdpass::ReceiveBatch::new(BATCH, 256);
    let answers = [payload; BATCH];
    measure_per(
        "the same, 32 queued, one recvmmsg (per message), 1 fd each",
        BATCH,
        &mut || {
            for _ in 0..BATCH {
                fdpass::send(a.as_fd(), &payload, &[fd]).unwrap();
            }
            assert_eq!(fdpass::receive_batch(b.as_fd(), &mut batch).unwrap(), BATCH);
        },
    );
    measure_per(
        "the same, 32 answers per sendmmsg + recvmmsg (per message), no fd",
        BATCH,
        &mut || {
            fdpass::send_batch(a.as_fd(), &answers).unwrap();
            assert_eq!(fdpass::receive_batch(b.as_fd(), &mut batch).unwrap(), BATCH);
        },
    );
    measure_per("fstat (regular file? size, blocks)", 1, &mut || {
        nix::sys::stat::fstat(fd).unwrap();
    });
    measure_per("fcntl(F_GET_SEALS)", 1, &mut || {
        fcntl(fd, FcntlArg::F_GET_SEALS).unwrap();
    });
    measure_per(
        "every check together (inspect::facts_reusing)",
        1,
        &mut || {
            let facts =
                sealpass_receiver::inspect::facts_reusing(fd, std::mem::take(&mut link)).unwrap();
            link = facts.link;
        },
    );
    measure_per("mmap read-only + munmap, 4 KiB", 1, &mut || {
        // SAFETY: the memfd is sealed against writes and shrinking.
        let mapping = unsafe { memmap2::MmapOptions::new().len(4096).map(fd.as_raw_fd()) }.unwrap();
        drop(mapping);
    });
    let mut copy = vec![0u8; 4096];
    measure_per(
        "pread of the 4 KiB into a buffer (a copy, instead of a mapping)",
        1,
        &mut || {
            assert_eq!(nix::sys::uio::pread(fd, &mut copy, 0).unwrap(), 4096);
        },
    );
    measure_per("dup + close of the fd", 1, &mut || {
        drop(fd.try_clone_to_owned().unwrap());
    });
    // Where copying a segment stops paying: a mapping read in full and
    // unmapped, against a buffer of the receiver's own filled by pread and
    // read in full, at each size (the receiver's `copy_below`).
    let mut crossover: Vec<(String, usize, Vec<f64>)> = Vec::new();
    for size in [
        4usize << 10,
        16 << 10,
        64 << 10,
        128 << 10,
        256 << 10,
        1 << 20,
    ] {
        let segment =
            SealedSegment::filled("crossover", b'x', size as u64, Seals::SENDER_DEFAULT).unwrap();
        let fd = segment.fd();
        let times = (size / 16384).max(1);
        let (mut mapped, mut copied) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            mapped.push(measure::per_op(iterations / times, || {
                // SAFETY: the memfd is sealed against writes and shrinking.
                let mapping =
                    unsafe { memmap2::MmapOptions::new().len(size).map(fd.as_raw_fd()) }.unwrap();
                std::hint::black_box(checksum(&mapping));
            }));
            copied.push(measure::per_op(iterations / times, || {
                let mut copy = vec![0u8; size];
                assert_eq!(nix::sys::uio::pread(fd, &mut copy, 0).unwrap(), size);
                std::hint::black_box(checksum(&copy));
            }));
        }
        crossover.push(("mmap + read every byte + munmap".into(), size, mapped));
        crossover.push((
            "pread into a new buffer + read every byte".into(),
            size,
            copied,
        ));
    }
    pin_to_cpu(None);
    for (what, samples) in rows {
        report.row(
            Regime::OneCpu,
            what,
            Some(4096),
            "µs",
            Stat::of(samples),
            None,
        );
    }
    for (what, size, samples) in crossover {
        report.row(
            Regime::OneCpu,
            what,
            Some(size),
            "µs",
            Stat::of(samples),
            None,
        );
    }
}

/// Draws `target/bench/peers.json` (written by `cargo xtask bench --peers`)
/// the way the handoff plot is drawn.
fn plot_peers(input: &Path, output: &Path) {
    let text = std::fs::read_to_string(input).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut report = Report::default();
    for row in json["results"].as_array().unwrap() {
        let value = |key: &str| row["value"][key].as_f64().unwrap();
        report.row(
            Regime::TwoCpus,
            row["mechanism"].as_str().unwrap(),
            Some(row["bytes"].as_u64().unwrap() as usize),
            "µs",
            Stat {
                median: value("median"),
                min: value("min"),
                max: value("max"),
            },
            None,
        );
    }
    report.plot(output).unwrap();
    println!("wrote {}", output.display());
}
