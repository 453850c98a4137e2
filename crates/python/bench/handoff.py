#!/usr/bin/env python3
"""A 64 MiB numpy array from one Python process to another, four ways, in one run.

    python handoff.py [--size BYTES] [--runs N] [--out results.json]

Each round: the producer has the array; the consumer ends up holding an ndarray
of the same bytes, touches every page of it (one byte per 4 KiB, so a mapping
pays its page faults), and sends the producer that sum, which the producer
checks. The time is the producer's, from the start of the round to the sum.

- sealpass: `Sender.send` copies the array into a new memfd (pwrite), seals it
  and hands it over; the consumer reads it through `numpy.frombuffer` (no
  copy), answers Ack and releases the mapping.
- multiprocessing.Queue: `put` pickles into a pipe, `get` unpickles.
- a pipe with pickle protocol 5: the array's buffer travels out of band
  (`buffer_callback`), so one copy each way through the kernel.
- multiprocessing.shared_memory: one segment made before the rounds (its best
  case); the producer copies in, the consumer copies out (a shared_memory
  segment can be written by anyone holding its name, so a consumer that must
  not see it change copies).

Then, at 64 and 256 MiB (`--fill-sizes`), a producer that makes new data every
round, two ways, to the same sealpass consumer: it fills (copies the source
array into) either a `sealpass.empty` array, which `send` then seals in place,
or a new `numpy.empty` array, which `send` copies into a new memfd as
`Segment.from_buffer` does. Both pay fresh pages for the fill; the second pays
a second set, and a copy. `py_empty_vs_from_buffer_64m` is the ratio of the two.
numpy asks for transparent huge pages for its big arrays (`madvise`), which
makes its fresh pages far cheaper than a memfd's 4 KiB ones; one more row, at
64 MiB, turns that off (`numpy._core.multiarray._set_madvise_hugepage`), so
that both sides have 4 KiB pages (`py_empty_vs_from_buffer_64m_numpy_4k`).

The producer runs on CPU 0 and the consumer on CPU 1 when the machine has two
or more. Prints one line per mechanism (median and spread of the rounds) and
writes them, with the ratios, as JSON.
"""
import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context, shared_memory

import numpy

import sealpass

PAGE = 4096


def pin(cpu):
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() >= 2:
        os.sched_setaffinity(0, {cpu})


def touch(array):
    """One byte of every page, so that every page is really there."""
    raw = array.reshape(-1).view(numpy.uint8)
    return int(raw[::PAGE].sum(dtype=numpy.uint64))


def the_array(size):
    return numpy.random.default_rng(64).integers(0, 256, size, dtype=numpy.uint8)


# --- consumers: each runs in its own process, answers each round with a sum ---


def consume_sealpass(socket, replies, rounds):
    pin(1)
    with sealpass.Listener(socket) as listener:
        replies.send("ready")
        with listener.accept(timeout=60) as connection:
            for _ in range(rounds):
                transfer = connection.receive(timeout=60)
                with transfer:  # ack, then the mapping goes
                    total = touch(numpy.frombuffer(transfer["array"], dtype=numpy.uint8))
                replies.send(total)


def consume_queue(queue, replies, rounds):
    pin(1)
    replies.send("ready")
    for _ in range(rounds):
        replies.send(touch(queue.get()))


def consume_pickle5(pipe, replies, rounds):
    pin(1)
    replies.send("ready")
    for _ in range(rounds):
        header = pipe.recv_bytes()
        count = int.from_bytes(pipe.recv_bytes(), "little")
        buffers = [pipe.recv_bytes() for _ in range(count)]
        replies.send(touch(pickle.loads(header, buffers=buffers)))


def consume_shared_memory(name, size, ready, replies, rounds):
    pin(1)
    segment = shared_memory.SharedMemory(name=name)
    try:
        view = numpy.ndarray((size,), dtype=numpy.uint8, buffer=segment.buf)
        replies.send("ready")
        for _ in range(rounds):
            ready.recv()
            copy = view.copy()  # out of the writable segment
            replies.send(touch(copy))
            del copy
        del view
    finally:
        segment.close()


