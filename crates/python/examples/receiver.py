#!/usr/bin/env python3
"""A sealpass receiver in Python: prints each transfer it accepts.

    python receiver.py --socket /tmp/frames.sock [--once]

Every check on the fds (memfd? name, size, seals?) is made by the Rust core
before a transfer reaches this code; what arrives is mapped read-only and read
here without a copy. `cargo xtask test` runs PROTOCOL.md's conformance suite
against this program. Ctrl-C stops it and removes the socket.
"""
import argparse
import hashlib
import sys

import sealpass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="where to listen")
    parser.add_argument("--once", action="store_true", help="exit after one accepted transfer")
    args = parser.parse_args()
    try:
        with sealpass.Listener(args.socket) as listener:
            print(f"listening at {listener.path}", file=sys.stderr, flush=True)
            for connection in listener:
                try:
                    with connection:
                        for transfer in connection:
                            with transfer:  # ack on exit; reject if this block raises
                                sender = transfer.peer.pid if transfer.peer else "?"
                                for segment in transfer:
                                    # hashlib reads the mapping through the
                                    # buffer protocol: no copy.
                                    digest = hashlib.sha256(segment).hexdigest()[:16]
                                    print(f"transfer {transfer.id} from pid {sender}: "
                                          f"{segment.name} {segment.size} bytes sha256 {digest}…",
                                          flush=True)
                            if args.once:
                                return 0
                except sealpass.SealpassError as error:
                    # This peer is gone or broke the connection; serve the next.
                    print(f"connection ended: {error}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
