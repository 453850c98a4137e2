"""Zero-copy, read-only views of received segments; how long mappings live;
filling a segment in place."""
import os
import subprocess
import threading

import numpy
import pytest

import sealpass
from conftest import finish, python_child

SIZE = 64 << 20


def test_64_mib_numpy_array_round_trips_bit_exact_with_no_copy(socket_path):
    sender = python_child(
        """
        import sys, numpy, sealpass
        array = numpy.random.default_rng(2026).standard_normal(8 << 20)  # 64 MiB of float64
        assert array.nbytes == 64 << 20
        print(sealpass.send(sys.argv[1], {"array": array}, connect_timeout=20))
        """,
        socket_path,
        stdout=subprocess.PIPE,
    )
    expected = numpy.random.default_rng(2026).standard_normal(8 << 20)
    with sealpass.Listener(socket_path) as listener, listener.accept(timeout=20) as connection:
        with connection.receive(timeout=20) as transfer:
            segment = transfer["array"]
            array = numpy.frombuffer(segment, dtype=numpy.float64)
            assert segment.size == SIZE == array.nbytes
            # The array's buffer is the mapping itself...
            start = array.__array_interface__["data"][0]
            assert segment.address <= start and start + array.nbytes <= segment.address + segment.size
            assert numpy.shares_memory(array, numpy.frombuffer(segment, dtype=numpy.uint8))
            # ...read-only, from numpy and from a memoryview alike...
            assert not array.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                array[0] = 1.0
            with pytest.raises(TypeError, match="read-only"):
                memoryview(segment)[0] = 1
            with pytest.raises(ValueError, match="WRITEABLE"):
                # The array cannot be made writable: the buffer refuses.
                numpy.frombuffer(segment, dtype=numpy.uint8).setflags(write=True)
            # ...and bit-exact.
            assert numpy.array_equal(array, expected)
            assert array.tobytes() == expected.tobytes()
            del array
    assert finish(sender) == 0
    assert sender.stdout.read().decode().strip() == "1"


def _one_transfer(socket_path, segments):
    """Starts a sender thread for `segments`; returns it and its results."""
    results = []
    thread = threading.Thread(
        target=lambda: results.append(sealpass.send(socket_path, segments, connect_timeout=20))
    )
    thread.start()
    return thread, results


def test_a_view_that_outlives_its_transfer_keeps_the_mapping_and_the_last_one_releases_it(socket_path):
    with sealpass.Listener(socket_path) as listener:
        thread, results = _one_transfer(socket_path, {"a": b"A" * 8192, "b": b"B" * 4096})
        with listener.accept(timeout=20) as connection:
            transfer = connection.receive(timeout=20)
            assert connection.mapped == 12288
            view = memoryview(transfer["a"])
            array = numpy.frombuffer(transfer["b"], dtype=numpy.uint8)
            with transfer:  # acks, releases what no view holds
                pass
            thread.join()
            assert results == [1]
            del transfer
            # Both segments have views: both mappings stay, readable.
            assert connection.mapped == 12288
            assert view[:2] == b"AA" and bytes(array[-2:]) == b"BB"
            del array
            assert connection.mapped == 8192
            second = view[4096:]  # a view of the view: still the same export
            view.release()
            assert connection.mapped == 8192
            assert second[-1] == ord("A")
            second.release()
            # The last view went: the budget is back to zero.
            assert connection.mapped == 0


def test_release_refuses_while_a_view_is_open_and_closed_segments_say_so(socket_path):
    with sealpass.Listener(socket_path) as listener:
        thread, _ = _one_transfer(socket_path, {"a": b"A" * 4096})
        with listener.accept(timeout=20) as connection, connection.receive(timeout=20) as transfer:
            segment = transfer["a"]
            view = memoryview(segment)
            with pytest.raises(BufferError, match="1 view"):
                segment.release()
            view.release()
            segment.release()
            assert segment.released and connection.mapped == 0
            with pytest.raises(ValueError, match="released"):
                memoryview(segment)
        thread.join()


def test_a_transfer_dropped_unanswered_is_rejected_and_an_exception_in_its_block_rejects_it(socket_path):
    with sealpass.Listener(socket_path) as listener:
        errors = []

        def send_two():
            with sealpass.Sender(socket_path, connect_timeout=20, answer_timeout=20) as sender:
                for _ in range(2):
                    try:
                        sender.send({"a": b"x"})
                    except sealpass.Rejected as rejected:
                        errors.append((rejected.id, rejected.reason, rejected.message))

        thread = threading.Thread(target=send_two)
        thread.start()
        with listener.accept(timeout=20) as connection:
            with pytest.raises(RuntimeError):
                with connection.receive(timeout=20):
                    raise RuntimeError("frame too dark")
            transfer = connection.receive(timeout=20)
            del transfer
            thread.join()
            assert connection.mapped == 0
    assert errors == [
        (1, "ApplicationRejected", "frame too dark"),
        (2, "ApplicationRejected", "the receiving application dropped the transfer without answering"),
    ]


def test_a_segment_filled_in_place_seals_only_once_every_view_is_gone(socket_path):
    writer = sealpass.SegmentWriter("frame", 1 << 20)
    pixels = numpy.frombuffer(writer, dtype=numpy.uint32)
    assert pixels.flags.writeable and not pixels.any()  # zeroed
    pixels[:] = 0xDEADBEEF
    with pytest.raises(BufferError, match="still open"):
        writer.seal()
    del pixels
    segment = writer.seal()
    assert {"SEAL", "SHRINK", "GROW", "WRITE"} <= segment.seals
    with pytest.raises(ValueError, match="sealed"):
        memoryview(writer)
    with sealpass.Listener(socket_path) as listener:
        thread, results = _one_transfer(socket_path, [segment])
        with listener.accept(timeout=20) as connection, connection.receive(timeout=20) as transfer:
            received = numpy.frombuffer(transfer["frame"], dtype=numpy.uint32)
            assert (received == 0xDEADBEEF).all()
            del received
        thread.join()
    assert results == [1]


