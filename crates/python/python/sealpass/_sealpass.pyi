"""Type stubs for sealpass's compiled core (re-exported by `sealpass`)."""

from collections.abc import Iterable, Iterator, Mapping
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeAlias, final, overload

from typing_extensions import Buffer, Self

__version__: str

__all__ = [
    "__version__",
    "Connection",
    "DeliveryUnknown",
    "Listener",
    "Peer",
    "REJECT_REASONS",
    "RECEIVER_REQUIRED_SEALS",
    "ReceivedSegment",
    "ReceiverNotFoundError",
    "ReceiverRefusedError",
    "Rejected",
    "SENDER_DEFAULT_SEALS",
    "SealpassError",
    "SealpassTimeoutError",
    "SocketPermissionError",
    "Segment",
    "SegmentWriter",
    "Sender",
    "Transfer",
    "fan_out",
    "send",
]

_Seals: TypeAlias = str | Iterable[str]
"""Seal names, case-insensitive, optionally F_SEAL_-prefixed: "shrink,grow,write",
"SHRINK|GROW", or an iterable of names. "none" or "" for none."""

class _ArrayLike(Protocol):
    """What numpy arrays offer whatever the Python version (their stubs declare
    `__buffer__` only for 3.12+)."""

    @property
    def __array_interface__(self) -> dict[str, Any]: ...

_Bytes: TypeAlias = Buffer | _ArrayLike
"""Anything exporting the buffer protocol as one C-contiguous run: bytes, bytearray,
memoryview, mmap, numpy arrays. Anything else (an int, a str) is refused by the type
checker, and at run time (TypeError, or the exporter's own error)."""

_SegmentMap: TypeAlias = Mapping[str, _Bytes | Segment]
"""One transfer's segments by name: buffers (copied into new memfds) or Segments."""

_SegmentList: TypeAlias = Iterable[Segment] | Segment
"""One transfer's segments made beforehand: an iterable of Segments, or one Segment.
(Separate overloads from _SegmentMap, so that a dict of mixed buffers type-checks.)"""

_Metadata: TypeAlias = Mapping[str, str | Buffer]
"""A transfer's own fields (protocol 1.1): str keys (1 to 255 bytes, no NUL) to str
values (sent as UTF-8) or bytes-like values; at most 61440 bytes encoded."""

REJECT_REASONS: list[tuple[int, str]]
"""Every reject reason this version knows, as (code, name), from PROTOCOL.md."""
SENDER_DEFAULT_SEALS: frozenset[str]
"""The seals a sender applies unless told otherwise: SEAL, SHRINK, GROW, WRITE."""
RECEIVER_REQUIRED_SEALS: frozenset[str]
"""The seals a receiver requires unless told otherwise: SHRINK, GROW, WRITE."""

class SealpassError(Exception):
    """Anything sealpass could not do: connecting, sending, receiving, making a segment."""

class ReceiverNotFoundError(SealpassError, FileNotFoundError):
    """A SealpassError that is also a FileNotFoundError: no socket at the path."""

class ReceiverRefusedError(SealpassError, ConnectionRefusedError):
    """A SealpassError that is also a ConnectionRefusedError: nobody listens there."""

class SocketPermissionError(SealpassError, PermissionError):
    """A SealpassError that is also a PermissionError: the socket's mode refuses."""

class SealpassTimeoutError(SealpassError, TimeoutError):
    """A SealpassError that is also a TimeoutError: a wait ran out."""

class Rejected(SealpassError):
    """The receiver refused the transfer."""

    id: int
    """The transfer's id (0 if the receiver could not read it)."""
    reason: str
    """The reason's name, as in PROTOCOL.md ("MissingSeals", "ApplicationRejected", ...)."""
    code: int
    """The reason's number."""
    message: str
    """The receiver's explanation."""

class DeliveryUnknown(SealpassError):
    """The receiver closed the connection after the transfer was sent and before it
    answered: whether it consumed the transfer is unknown."""

    id: int

