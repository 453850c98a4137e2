"""`sealpass.empty`: an array filled in place, sealed in place when sent whole."""
import numpy
import pytest

import sealpass
from test_buffers import _one_transfer


def mapping_of(address):
    """The line of /proc/self/maps that holds `address`: (perms, inode, path)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) > 5 else ""
                return fields[1], int(fields[4]), path
    raise AssertionError(f"nothing is mapped at {address:#x}")


def address(array):
    return array.__array_interface__["data"][0]


def receive_one(listener):
    """Accepts one connection and its one transfer, answered: (connection, transfer)."""
    connection = listener.accept(timeout=20)
    return connection, connection.receive(timeout=20)


def test_an_empty_array_is_sent_whole_without_a_copy_and_later_writes_stay_private(socket_path):
    frame = sealpass.empty((512, 1024), "<f4", name="frame")  # 2 MiB
    assert frame.flags.writeable and frame.dtype == numpy.dtype("<f4")
    assert frame.shape == (512, 1024) and not frame.any()  # zeroed
    assert mapping_of(address(frame))[2].startswith("/memfd:frame")
    pattern = numpy.arange(frame.size, dtype="<f4").reshape(frame.shape)
    frame[:] = pattern
    with sealpass.Listener(socket_path) as listener:
        thread, results = _one_transfer(socket_path, {"frame": frame})
        connection, transfer = receive_one(listener)
        with connection, transfer:
            received = transfer.array("frame")
            assert received.dtype == frame.dtype and received.shape == frame.shape
            assert numpy.array_equal(received, pattern)
            # One memfd: the receiver maps the very inode whose pages the
            # sender's array shows, now privately (copy-on-write).
            perms, inode, path = mapping_of(address(frame))
            assert path.startswith("/memfd:frame") and perms.endswith("p"), perms
            assert mapping_of(address(received))[1] == inode
            # A write after the send stays the sender's: the sealed bytes hold.
            frame[0, :4] = -1.0
            assert list(frame[0, :4]) == [-1.0] * 4
            assert numpy.array_equal(received, pattern)
            del received
        thread.join()
        assert results == [1]
        # Sent again, it is copied: the receiver sees the sender's writes.
        thread, results = _one_transfer(socket_path, {"frame": frame})
        connection, transfer = receive_one(listener)
        with connection, transfer:
            again = transfer.array("frame")
            assert list(again[0, :4]) == [-1.0] * 4
            assert mapping_of(address(again))[1] != inode
            del again
        thread.join()
        assert results == [1]
    # The pages stay the array's until it goes; then nothing is left mapped.
    start = address(frame)
    del frame
    with pytest.raises(AssertionError, match="nothing is mapped"):
        mapping_of(start)


@pytest.mark.parametrize("how", ["a slice", "another key"])
def test_an_empty_array_sent_in_part_is_copied_and_under_another_key_refused(socket_path, how):
    frame = sealpass.empty(8192, "u1", name="frame")
    frame[:] = 7
    if how == "another key":
        with pytest.raises(ValueError, match="cannot change"):
            sealpass.send(socket_path, {"other": frame}, connect_timeout=0.1)
    else:
        with sealpass.Listener(socket_path) as listener:
            thread, results = _one_transfer(socket_path, {"frame": frame[4096:]})
            connection, transfer = receive_one(listener)
            with connection, transfer:
                assert transfer["frame"].size == 4096
            thread.join()
            assert results == [1]
    # Either way the array is still the writable, unsealed memfd's.
    perms, _, path = mapping_of(address(frame))
    assert path.startswith("/memfd:frame") and perms.endswith("s"), perms
    frame[0] = 9
    with sealpass.Listener(socket_path) as listener:
        thread, results = _one_transfer(socket_path, {"frame": frame})
        connection, transfer = receive_one(listener)
        with connection, transfer:
            assert bytes(transfer["frame"])[:2] == b"\x09\x07"
        thread.join()
        assert results == [1]
    assert mapping_of(address(frame))[0].endswith("p")


def test_empty_takes_numpys_shapes_and_dtypes_and_refuses_what_numpy_refuses():
    assert sealpass.empty(3, name="x").dtype == numpy.float64
    assert sealpass.empty((2, 0, 3), "i2", name="x").shape == (2, 0, 3)
    assert sealpass.empty((), "u8", name="x").shape == ()
    with pytest.raises(ValueError, match="negative"):
        sealpass.empty((2, -1), name="x")
    with pytest.raises(TypeError):
        sealpass.empty(4, "not a dtype", name="x")
    with pytest.raises(sealpass.SealpassError, match="name"):
        sealpass.empty(4, name="a/b" * 200)
