"""A receiver and a sender on one asyncio event loop: the receiver serves
three transfers, the sender pipelines them and awaits each verdict. Exits 0
when every transfer was accepted and arrived as sent.

    python async_pair.py [--socket PATH]
"""

import argparse
import asyncio
import os
import sys
import tempfile

import sealpass
import sealpass.aio


async def receiver(listener: sealpass.Listener, count: int) -> list[tuple[bytes, bytes]]:
    got = []
    connection = await sealpass.aio.accept(listener)
    with connection:
        for _ in range(count):
            transfer = await sealpass.aio.receive(connection)
            if transfer is None:
                break
            with transfer:  # Ack on exit
                got.append((bytes(transfer["frame"]), transfer.metadata["seq"]))
    return got


async def sender(path: str, count: int) -> list[int]:
    with await sealpass.aio.connect(path, timeout=10) as connection:
        return [
            await sealpass.aio.send(connection, {"frame": bytes([n]) * 4096}, metadata={"seq": str(n)})
            for n in range(count)
        ]


async def main(path: str) -> int:
    with sealpass.Listener(path) as listener:
        got, ids = await asyncio.gather(receiver(listener, 3), sender(path, 3))
    expected = [(bytes([n]) * 4096, str(n).encode()) for n in range(3)]
    if got != expected or ids != [1, 2, 3]:
        print(f"unexpected: {ids} {[(len(f), s) for f, s in got]}", file=sys.stderr)
        return 1
    print("3 transfers, each accepted, on one event loop")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", default=os.path.join(tempfile.mkdtemp(), "pair.sock"))
    sys.exit(asyncio.run(main(parser.parse_args().socket)))
