"""asyncio: the awaitable calls, on the event loop, cancellable, and woken
by a close from elsewhere."""
import asyncio
import contextlib
import threading

import pytest

import sealpass
import sealpass.aio


@contextlib.asynccontextmanager
async def connected(socket_path):
    """A listener at `socket_path`, a sender connected to it and the
    accepted connection, all awaited on the running loop."""
    with sealpass.Listener(socket_path) as listener:
        accepting = asyncio.ensure_future(sealpass.aio.accept(listener))
        sender = await sealpass.aio.connect(socket_path, timeout=5)
        yield sender, await accepting


def test_a_whole_exchange_on_one_event_loop(socket_path):
    async def main():
        async with connected(socket_path) as (sender, connection):
            with sender, connection:
                sending = asyncio.ensure_future(
                    sealpass.aio.send(sender, {"frame": b"pixels"}, metadata={"seq": "1"})
                )
                transfer = await sealpass.aio.receive(connection)
                got = (bytes(transfer["frame"]), transfer.metadata)
                transfer.ack()
                assert await sending == 1
                sender.close()
                assert await sealpass.aio.receive(connection) is None
                return got

    assert asyncio.run(main()) == (b"pixels", {"seq": b"1"})


def test_a_cancelled_receive_takes_nothing_and_the_connection_serves_on(socket_path):
    async def main():
        async with connected(socket_path) as (sender, connection):
            with sender, connection:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await sealpass.aio.receive(connection)
                sender.submit({"a": b"x"})
                transfer = await sealpass.aio.receive(connection)
                transfer.ack()
                return await sealpass.aio.next_verdict(sender)

    assert asyncio.run(main()) == 1


def test_closing_while_a_receive_waits_wakes_it(socket_path):
    async def main():
        async with connected(socket_path) as (sender, connection):
            with sender:
                waiting = asyncio.ensure_future(sealpass.aio.receive(connection))
                await asyncio.sleep(0.05)
                threading.Thread(target=connection.close).start()
                with pytest.raises(ValueError, match="closed"):
                    async with asyncio.timeout(5):
                        await waiting

    asyncio.run(main())


def test_the_async_example_runs_as_written(tmp_path):
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "async_pair.py"
    done = subprocess.run(
        [sys.executable, str(example), "--socket", str(tmp_path / "pair.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "each accepted" in done.stdout