# --- producers: time each round ---


def timed_rounds(rounds, one_round, replies, expected):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        one_round()
        total = replies.recv()
        times.append(time.perf_counter() - started)
        if total != expected:
            raise SystemExit(f"the consumer summed {total}, expected {expected}")
    return times


def run(mechanism, array, rounds):
    context = get_context("spawn")
    replies, consumer_replies = context.Pipe(duplex=False)
    expected = touch(array)
    size = array.nbytes
    with tempfile.TemporaryDirectory() as scratch:
        cleanup = []
        if mechanism in ("sealpass", FILLED_IN_PLACE, FILLED_THEN_COPIED, FILLED_THEN_COPIED_4K):
            socket = os.path.join(scratch, "bench.sock")
            process = context.Process(target=consume_sealpass, args=(socket, consumer_replies, rounds))
            process.start()
            replies.recv()
            sender = sealpass.Sender(socket, connect_timeout=60, answer_timeout=60)
            cleanup.append(sender.close)

            if mechanism == FILLED_IN_PLACE:

                def one_round():
                    fresh = sealpass.empty(size, numpy.uint8, name="array")
                    fresh[:] = array  # the producer's new data
                    sender.send({"array": fresh})  # sealed in place

            elif mechanism in (FILLED_THEN_COPIED, FILLED_THEN_COPIED_4K):

                def one_round():
                    fresh = numpy.empty(size, numpy.uint8)
                    fresh[:] = array  # the producer's new data
                    sender.send({"array": fresh})  # copied into a new memfd

            else:

                def one_round():
                    sender.send({"array": array})

        elif mechanism == "multiprocessing.Queue":
            queue = context.Queue()
            process = context.Process(target=consume_queue, args=(queue, consumer_replies, rounds))
            process.start()
            replies.recv()

            def one_round():
                queue.put(array)

        elif mechanism == "pipe, pickle protocol 5":
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=consume_pickle5, args=(reader, consumer_replies, rounds))
            process.start()
            replies.recv()

            def one_round():
                buffers = []
                header = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
                writer.send_bytes(header)
                writer.send_bytes(len(buffers).to_bytes(8, "little"))
                for buffer in buffers:
                    writer.send_bytes(buffer.raw())

        elif mechanism == "multiprocessing.shared_memory":
            segment = shared_memory.SharedMemory(create=True, size=size)
            cleanup.append(segment.unlink)
            cleanup.append(segment.close)
            view = numpy.ndarray((size,), dtype=numpy.uint8, buffer=segment.buf)
            go, consumer_go = context.Pipe(duplex=False)
            process = context.Process(
                target=consume_shared_memory,
                args=(segment.name, size, go, consumer_replies, rounds),
            )
            process.start()
            replies.recv()

            def one_round():
                view[:] = array  # into the shared segment
                consumer_go.send(True)

        else:
            raise ValueError(mechanism)
        try:
            pin(0)
            times = timed_rounds(rounds, one_round, replies, expected)
        finally:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
            if mechanism == "multiprocessing.shared_memory":
                del view
            for step in reversed(cleanup):
                step()
    return times


FILLED_IN_PLACE = "sealpass.empty, filled, sent"
FILLED_THEN_COPIED = "numpy.empty, filled, sent (copied)"
FILLED_THEN_COPIED_4K = "numpy.empty (no THP), filled, sent (copied)"


def numpy_huge_pages(enabled):
    """Whether numpy asks for transparent huge pages for big arrays; returns the
    setting before (None where this numpy cannot say)."""
    try:
        from numpy._core import multiarray
    except ImportError:
        return None
    before = multiarray._get_madvise_hugepage()
    multiarray._set_madvise_hugepage(enabled)
    return before

