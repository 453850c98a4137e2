"""asyncio: awaitable accept, receive, send and verdicts, on the event loop.

Each call waits for its socket's fd with the running loop (`add_reader`),
not on a thread, then takes what is ready with a short bounded call. A call
is cancellable: cancelling it (or a `asyncio.timeout` around it) takes
nothing from the socket, and the object stays usable. Closing the object
from elsewhere while a call waits wakes that call, which raises
`ValueError`, as the blocking calls do::

    import asyncio, sealpass, sealpass.aio

    async def serve(path):
        with sealpass.Listener(path) as listener:
            connection = await sealpass.aio.accept(listener)
            with connection:
                while (transfer := await sealpass.aio.receive(connection)) is not None:
                    with transfer:
                        print(transfer.id, transfer.metadata)

    async def main(path):
        with await sealpass.aio.connect(path) as sender:
            await sealpass.aio.send(sender, {"frame": b"..."}, metadata={"seq": "1"})
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from ._sealpass import Connection, Listener, Sender, Transfer

if TYPE_CHECKING:
    from ._sealpass import _Metadata, _SegmentList, _SegmentMap, _Seals

__all__ = ["accept", "connect", "next_verdict", "receive", "send"]

# A bounded call made once the fd is readable: long enough to take a message
# that is there, short enough that a refused one (skipped) costs nothing.
_TAKE = 0.005

# How often a waiting call looks whether its object was closed meanwhile.
_SLICE = 0.1

_T = TypeVar("_T")


async def _readable(fd: int) -> None:
    """Waits until `fd` is readable (or closed), with the running loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _when_ready(fileno: Callable[[], int], take: Callable[[], _T]) -> _T:
    """Takes what is ready with `take` (which raises TimeoutError when
    nothing was), waiting for the fd between tries."""
    while True:
        try:
            return take()
        except TimeoutError:
            pass
        # The object's own fd, duplicated: closing the object meanwhile
        # must not leave the loop watching a number the process reuses.
        fd = os.dup(fileno())
        try:
            # Woken by the fd, or every slice to see a close from elsewhere
            # (which the next `take` reports), as the blocking calls are.
            await asyncio.wait_for(_readable(fd), _SLICE)
        except TimeoutError:
            pass
        finally:
            os.close(fd)


async def accept(listener: Listener) -> Connection:
    """The next connection, once a sender connects."""
    return await _when_ready(listener.fileno, lambda: listener.accept(timeout=_TAKE))


async def receive(connection: Connection) -> Transfer | None:
    """The next verified transfer, or None once the sender closed."""
    return await _when_ready(connection.fileno, lambda: connection.receive(timeout=_TAKE))


async def connect(path: str | os.PathLike[str], *, timeout: float | None = None) -> Sender:
    """A sender connected to `path`; with `timeout`, retries (on the loop's
    timer) while the receiver is not up yet."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        try:
            return Sender(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if deadline is None or loop.time() >= deadline:
                raise
            await asyncio.sleep(0.02)


async def next_verdict(sender: Sender) -> int:
    """The verdict on the oldest transfer in flight: its id if accepted;
    raises Rejected if not."""
    return await _when_ready(sender.fileno, lambda: sender.next_verdict(timeout=_TAKE))


async def send(
    sender: Sender,
    segments: _SegmentMap | _SegmentList | None = None,
    *,
    seals: _Seals | None = None,
    metadata: _Metadata | None = None,
) -> int:
    """`Sender.submit` of one transfer, then its verdict, awaited: its id if
    accepted; raises Rejected if not."""
    if isinstance(segments, Mapping):
        sender.submit(segments, seals=seals, metadata=metadata)
    else:
        sender.submit(segments, seals=seals, metadata=metadata)
    return await next_verdict(sender)
