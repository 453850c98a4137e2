"""Protocol 1.1's metadata from Python: with segments, alone, str and bytes
values, and the rules refused before anything is sent."""
import threading

import pytest

import sealpass


def serve(socket_path, count):
    """Receives `count` transfers on one connection; returns what each held."""
    seen = []
    ready = threading.Event()

    def run():
        with sealpass.Listener(socket_path) as listener:
            ready.set()
            with listener.accept() as connection:
                for _ in range(count):
                    with connection.receive(timeout=10) as transfer:
                        seen.append(
                            (
                                transfer.version,
                                {s.name: bytes(s) for s in transfer.segments},
                                transfer.metadata,
                            )
                        )

    thread = threading.Thread(target=run)
    thread.start()
    ready.wait(10)
    return thread, seen


def test_metadata_with_segments_and_alone_arrives_intact(socket_path):
    thread, seen = serve(socket_path, 2)
    with sealpass.Sender(socket_path, connect_timeout=10) as sender:
        sender.send(
            {"frame": b"pixels"},
            metadata={"seq": "42", "raw": b"\xff\x00", "view": memoryview(b"mv")},
        )
        sender.send(metadata={"command": "flush"})
    thread.join(10)
    assert seen == [
        ((1, 1), {"frame": b"pixels"}, {"seq": b"42", "raw": b"\xff\x00", "view": b"mv"}),
        ((1, 1), {}, {"command": b"flush"}),
    ]


def test_a_transfer_without_metadata_is_a_1_0_transfer(socket_path):
    thread, seen = serve(socket_path, 1)
    sealpass.send(socket_path, {"a": b"x"}, connect_timeout=10)
    thread.join(10)
    assert seen == [((1, 0), {"a": b"x"}, {})]


@pytest.mark.parametrize(
    "segments, metadata, error, text",
    [
        ({}, {"k": 5}, TypeError, "expected str or a bytes-like object"),
        ({}, {1: "x"}, TypeError, "expected a str"),
        ({}, ["k"], TypeError, "expected a mapping"),
        ({}, {"": "x"}, sealpass.SealpassError, "empty key"),
        ({}, {"a\0b": "x"}, sealpass.SealpassError, "NUL"),
        ({}, {"k" * 256: "x"}, sealpass.SealpassError, "key of 256 bytes"),
        ({}, {"v": b"\0" * 61440}, sealpass.SealpassError, "61440"),
        ({}, {}, sealpass.SealpassError, "no segments and no metadata"),
        (None, None, sealpass.SealpassError, "no segments and no metadata"),
    ],
)
def test_metadata_that_breaks_a_rule_is_refused_before_connecting(
    socket_path, segments, metadata, error, text
):
    # Nobody listens at socket_path: a refusal here came before connecting.
    with pytest.raises(error, match=text):
        sealpass.send(socket_path, segments, metadata=metadata)


def test_arrays_travel_with_their_dtype_and_shape(socket_path):
    numpy = pytest.importorskip("numpy")
    sent = numpy.arange(24, dtype="<f4").reshape(2, 3, 4)
    got = []
    ready = threading.Event()

    def run():
        with sealpass.Listener(socket_path) as listener:
            ready.set()
            with listener.accept() as connection:
                with connection.receive(timeout=10) as transfer:
                    array = transfer.array("frame")
                    got.append((array.copy(), array.flags.writeable, transfer.metadata))
                    raw = numpy.asarray(transfer["frame"])
                    got.append((raw.dtype.str, raw.shape, raw.flags.writeable))
                    with pytest.raises(KeyError, match="no dtype"):
                        transfer.array("plain")

    thread = threading.Thread(target=run)
    thread.start()
    ready.wait(10)
    sealpass.send(socket_path, {"frame": sent, "plain": b"xy"}, connect_timeout=10)
    thread.join(10)
    (array, writeable, metadata), (typestr, shape, raw_writeable) = got
    assert array.dtype == sent.dtype and array.shape == (2, 3, 4)
    assert (array == sent).all()
    assert not writeable and not raw_writeable
    assert metadata == {"frame.dtype": b"<f4", "frame.shape": b"2,3,4"}
    assert (typestr, shape) == ("|u1", (96,))


def test_structured_dtypes_are_refused_with_advice(socket_path):
    numpy = pytest.importorskip("numpy")
    records = numpy.zeros(3, dtype=[("x", "<f4"), ("y", "<i2")])
    with pytest.raises(TypeError, match="structured dtype"):
        sealpass.send(socket_path, {"records": records})


def test_the_package_says_its_version():
    assert isinstance(sealpass.__version__, str) and sealpass.__version__.count(".") == 2


def test_fan_out_reports_each_receiver_on_its_own(tmp_path):
    sockets = [str(tmp_path / f"c{i}.sock") for i in range(3)]
    results = []
    ready = threading.Barrier(3)

    def consume(path, accept):
        with sealpass.Listener(path) as listener:
            ready.wait(10)
            with listener.accept() as connection:
                transfer = connection.receive(timeout=10)
                results.append((path, bytes(transfer["frame"]), transfer.metadata))
                transfer.ack() if accept else transfer.reject("busy")

    threads = [
        threading.Thread(target=consume, args=(sockets[0], True)),
        threading.Thread(target=consume, args=(sockets[1], False)),
    ]
    for thread in threads:
        thread.start()
    ready.wait(10)
    verdicts = sealpass.fan_out(
        sockets, {"frame": b"one copy"}, metadata={"seq": "1"}, timeout=10
    )
    for thread in threads:
        thread.join(10)
    assert verdicts[0] == 1
    assert isinstance(verdicts[1], sealpass.Rejected) and verdicts[1].message == "busy"
    assert isinstance(verdicts[2], sealpass.SealpassError)  # nobody at the third
    assert sorted(results) == [
        (sockets[0], b"one copy", {"seq": b"1"}),
        (sockets[1], b"one copy", {"seq": b"1"}),
    ]


def test_errors_are_also_the_builtin_that_fits(tmp_path):
    missing = str(tmp_path / "missing.sock")
    with pytest.raises(FileNotFoundError) as caught:
        sealpass.send(missing, {"a": b"x"})
    assert isinstance(caught.value, sealpass.SealpassError)
    import socket as stdlib_socket

    stale = str(tmp_path / "stale.sock")
    listener = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_SEQPACKET)
    listener.bind(stale)
    listener.close()  # the file stays; nobody listens
    with pytest.raises(ConnectionRefusedError):
        sealpass.send(stale, {"a": b"x"})
    with sealpass.Listener(str(tmp_path / "quiet.sock")) as quiet:
        with pytest.raises(TimeoutError) as waited:
            quiet.accept(timeout=0.05)
        assert isinstance(waited.value, sealpass.SealpassError)
    with pytest.raises(sealpass.SealpassError, match="NUL"):
        sealpass.send(str(tmp_path / "a\0b"), {"a": b"x"})
