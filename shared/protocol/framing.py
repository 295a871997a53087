"""Sans-io framing for the local socket: 4-byte big-endian length + msgpack body.

:class:`FrameBuffer` accepts bytes in any chunking and yields complete frame
bodies; it never touches a socket, so the daemon (trio) and the CLI
(blocking ``socket``) share it.  Oversize lengths are refused *before* the
body is buffered, so a hostile peer cannot make us hold more than one frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

from . import errors
from .errors import LocalProtocolError, RemoteProtocolError

#: Largest body one IPC frame may carry (architecture.md section 6).
MAX_IPC_FRAME: Final = 1024 * 1024
HEADER: Final = struct.Struct(">I")


def frame_bytes(body: bytes, *, max_frame: int = MAX_IPC_FRAME) -> bytes:
    """Prefix ``body`` with its length; refuse bodies over ``max_frame``."""
    if len(body) > max_frame:
        raise LocalProtocolError(
            errors.FRAME_TOO_LARGE, f"frame of {len(body)} bytes exceeds {max_frame}"
        )
    return HEADER.pack(len(body)) + body


class FrameBuffer:
    """Accumulates stream bytes and splits them into frame bodies.

    After a :class:`RemoteProtocolError` the stream is out of sync and the
    buffer stays broken: every later call raises the same error, because the
    only safe thing left is to close the connection.
    """

    __slots__ = ("_buf", "_error", "_max")

    def __init__(self, *, max_frame: int = MAX_IPC_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._error: RemoteProtocolError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame body it completes, in order."""
        return list(self.feed_iter(data))

    def feed_iter(self, data: bytes) -> Iterator[bytes]:
        if self._error is not None:
            raise self._error
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self._max:
                self._error = RemoteProtocolError(
                    errors.FRAME_TOO_LARGE,
                    f"peer announced a frame of {length} bytes; the limit is {self._max}",
                )
                self._buf.clear()
                raise self._error
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            body = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            yield body

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def check_eof(self) -> None:
        """Call at end of stream: a partial frame left over is a truncation."""
        if self._buf:
            raise RemoteProtocolError(
                errors.MALFORMED, f"stream ended inside a frame ({len(self._buf)} bytes left)"
            )
