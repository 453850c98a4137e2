#!/usr/bin/env python3
"""A sealpass receiver written from PROTOCOL.md alone, with Python's standard
library. It exists to show that the document is enough to build a conforming
peer: `cargo xtask test` runs the conformance suite against it, and, with
--skip-check, against deliberately broken variants that the suite must catch.

Usage: spec_receiver.py [--skip-check seals|name|size|fd-count|sparse]
                        [--speak-minor 0|1] --socket PATH

--speak-minor 0 makes it a 1.0 receiver (no metadata, section 8), to check
how a 1.1 sender fares with one.
"""
import argparse
import array
import errno
import fcntl
import mmap
import os
import socket
import stat
import struct

MAX_MESSAGE = 131072
MAX_BODY = MAX_MESSAGE - 12
MAX_SEGMENTS = 253
MAX_NAME = 249
MAX_REJECT = 1024
MAX_KEY = 255
MAX_METADATA = 61440
REQUIRED = 0x2 | 0x4 | 0x8  # SHRINK | GROW | WRITE
(MALFORMED, BAD_MAGIC, UNSUPPORTED_VERSION, TRUNCATED, TRAILING_BYTES, TOO_LARGE,
 CONTROL_TRUNCATED, UNEXPECTED_MESSAGE, TOO_MANY_SEGMENTS, INVALID_FIELD,
 FD_COUNT_MISMATCH, NOT_MEMFD, NAME_MISMATCH, SIZE_MISMATCH, MISSING_SEALS,
 MAP_FAILED, APPLICATION_REJECTED, RESOURCE_EXHAUSTED) = range(1, 19)
SPARSE = 23


class Refuse(Exception):
    def __init__(self, reason, message, id=0, close=False):
        super().__init__(message)
        self.reason, self.message, self.id, self.close = reason, message, id, close


class Reader:
    """Checked reads over the body: never past its end."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise Refuse(MALFORMED, f"body of {len(self.data)} bytes ends before a field of {n} at {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        raw = self.take(self.int("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Refuse(MALFORMED, f"string is not UTF-8: {e}")


def decode(data, own_minor=1):
    """Steps 3 to 6 of PROTOCOL.md section 6; returns (id, [(name, size, seals)], [(key, value)])."""
    if len(data) < 12:
        raise Refuse(TRUNCATED, f"{len(data)} bytes, shorter than the 12-byte preamble")
    magic, major, minor, body_len = struct.unpack_from("<4sHHI", data)
    if magic != b"SLPS":
        raise Refuse(BAD_MAGIC, f"magic {magic!r}; expected b'SLPS'")
    if major != 1:
        raise Refuse(UNSUPPORTED_VERSION, f"version {major}.{minor}; this side speaks 1.x", close=True)
    if body_len > MAX_BODY:
        raise Refuse(TOO_LARGE, f"body_len {body_len}; at most {MAX_BODY}")
    body = data[12:]
    if len(body) < body_len:
        raise Refuse(TRUNCATED, f"body_len {body_len} but {len(body)} bytes follow")
    if len(body) > body_len:
        raise Refuse(TRAILING_BYTES, f"body_len {body_len} but {len(body)} bytes follow")
    r = Reader(body)
    kind = r.int("<I")
    segments = []
    metadata = []
    if kind == 0:
        id = r.int("<Q")
        count = r.int("<Q")
        if count * 20 > len(body) - r.pos:  # each segment takes at least 20 bytes
            raise Refuse(MALFORMED, f"{count} segments cannot fit in the body")
        for _ in range(count):
            segments.append((r.string(), r.int("<Q"), r.int("<I")))
        if minor >= 1 and own_minor >= 1:  # section 4.3: metadata follows the segments
            entries = r.int("<Q")
            if entries * 16 > len(body) - r.pos:  # each entry takes at least 16 bytes
                raise Refuse(MALFORMED, f"{entries} metadata entries cannot fit in the body")
            for _ in range(entries):
                metadata.append((r.string(), r.take(r.int("<Q"))))
    elif kind == 1:
        id = r.int("<Q")
    elif kind == 2:
        id, _reason, _message = r.int("<Q"), r.int("<H"), r.string()
    else:
        raise Refuse(MALFORMED, f"unknown message kind {kind}")
    if r.pos != len(body) and minor <= own_minor:
        raise Refuse(MALFORMED, f"{len(body) - r.pos} bytes after the message")
    if kind == 0:
        if id == 0:
            raise Refuse(INVALID_FIELD, "transfer id 0")
        if len(segments) > MAX_SEGMENTS:
            raise Refuse(TOO_MANY_SEGMENTS, f"{len(segments)} segments; at most {MAX_SEGMENTS}", id)
        if not segments and not metadata:
            raise Refuse(INVALID_FIELD, "transfer has no segments and no metadata", id)
        for name, _, _ in segments:
            if len(name.encode()) > MAX_NAME or "\0" in name:
                raise Refuse(INVALID_FIELD, f"name {name[:40]!r}... breaks the name rules", id)
        names = [name for name, _, _ in segments]
        if len(set(names)) != len(names):
            raise Refuse(INVALID_FIELD, "two segments share a name; expected unique names", id)
        if metadata:
            size = 8 + sum(16 + len(key.encode()) + len(value) for key, value in metadata)
            if size > MAX_METADATA:
                raise Refuse(INVALID_FIELD, f"metadata of {size} bytes; at most {MAX_METADATA}", id)
            for key, _ in metadata:
                if not key or len(key.encode()) > MAX_KEY or "\0" in key:
                    raise Refuse(INVALID_FIELD, f"key {key[:40]!r} breaks the key rules", id)
            keys = [key.encode() for key, _ in metadata]
            if len(set(keys)) != len(keys):
                raise Refuse(INVALID_FIELD, "two metadata entries share a key", id)
    if kind != 0:
        raise Refuse(UNEXPECTED_MESSAGE, f"message kind {kind}; expected Transfer", id)
    return id, segments, metadata


def check_fd(index, fd, name, size, declared, skip):
    """Step 8 of PROTOCOL.md section 6; returns a mapping (or None for size 0)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or seals is None:
        raise Refuse(NOT_MEMFD, f"segment {index}: not a memfd")
    link = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
    if not (link.startswith(b"/memfd:") and link.endswith(b" (deleted)")):
        raise Refuse(NOT_MEMFD, f"segment {index}: fd is {link!r}, not a memfd")
    if "name" not in skip and link[7:-10] != name.encode():
        raise Refuse(NAME_MISMATCH, f"segment {index}: named {link[7:-10]!r}; declared {name!r}")
    if "size" not in skip and st.st_size != size:
        raise Refuse(SIZE_MISMATCH, f"segment {index}: {st.st_size} bytes; declared {size}")
    if "seals" not in skip and (declared | REQUIRED) & ~seals:
        raise Refuse(MISSING_SEALS, f"segment {index}: sealed {seals:#x}; needs {declared | REQUIRED:#x}")
    if "sparse" not in skip and st.st_blocks * 512 < st.st_size:
        raise Refuse(SPARSE, f"segment {index}: {st.st_blocks * 512} of {st.st_size} bytes allocated; holes refused")
    if st.st_size == 0:
        return None
    try:
        return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as e:
        if e.errno == errno.EPERM:  # older kernels: write-sealed memfds map privately
            return mmap.mmap(fd, st.st_size, mmap.MAP_PRIVATE, mmap.PROT_READ)
        reason = RESOURCE_EXHAUSTED if e.errno in (errno.ENOMEM, errno.EOVERFLOW) else MAP_FAILED
        raise Refuse(reason, f"segment {index}: mapping {st.st_size} bytes failed: {e}")
    except OverflowError as e:
        raise Refuse(RESOURCE_EXHAUSTED, f"segment {index}: {e}")