@final
class Segment:
    """A memfd, filled and sealed, ready to send (any number of times)."""

    @staticmethod
    def from_buffer(
        name: str, data: _Bytes, seals: _Seals | None = None, *, hugetlb: bool = False
    ) -> Segment:
        """A copy of `data` (C-contiguous) in a new memfd, sealed (default SEAL, SHRINK,
        GROW, WRITE). The copy runs without the GIL. hugetlb=True takes the hugetlb
        pool where the machine can (whole 2 MiB pages, room in the pool)."""
    @staticmethod
    def from_file(
        name: str, path: str | PathLike[str], seals: _Seals | None = None, *, hugetlb: bool = False
    ) -> Segment:
        """The bytes of the file at `path`, copied without the heap (in the kernel, or into
        a huge-page mapping where shmem THP is advise), sealed. hugetlb=True as for
        from_buffer."""
    @staticmethod
    def from_sealed_fd(fd: int, required: _Seals | None = None) -> Segment:
        """A sealed memfd received elsewhere, to forward untouched (the fd is duplicated).
        Its seals must include `required` (default SHRINK, GROW, WRITE)."""
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def seals(self) -> frozenset[str]:
        """The seals the kernel reports (may be more than asked: EXEC)."""
    @property
    def hugetlb(self) -> bool:
        """Whether the pages come from the hugetlb pool, as the kernel reports it."""
    def fileno(self) -> int:
        """The memfd's fd (still this segment's)."""
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

@final
class SegmentWriter:
    """A memfd filled in place through a writable buffer (memoryview, numpy.frombuffer),
    zeroed to start with. seal() raises BufferError while any view is open; sending a
    view of all its pages (sealpass.empty's arrays) seals it in place instead."""

    def __new__(cls, name: str, size: int, *, hugetlb: bool = False) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def hugetlb(self) -> bool:
        """Whether the pages come from the hugetlb pool (hugetlb=True, and the machine could)."""
    def seal(self, seals: _Seals | None = None) -> Segment:
        """Unmaps the pages, seals the memfd, returns the Segment to send."""
    def close(self) -> None:
        """Discards the memfd unsealed (BufferError while a view is open)."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    def __len__(self) -> int: ...
    # The buffer protocol (PEP 688); Python 3.12 and later also show it as these methods.
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, view: memoryview, /) -> None: ...

@final
class Sender:
    """A connection to a receiver. Transfer ids count up from 1."""

    def __new__(
        cls,
        path: str | PathLike[str],
        *,
        connect_timeout: float | None = None,
        answer_timeout: float | None = None,
    ) -> Self:
        """Connects; with `connect_timeout`, retries while the receiver is not up yet.
        `answer_timeout` bounds each verdict wait (TimeoutError)."""
    @overload
    def send(
        self,
        segments: _SegmentMap,
        *,
        seals: _Seals | None = None,
        metadata: _Metadata | None = None,
    ) -> int: ...
    @overload
    def send(
        self,
        segments: _SegmentList | None = None,
        *,
        seals: _Seals | None = None,
        metadata: _Metadata | None = None,
    ) -> int: ...

    @overload
    def submit(
        self,
        segments: _SegmentMap,
        *,
        seals: _Seals | None = None,
        metadata: _Metadata | None = None,
    ) -> int: ...
    @overload
    def submit(
        self,
        segments: _SegmentList | None = None,
        *,
        seals: _Seals | None = None,
        metadata: _Metadata | None = None,
    ) -> int: ...

    def next_verdict(self, timeout: float | None = None) -> int:
        """The oldest transfer's verdict: its id if accepted; raises Rejected, or
        TimeoutError (the transfer stays in flight)."""
    @property
    def in_flight(self) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

@overload
def send(
    path: str | PathLike[str],
    segments: _SegmentMap,
    *,
    seals: _Seals | None = None,
    metadata: _Metadata | None = None,
    connect_timeout: float | None = None,
    answer_timeout: float | None = None,
) -> int: ...
@overload
def send(
    path: str | PathLike[str],
    segments: _SegmentList | None = None,
    *,
    seals: _Seals | None = None,
    metadata: _Metadata | None = None,
    connect_timeout: float | None = None,
    answer_timeout: float | None = None,
) -> int: ...


@overload
def fan_out(
    paths: Iterable[str | PathLike[str]],
    segments: _SegmentMap,
    *,
    seals: _Seals | None = None,
    metadata: _Metadata | None = None,
    timeout: float = 60.0,
) -> list[int | SealpassError]: ...
@overload
def fan_out(
    paths: Iterable[str | PathLike[str]],
    segments: _SegmentList | None = None,
    *,
    seals: _Seals | None = None,
    metadata: _Metadata | None = None,
    timeout: float = 60.0,
) -> list[int | SealpassError]: ...


@final
class Peer:
    """The sending process, as the kernel recorded it at connect (SO_PEERCRED)."""

    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...

@final
class ReceivedSegment:
    """A verified segment, mapped read-only; exports its pages read-only without a copy.
    The mapping lives until the segment is released and its last view is gone."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def seals(self) -> frozenset[str]: ...
    @property
    def address(self) -> int:
        """Where the mapping starts (0 for an empty segment)."""
    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's array interface: the bytes, read-only, as one dimension of u1."""
    @property
    def released(self) -> bool: ...
    def fileno(self) -> int:
        """The sealed memfd's fd (still this segment's)."""
    def to_segment(self) -> Segment:
        """The same sealed memfd as a Segment, to forward (the fd is duplicated)."""
    def release(self) -> None:
        """Unmaps now; BufferError while a view is open."""
    def __len__(self) -> int: ...
    # The buffer protocol (PEP 688); Python 3.12 and later also show it as these methods.
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, view: memoryview, /) -> None: ...

