"""Blocking calls: timeouts, Ctrl-C, the GIL released while waiting."""
import os
import signal
import subprocess
import threading
import time

import pytest

import sealpass
from conftest import finish, interrupt, python_child, wait_for_socket


@pytest.mark.parametrize("where", ["accept", "receive", "verdict"])
def test_ctrl_c_interrupts_a_blocked_call_and_cleans_up(socket_path, where):
    if where == "verdict":
        # A peer that accepts and never answers: the sender waits on its verdict.
        import socket as stdlib_socket

        silent = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_SEQPACKET)
        silent.bind(socket_path)
        silent.listen()
        code = """
            import sys, sealpass
            print("ready", flush=True)
            try:
                sealpass.send(sys.argv[1], {"a": b"x"})
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        """
    else:
        code = f"""
            import sys, sealpass
            try:
                with sealpass.Listener(sys.argv[1]) as listener:
                    print("ready", flush=True)
                    if {where!r} == "accept":
                        listener.accept()
                    else:
                        listener.accept().receive()
            except KeyboardInterrupt:
                print("interrupted", flush=True)
        """
    child = python_child(code, socket_path, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    if where == "receive":
        peer = sealpass.Sender(socket_path)  # connected, sends nothing
    time.sleep(0.3)  # let it block
    interrupted_at = time.monotonic()
    interrupt(child)
    assert finish(child, timeout=10) == 0
    assert time.monotonic() - interrupted_at < 2.0
    assert child.stdout.read() == "interrupted\n"
    if where != "verdict":
        assert not os.path.exists(socket_path), "the listener removed its socket"
    else:
        silent.close()


def test_timeouts_raise_timeout_error(socket_path):
    with sealpass.Listener(socket_path) as listener:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no sender connected"):
            listener.accept(timeout=0.3)
        assert 0.25 < time.monotonic() - started < 3
        with sealpass.Sender(socket_path, answer_timeout=0.3) as sender:
            with listener.accept(timeout=5) as connection:
                with pytest.raises(TimeoutError, match="no transfer came"):
                    connection.receive(timeout=0.2)
                sender.submit({"a": b"x"})
                with pytest.raises(TimeoutError, match="no answer"):
                    sender.next_verdict()
                assert sender.in_flight == 1
                connection.receive(timeout=5).ack()
                assert sender.next_verdict() == 1


def test_other_threads_run_while_one_waits(socket_path):
    with sealpass.Listener(socket_path) as listener:
        counted = []
        stop = threading.Event()

        def count():
            n = 0
            while not stop.is_set():
                n += 1
            counted.append(n)

        counter = threading.Thread(target=count)
        counter.start()
        with pytest.raises(TimeoutError):
            listener.accept(timeout=0.5)
        stop.set()
        counter.join()
        # With the GIL held for the whole wait the counter would barely run;
        # released, it spins millions of times in half a second.
        assert counted[0] > 100_000


def test_a_vanished_receiver_is_delivery_unknown(socket_path):
    receiver = python_child(
        """
        import os, sys, sealpass
        with sealpass.Listener(sys.argv[1]) as listener:
            connection = listener.accept(timeout=20)
            transfer = connection.receive(timeout=20)
            os._exit(0)  # dies holding the transfer, unanswered
        """,
        socket_path,
    )
    wait_for_socket(socket_path, receiver)
    with pytest.raises(sealpass.DeliveryUnknown) as raised:
        sealpass.send(socket_path, {"a": b"x"}, connect_timeout=20)
    assert raised.value.id == 1
    finish(receiver)


def test_closed_objects_raise_value_error(socket_path):
    listener = sealpass.Listener(socket_path)
    listener.close()
    assert not os.path.exists(socket_path)
    with pytest.raises(ValueError, match="closed"):
        listener.accept(timeout=0.1)
    segment = sealpass.Segment.from_buffer("a", b"x")
    segment.close()
    with pytest.raises(ValueError, match="closed"):
        segment.fileno()


def test_a_transfer_hands_out_a_pidfd_for_its_sender_where_the_kernel_has_one(socket_path):
    import select

    release = open("/proc/sys/kernel/osrelease").read()
    has_pidfd = tuple(int(n) for n in release.split(".")[:2]) >= (6, 5)
    sender = python_child(
        """
        import sys, sealpass
        sealpass.send(sys.argv[1], {"a": b"x"}, connect_timeout=20)
        """,
        socket_path,
    )
    with sealpass.Listener(socket_path) as listener, listener.accept(timeout=20) as connection:
        with connection.receive(timeout=20) as transfer:
            assert transfer.peer.pid == sender.pid
            pidfd = transfer.peer_pidfd()
    assert (pidfd is not None) == has_pidfd, release
    if pidfd is not None:
        try:
            assert finish(sender) == 0
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            assert poller.poll(5000), "an exited sender's pidfd polls readable"
        finally:
            os.close(pidfd)
    else:
        assert finish(sender) == 0


def wait_then(seconds, action):
    """Runs `action` on another thread after `seconds`; returns the thread."""
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


def test_closing_from_another_thread_wakes_the_call_waiting_there(socket_path):
    # A listener closed while another thread waits in accept().
    listener = sealpass.Listener(socket_path)
    closer = wait_then(0.2, listener.close)
    started = time.monotonic()
    with pytest.raises(ValueError, match="closed"):
        listener.accept(timeout=20)
    assert time.monotonic() - started < 5
    closer.join()
    assert not os.path.exists(socket_path)

    # A connection closed while receive() waits, and a sender closed while
    # send() waits for a verdict that never comes (the receiver holds the
    # transfer unanswered); in_flight reads meanwhile.
    with sealpass.Listener(socket_path) as listener:
        sender = sealpass.Sender(socket_path, connect_timeout=20)
        connection = listener.accept(timeout=20)
        closer = wait_then(0.2, connection.close)
        with pytest.raises(ValueError, match="closed"):
            connection.receive(timeout=20)
        closer.join()

    with sealpass.Listener(socket_path) as listener:
        sender = sealpass.Sender(socket_path, connect_timeout=20)
        connection = listener.accept(timeout=20)
        seen, received = [], []
        closer = wait_then(0.3, lambda: (seen.append(sender.in_flight), sender.close()))
        receiving = threading.Thread(target=lambda: received.append(connection.receive(timeout=20)))
        receiving.start()
        started = time.monotonic()
        with pytest.raises(ValueError, match="closed"):
            sender.send({"held": b"x" * 4096})
        assert time.monotonic() - started < 5
        closer.join()
        receiving.join()
        assert seen == [1]
        received[0].close()


def test_dropping_an_unanswered_transfer_never_stops_other_threads(socket_path):
    # A peer that sends transfers and never reads the answers: once its queue
    # is full, each Reject of a dropped transfer waits for room, up to the
    # idle timeout. Other Python threads must run meanwhile.
    peer = python_child(
        """
        import fcntl, os, socket, struct, sys, time
        path = sys.argv[1]
        def transfer(id, name, size, seals):
            raw = name.encode()
            body = struct.pack("<IQQ", 0, id, 1) + struct.pack("<Q", len(raw)) + raw + struct.pack("<QI", size, seals)
            return b"SLPS" + struct.pack("<HHI", 1, 0, len(body)) + body
        fd = os.memfd_create("s", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.pwrite(fd, b"x" * 4096, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0f)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        while True:
            try:
                s.connect(path)
                break
            except OSError:
                time.sleep(0.01)
        s.settimeout(5)
        try:
            for id in range(1, 5000):
                socket.send_fds(s, [transfer(id, "s", 4096, seals)], [fd])
        except OSError:
            pass
        time.sleep(30)
        """,
        socket_path,
    )
    try:
        with sealpass.Listener(socket_path, idle_timeout=2) as listener:
            connection = listener.accept(timeout=20)
            gaps = []
            stop = threading.Event()

            def tick():
                last = time.monotonic()
                while not stop.is_set():
                    time.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = threading.Thread(target=tick)
            ticker.start()
            started = time.monotonic()
            try:
                while time.monotonic() - started < 6:
                    transfer = connection.receive(timeout=1)
                    del transfer  # unanswered: rejected as it goes
            except (TimeoutError, sealpass.SealpassError, ValueError):
                pass
            stop.set()
            ticker.join()
            assert max(gaps) < 1.0, f"another thread stopped for {max(gaps):.2f} s"
    finally:
        peer.kill()
        peer.wait()
