"""`sealpass.empty`: a numpy array whose bytes are a fresh memfd's pages."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._sealpass import SegmentWriter

if TYPE_CHECKING:
    import numpy
    import numpy.typing


def empty(
    shape: int | tuple[int, ...],
    dtype: numpy.typing.DTypeLike = float,
    *,
    name: str,
) -> numpy.ndarray[Any, numpy.dtype[Any]]:
    """A new writable array of `shape` and `dtype`, zeroed, whose bytes are the pages
    of a new memfd named `name` (a SegmentWriter's): fill it in place, then send it
    without a copy.

    `send(path, {name: array})` (or `Sender.send`, `fan_out`) seals the memfd in place
    when it sends the array whole: no byte is copied, and the array stays usable. From
    then on it is this process's private copy-on-write view of the sealed bytes:
    reading costs nothing more, and a write copies the page it touches into this
    process's memory and never reaches a receiver. Sent again, or sent in part (a
    slice), it is copied like any other array. The key must be `name`, the memfd's
    name (ValueError otherwise).

    The pages are transparent huge pages where the machine's shmem setting allows
    (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`: `advise` or `always`).
    Needs numpy.
    """
    try:
        import numpy
    except ImportError as error:
        raise ImportError("sealpass.empty needs numpy (pip install numpy)") from error
    layout = numpy.dtype(dtype)
    dims = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    if any(n < 0 for n in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    count = math.prod(dims)
    writer = SegmentWriter(name, count * layout.itemsize)
    return numpy.frombuffer(memoryview(writer), dtype=layout, count=count).reshape(dims)
