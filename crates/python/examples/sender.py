#!/usr/bin/env python3
"""A sealpass sender in Python: sends a numpy array and a caption, once.

    python sender.py --socket /tmp/frames.sock [--size BYTES]

Exits 0 when the receiver accepts, 3 when it rejects (the reason on stderr),
1 on any other failure. `cargo xtask test` runs PROTOCOL.md's conformance
suite against this program.
"""
import argparse
import sys

import numpy

import sealpass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the receiver's socket")
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes in the array")
    args = parser.parse_args()
    frame = (numpy.arange(args.size) % 256).astype(numpy.uint8)  # 0, 1, ..., 255, 0, ...
    # Filled in place: the array is a view of the memfd's pages, released
    # before the seal.
    with sealpass.SegmentWriter("in-place", args.size) as writer:
        numpy.frombuffer(memoryview(writer), dtype=numpy.uint8)[:] = 0xA5
        in_place = writer.seal()
    try:
        # Buffers are copied into memfds; a Segment goes as it is.
        transfer_id = sealpass.send(
            args.socket,
            {"frame": frame, "caption": b"hello from Python", "in-place": in_place},
            connect_timeout=10,
        )
    except sealpass.Rejected as rejected:
        print(f"rejected: {rejected.reason} ({rejected.code}): {rejected.message}", file=sys.stderr)
        return 3
    except sealpass.SealpassError as error:
        print(f"failed: {error}", file=sys.stderr)
        return 1
    print(f"transfer {transfer_id} accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