@final
class Transfer:
    """A transfer whose every segment the kernel vouched for. As a context manager it
    answers on exit (ack, or reject with the escaping exception) and releases its
    segments. Dropped unanswered, it is rejected."""

    @property
    def id(self) -> int: ...
    @property
    def version(self) -> tuple[int, int]: ...
    def array(self, name: str) -> Any:
        """Segment `name` as a read-only numpy array, without a copy, of the dtype and
        shape its sender recorded (NAME.dtype, NAME.shape; `send` records them for
        numpy arrays). KeyError without them; ValueError when they do not fit."""
    @property
    def metadata(self) -> dict[str, bytes]:
        """The sender's own fields (protocol 1.1), in the order sent; a value sent as
        str arrives as its UTF-8 bytes."""
    @property
    def peer(self) -> Peer | None: ...
    def peer_pidfd(self) -> int | None:
        """A new pidfd for the sending process (Linux 6.5+; None before, and after
        close()), owned by the caller (os.close it). It polls readable once that process
        has exited."""
    @property
    def segments(self) -> tuple[ReceivedSegment, ...]: ...
    @property
    def total_bytes(self) -> int: ...
    @property
    def answered(self) -> bool: ...
    def ack(self) -> None: ...
    def reject(self, message: str) -> None: ...
    def close(self) -> None:
        """Releases every segment (one with open views goes with its last view) and
        closes the transfer's pidfd."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, name: str, /) -> ReceivedSegment: ...
    def __contains__(self, name: str, /) -> bool: ...
    def __iter__(self) -> Iterator[ReceivedSegment]: ...

@final
class Connection:
    """One sender's connection. Iterating yields transfers until the sender closes."""

    def receive(self, timeout: float | None = None) -> Transfer | None:
        """The next verified transfer; None once the sender closed. TimeoutError after
        `timeout` seconds; Ctrl-C raises KeyboardInterrupt."""
    @property
    def refused(self) -> int:
        """Messages refused (and answered) on this connection so far."""
    @property
    def is_open(self) -> bool: ...
    @property
    def mapped(self) -> int:
        """Bytes this connection's segments hold mapped right now."""
    @property
    def peer(self) -> Peer | None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    def __iter__(self) -> Self: ...
    def __next__(self) -> Transfer: ...

@final
class Listener:
    """Listens at a socket path (0600); closing removes the socket file. Iterating
    yields connections for ever."""

    def __new__(
        cls,
        path: str | PathLike[str],
        *,
        required_seals: _Seals | None = None,
        max_segments: int | None = None,
        max_mapped: int | None = None,
        idle_timeout: float | None = None,
        refuse_sparse: bool = True,
    ) -> Self: ...
    @property
    def path(self) -> Path: ...
    def accept(self, timeout: float | None = None) -> Connection:
        """The next sender's connection. TimeoutError after `timeout` seconds; Ctrl-C
        raises KeyboardInterrupt."""
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    def __iter__(self) -> Self: ...
    def __next__(self) -> Connection: ...