def frame(body):
    return b"SLPS" + struct.pack("<HHI", 1, 0, len(body)) + body


def serve_one(conn, skip, speak_minor=1):
    """Receives, checks and answers one message; returns False when the connection is over."""
    data, ancdata, flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_SEGMENTS * 4), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        return False
    mappings = []
    try:
        try:
            if flags & socket.MSG_TRUNC:
                raise Refuse(TOO_LARGE, f"message over {MAX_MESSAGE} bytes")
            if flags & socket.MSG_CTRUNC:
                raise Refuse(CONTROL_TRUNCATED, "control data truncated")
            id, segments, _metadata = decode(data, speak_minor)
            if "fd-count" not in skip and len(fds) != len(segments):
                raise Refuse(FD_COUNT_MISMATCH, f"{len(fds)} fds for {len(segments)} segments", id)
            for index, ((name, size, seals), fd) in enumerate(zip(segments, fds)):
                try:
                    mappings.append(check_fd(index, fd, name, size, seals, skip))
                except Refuse as refusal:
                    refusal.id = id
                    raise
            answer = frame(struct.pack("<IQ", 1, id))
            close = False
        except Refuse as refusal:
            message = refusal.message.encode()[:MAX_REJECT].decode("utf-8", "ignore").encode()
            answer = frame(struct.pack("<IQH", 2, refusal.id, refusal.reason) + struct.pack("<Q", len(message)) + message)
            close = refusal.close
    finally:
        for mapping in mappings:
            if mapping is not None:
                mapping.close()
        for fd in fds:
            os.close(fd)
    conn.sendmsg([answer], [], socket.MSG_NOSIGNAL)
    if close:
        close_after_answer(conn)
    return not close


def close_after_answer(conn):
    """Section 2: stop writing, then discard what is queued, so the peer reads
    the answer rather than ECONNRESET."""
    conn.shutdown(socket.SHUT_WR)
    for _ in range(64):
        try:
            data, ancdata, _, _ = conn.recvmsg(64, socket.CMSG_SPACE(MAX_SEGMENTS * 4), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            return


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--skip-check", action="append", default=[], choices=["seals", "name", "size", "fd-count", "sparse"])
    parser.add_argument("--speak-minor", type=int, default=1, choices=[0, 1])
    args = parser.parse_args()
    try:
        if stat.S_ISSOCK(os.lstat(args.socket).st_mode):
            os.unlink(args.socket)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(args.socket)
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        conn.settimeout(30)
        with conn:
            try:
                while serve_one(conn, args.skip_check, args.speak_minor):
                    pass
            except OSError:
                pass  # the peer vanished or went silent: serve the next one


if __name__ == "__main__":
    main()