MECHANISMS = [
    "sealpass",
    "multiprocessing.Queue",
    "pipe, pickle protocol 5",
    "multiprocessing.shared_memory",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64 << 20)
    parser.add_argument("--runs", type=int, default=15, help="timed rounds per mechanism")
    parser.add_argument(
        "--fill-sizes",
        default=f"{64 << 20},{256 << 20}",
        help="sizes (bytes, comma-separated) of the rows that fill a new array each round",
    )
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    rows = {}

    def measure(label, mechanism, array):
        # Two rounds of warm-up, not counted.
        times = run(mechanism, array, args.runs + 2)[2:]
        median = statistics.median(times)
        rows[label] = {
            "median_ms": median * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "runs": len(times),
        }
        print(
            f"{label:44} {median * 1e3:8.2f} ms  (min {min(times) * 1e3:.2f}, "
            f"max {max(times) * 1e3:.2f}, {len(times)} rounds)",
            flush=True,
        )

    array = the_array(args.size)
    for mechanism in MECHANISMS:
        measure(mechanism, mechanism, array)
    fill_sizes = [int(size) for size in args.fill_sizes.split(",") if size]
    for size in fill_sizes:
        source = the_array(size)
        for mechanism in (FILLED_IN_PLACE, FILLED_THEN_COPIED):
            measure(f"{mechanism}, {size >> 20} MiB", mechanism, source)
        if size == 64 << 20:
            before = numpy_huge_pages(False)
            if before is not None:
                try:
                    label = f"{FILLED_THEN_COPIED_4K}, 64 MiB"
                    measure(label, FILLED_THEN_COPIED_4K, source)
                finally:
                    numpy_huge_pages(before)
        del source
    ours = rows["sealpass"]["median_ms"]
    summary = [
        {
            "id": "python_64m_queue_vs_sealpass",
            "ratio": rows["multiprocessing.Queue"]["median_ms"] / ours,
            "target": ">= 5",
            "met": rows["multiprocessing.Queue"]["median_ms"] / ours >= 5,
        },
        {
            "id": "python_64m_pickle5_vs_sealpass",
            "ratio": rows["pipe, pickle protocol 5"]["median_ms"] / ours,
            "target": None,
            "met": None,
        },
        {
            "id": "python_64m_shared_memory_vs_sealpass",
            "ratio": rows["multiprocessing.shared_memory"]["median_ms"] / ours,
            "target": ">= 0.667 (sealpass within 1.5x of shared_memory)",
            "met": rows["multiprocessing.shared_memory"]["median_ms"] / ours >= 1 / 1.5,
        },
    ]
    for size in fill_sizes:
        in_place = rows[f"{FILLED_IN_PLACE}, {size >> 20} MiB"]["median_ms"]
        copied = rows[f"{FILLED_THEN_COPIED}, {size >> 20} MiB"]["median_ms"]
        at_64m = size == 64 << 20
        summary.append(
            {
                "id": f"py_empty_vs_from_buffer_{size >> 20}m",
                "ratio": in_place / copied,
                "target": "<= 0.8" if at_64m else None,
                "met": in_place / copied <= 0.8 if at_64m else None,
            }
        )
    no_thp = rows.get(f"{FILLED_THEN_COPIED_4K}, 64 MiB")
    if no_thp is not None:
        summary.append(
            {
                "id": "py_empty_vs_from_buffer_64m_numpy_4k",
                "ratio": rows[f"{FILLED_IN_PLACE}, 64 MiB"]["median_ms"] / no_thp["median_ms"],
                "target": None,
                "met": None,
            }
        )
    for entry in summary:
        verdict = {True: "met", False: "NOT met", None: "no target"}[entry["met"]]
        target = f" (target {entry['target']})" if entry["target"] else ""
        print(f"{entry['id']}: {entry['ratio']:.2f}{target}: {verdict}")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(
                {"size": args.size, "cpus": os.cpu_count(), "rows": rows, "summary": summary},
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
