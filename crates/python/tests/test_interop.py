"""Python against the command-line programs, and Python against Python in
two processes."""
import json
import subprocess
import sys

import numpy
import pytest

import sealpass
from conftest import EXAMPLES, finish, python_child, wait_for_socket


def test_python_sender_to_sealpass_recv(bin_dir, socket_path, tmp_path):
    out = tmp_path / "out"
    receiver = subprocess.Popen(
        [bin_dir / "sealpass-recv", "--socket", socket_path, "--once", "--json", "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        frame = numpy.random.default_rng(7).integers(0, 256, 3 << 20, dtype=numpy.uint8)
        transfer_id = sealpass.send(
            socket_path, {"frame": frame, "caption": b"hello"}, connect_timeout=20
        )
        assert transfer_id == 1
        assert finish(receiver) == 0
    finally:
        receiver.kill()
    (line,) = receiver.stdout.read().decode().splitlines()
    record = json.loads(line)
    assert [s["name"] for s in record["segments"]] == ["frame", "caption"]
    assert (out / "frame").read_bytes() == frame.tobytes()
    assert (out / "caption").read_bytes() == b"hello"


def test_sealpass_recv_rejects_a_python_sender_with_a_typed_error(bin_dir, socket_path):
    receiver = subprocess.Popen(
        [bin_dir / "sealpass-recv", "--socket", socket_path], stderr=subprocess.DEVNULL
    )
    try:
        wait_for_socket(socket_path, receiver)
        with pytest.raises(sealpass.Rejected) as raised:
            # Without WRITE the bytes could change under the reader.
            sealpass.send(socket_path, {"loose": b"x" * 4096}, seals="seal,shrink,grow")
        assert raised.value.reason == "MissingSeals"
        assert raised.value.code == dict((n, c) for c, n in sealpass.REJECT_REASONS)["MissingSeals"]
        assert raised.value.id == 1
        assert "WRITE" in raised.value.message
    finally:
        receiver.terminate()
        finish(receiver)


def test_sealpass_send_to_python_receiver(bin_dir, socket_path):
    receiver = python_child(
        """
        import sys, sealpass
        with sealpass.Listener(sys.argv[1]) as listener:
            with listener.accept(timeout=20) as connection:
                transfer = connection.receive(timeout=20)
                with transfer:
                    print(transfer.id, [(s.name, s.size, bytes(s)[:3], sorted(s.seals)) for s in transfer])
        """,
        socket_path,
        stdout=subprocess.PIPE,
    )
    sent = subprocess.run(
        [bin_dir / "sealpass-send", "--socket", socket_path, "--connect-timeout", "20",
         "--fill", "a=A:4MiB", "--fill", "b=0x42:3"],
        capture_output=True,
    )
    assert sent.returncode == 0, sent.stderr
    assert finish(receiver) == 0
    printed = receiver.stdout.read().decode()
    assert printed.startswith("1 [('a', 4194304, b'AAA', [")
    assert "('b', 3, b'BBB'" in printed


def test_python_to_python_across_processes(socket_path):
    receiver = python_child(
        """
        import sys, numpy, sealpass
        with sealpass.Listener(sys.argv[1]) as listener, listener.accept(timeout=20) as connection:
            for transfer in connection:
                with transfer:
                    total = sum(int(numpy.frombuffer(s, numpy.uint8).sum(dtype=numpy.uint64)) for s in transfer)
                    print(transfer.id, len(transfer), total, flush=True)
        """,
        socket_path,
        stdout=subprocess.PIPE,
    )
    with sealpass.Sender(socket_path, connect_timeout=20, answer_timeout=20) as sender:
        for n in range(1, 17):  # pipelined: 16 in flight
            assert sender.submit({"ones": numpy.ones(n * 4096, numpy.uint8)}) == n
        assert sender.in_flight == 16
        assert [sender.next_verdict() for _ in range(16)] == list(range(1, 17))
        assert sender.in_flight == 0
        assert sender.send({"a": b"\x01" * 10, "b": b"\x02" * 10}) == 17
    assert finish(receiver) == 0
    lines = receiver.stdout.read().decode().splitlines()
    assert lines[:2] == ["1 1 4096", "2 1 8192"]
    assert lines[-1] == "17 2 30"


def test_the_example_programs_talk(socket_path):
    receiver = subprocess.Popen(
        [sys.executable, EXAMPLES / "receiver.py", "--socket", socket_path, "--once"],
        stdout=subprocess.PIPE,
    )
    sent = subprocess.run(
        [sys.executable, EXAMPLES / "sender.py", "--socket", socket_path, "--size", "65536"],
        capture_output=True,
        text=True,
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == "transfer 1 accepted\n"
    assert finish(receiver) == 0
    names = [line.split()[5] for line in receiver.stdout.read().decode().splitlines()]
    assert names == ["frame", "caption", "in-place"]
