"""sealpass: hand big buffers between processes as sealed memfds.

A sender copies (or writes in place) its bytes into memfds, seals them and
passes their fds over a unix socket; the receiver checks each fd with the
kernel, maps it read-only and answers. Received segments export their pages
through the buffer protocol, read-only and without a copy::

    import numpy, sealpass

    # receiver
    with sealpass.Listener("/tmp/frames.sock") as listener:
        with listener.accept() as connection:
            for transfer in connection:
                with transfer:  # acks on exit (rejects if an exception escapes)
                    frame = transfer.array("frame")  # read-only, dtype and shape as sent

    # sender, in another process
    sealpass.send("/tmp/frames.sock", {"frame": numpy.zeros((480, 640, 3), numpy.uint8)})

The protocol, and every check the receiver makes, is the Rust crates'
(see PROTOCOL.md); this package binds them.
"""

from ._sealpass import (
    __version__,
    REJECT_REASONS,
    RECEIVER_REQUIRED_SEALS,
    SENDER_DEFAULT_SEALS,
    Connection,
    DeliveryUnknown,
    Listener,
    Peer,
    ReceivedSegment,
    ReceiverNotFoundError,
    ReceiverRefusedError,
    Rejected,
    SealpassError,
    SealpassTimeoutError,
    SocketPermissionError,
    Segment,
    SegmentWriter,
    Sender,
    Transfer,
    fan_out,
    send,
)
from ._empty import empty

__all__ = [
    "__version__",
    "REJECT_REASONS",
    "RECEIVER_REQUIRED_SEALS",
    "SENDER_DEFAULT_SEALS",
    "Connection",
    "DeliveryUnknown",
    "Listener",
    "Peer",
    "ReceivedSegment",
    "ReceiverNotFoundError",
    "ReceiverRefusedError",
    "Rejected",
    "SealpassError",
    "SealpassTimeoutError",
    "SocketPermissionError",
    "Segment",
    "SegmentWriter",
    "Sender",
    "Transfer",
    "empty",
    "fan_out",
    "send",
]
