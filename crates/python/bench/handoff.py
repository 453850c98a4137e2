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
        if mechanism == "sealpass":
            socket = os.path.join(scratch, "bench.sock")
            process = context.Process(target=consume_sealpass, args=(socket, consumer_replies, rounds))
            process.start()
            replies.recv()
            sender = sealpass.Sender(socket, connect_timeout=60, answer_timeout=60)
            cleanup.append(sender.close)

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
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    array = the_array(args.size)
    rows = {}
    for mechanism in MECHANISMS:
        # Two rounds of warm-up, not counted.
        times = run(mechanism, array, args.runs + 2)[2:]
        median = statistics.median(times)
        rows[mechanism] = {
            "median_ms": median * 1e3,
            "min_ms": min(times) * 1e3,
            "max_ms": max(times) * 1e3,
            "runs": len(times),
        }
        print(
            f"{mechanism:32} {median * 1e3:8.2f} ms  (min {min(times) * 1e3:.2f}, "
            f"max {max(times) * 1e3:.2f}, {len(times)} rounds)",
            flush=True,
        )
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