def test_a_received_segment_is_forwarded_untouched(tmp_path):
    first, second = str(tmp_path / "first.sock"), str(tmp_path / "second.sock")
    with sealpass.Listener(first) as one, sealpass.Listener(second) as two:
        thread, _ = _one_transfer(first, {"frame": b"forward me"})
        with one.accept(timeout=20) as connection, connection.receive(timeout=20) as transfer:
            onward = transfer["frame"].to_segment()
            assert (onward.name, onward.size) == ("frame", 10)
            again = sealpass.Segment.from_sealed_fd(transfer["frame"].fileno())
            forward, results = _one_transfer(second, [onward])
            with two.accept(timeout=20) as next_hop, next_hop.receive(timeout=20) as forwarded:
                assert bytes(forwarded["frame"]) == b"forward me"
            forward.join()
            assert results == [1] and again.size == 10
        thread.join()


@pytest.mark.parametrize(
    "segments, error, text",
    [
        ({"strided": numpy.arange(64, dtype=numpy.uint8)[::2]}, ValueError, "C-contiguous"),
        ({"number": 42}, TypeError, "bytes-like"),
        ({}, sealpass.SealpassError, "no segments"),
        ({"nul\0": b"x"}, sealpass.SealpassError, "NUL"),
        ({"a/b" * 100: b"x"}, sealpass.SealpassError, "name"),
        (["not a segment"], TypeError, "Segments"),
        (42, TypeError, "mapping"),
        # Pointers mean nothing in another process and show this one's memory.
        ({"o": numpy.array([1, "a", None], dtype=object)}, TypeError, "holds pointers"),
        ({"s": numpy.zeros(2, dtype=[("x", "f8"), ("o", "O")])}, TypeError, "holds pointers"),
        ({"p": memoryview(bytearray(16)).cast("P")}, TypeError, "holds pointers"),
    ],
)
def test_bad_arguments_raise_typed_errors_before_connecting(tmp_path, segments, error, text):
    with pytest.raises(error, match=text):
        sealpass.send(str(tmp_path / "nobody.sock"), segments)


def test_from_file_refuses_what_has_no_length_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # /dev/zero would fill memory; a FIFO with no writer would block for ever.
    for path, found in [("/dev/zero", "character device"), (fifo, "FIFO")]:
        with pytest.raises(sealpass.SealpassError, match=f"{found}, not a regular file"):
            sealpass.Segment.from_file("s", path)


def test_plain_data_of_any_format_is_taken_whatever_its_field_names():
    # A field named like a pointer code is a name, not a pointer.
    records = numpy.zeros(3, dtype=[("Ox", "f8"), ("P&", "i4")])
    assert sealpass.Segment.from_buffer("records", records).size == records.nbytes
    for array in [numpy.arange(5, dtype=numpy.float32), numpy.zeros((2, 3), dtype=numpy.complex128)]:
        assert sealpass.Segment.from_buffer("array", array).size == array.nbytes


def test_seals_are_checked_and_spelled_as_the_cli_spells_them():
    segment = sealpass.Segment.from_buffer("s", b"x", seals=["shrink", "GROW", "F_SEAL_WRITE"])
    assert {"SHRINK", "GROW", "WRITE"} <= segment.seals and "SEAL" not in segment.seals
    with pytest.raises(ValueError, match="unknown seal"):
        sealpass.Segment.from_buffer("s", b"x", seals="shrink,glue")


def _hugetlb_room():
    """Huge pages free for new memfds and their size in bytes, from /proc/meminfo."""
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0])
    if "HugePages_Free" not in fields:
        return 0, 0
    return fields["HugePages_Free"] - fields["HugePages_Rsvd"], fields["Hugepagesize"] * 1024


def test_hugetlb_is_taken_where_the_pool_has_room_and_the_bytes_arrive_either_way(socket_path, tmp_path):
    size = 2 << 20

    def pool_takes_one():
        room, page = _hugetlb_room()
        return page == size and room >= 1

    expected_pages = [pool_takes_one()]
    with sealpass.SegmentWriter("written", size, hugetlb=True) as writer:
        assert writer.hugetlb == expected_pages[0]
        numpy.frombuffer(writer, dtype=numpy.uint8)[:] = 7
        written = writer.seal()
    expected_pages.append(pool_takes_one())
    copied = sealpass.Segment.from_buffer("copied", b"c" * size, hugetlb=True)
    path = tmp_path / "file.bin"
    path.write_bytes(b"f" * size)
    expected_pages.append(pool_takes_one())
    from_file = sealpass.Segment.from_file("file", path, hugetlb=True)
    odd = sealpass.Segment.from_buffer("odd", b"o" * 5000, hugetlb=True)
    plain = sealpass.Segment.from_buffer("plain", b"p" * size)
    got = [s.hugetlb for s in (written, copied, from_file, odd, plain)]
    assert got == expected_pages + [False, False], _hugetlb_room()
    with sealpass.Listener(socket_path) as listener:
        segments = [written, copied, from_file, odd, plain]
        thread, results = _one_transfer(socket_path, segments)
        with listener.accept(timeout=20) as connection, connection.receive(timeout=20) as transfer:
            expected = {"written": b"\x07" * size, "copied": b"c" * size, "file": b"f" * size,
                        "odd": b"o" * 5000, "plain": b"p" * size}
            for name, data in expected.items():
                assert bytes(memoryview(transfer[name])) == data, name
        thread.join()
    assert results == [1]
