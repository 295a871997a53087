"""A lean server-side WebSocket over a trio stream.

Why not trio-websocket: it runs a reader task and a channel hop per message
and one socket write per message, which was most of the broker's CPU per
delivered envelope.  Here the connection's own task parses frames as it asks
for the next message, and a writer can put many frames into one write.
wsproto (h11) does the opening handshake; after it, :class:`Framer` (a small
sans-io RFC 6455 framer, no extensions) does the framing, because wsproto's
generic frame parser was a third of the broker's CPU per message.

Rules: one task calls :meth:`WebSocket.get_message` (it also answers pings
and records pongs); any task may send, writes are serialised by a lock, and
every write is whole frames, so tasks never interleave inside a frame.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from typing import Final

import trio
import wsproto
from wsproto.events import (
    AcceptConnection,
    RejectConnection,
    Request,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_SIZE: Final = 65536
CLOSE_ABNORMAL: Final = 1006
CLOSE_TOO_BIG: Final = 1009
CLOSE_PROTOCOL: Final = 1002
#: Fragments one message may have: empty ones add nothing to its size.
MAX_FRAGMENTS: Final = 1024


class ConnectionClosed(Exception):
    """The WebSocket is closed (or the TCP stream died); ``code`` says how."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"websocket closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class FrameError(Exception):
    """The peer broke RFC 6455 framing; ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_TEXT: Final = 0x1
_BINARY: Final = 0x2
_CLOSE: Final = 0x8
_PING: Final = 0x9
_PONG: Final = 0xA


def _unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = int.from_bytes(mask * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def _header(opcode: int, n: int) -> bytes:
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")


def frame_text(text: str) -> bytes:
    data = text.encode()
    return _header(_TEXT, len(data)) + data


def frame_control(opcode: int, payload: bytes) -> bytes:
    return _header(opcode, len(payload)) + payload


def frame_close(code: int, reason: str = "") -> bytes:
    return frame_control(_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])


class Framer:
    """Sans-io server side of RFC 6455 framing (no extensions): bytes in, events out.

    Events: ``("message", str | bytes)``, ``("ping", bytes)``, ``("pong", bytes)``,
    ``("close", code, reason)``.  Client frames must be masked.
    """

    def __init__(self, max_message: int) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._parts: list[bytes] = []
        self._size = 0
        self._opcode = 0

    def feed(self, data: bytes) -> list[tuple[object, ...]]:
        self._buf += data
        events: list[tuple[object, ...]] = []
        buf = self._buf
        pos = 0
        while True:
            if len(buf) - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
            if rsv:
                raise FrameError(CLOSE_PROTOCOL, "reserved bits set")
            if not b1 & 0x80:
                raise FrameError(CLOSE_PROTOCOL, "client frames must be masked")
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if opcode >= 0x8 and (n > 125 or not fin):
                raise FrameError(CLOSE_PROTOCOL, "bad control frame")
            if opcode < 0x8 and self._size + n > self._max:
                raise FrameError(CLOSE_TOO_BIG, "message too big")
            end = pos + head + 4 + n
            if len(buf) < end:
                break
            mask = bytes(buf[pos + head : pos + head + 4])
            payload = _unmask(bytes(buf[pos + head + 4 : end]), mask)
            pos = end
            if opcode in (_TEXT, _BINARY):
                if self._parts:
                    raise FrameError(CLOSE_PROTOCOL, "new message inside a fragmented one")
                self._opcode = opcode
                self._parts.append(payload)
                self._size += n
            elif opcode == 0x0:
                if not self._parts:
                    raise FrameError(CLOSE_PROTOCOL, "continuation without a message")
                if len(self._parts) >= MAX_FRAGMENTS:
                    raise FrameError(CLOSE_TOO_BIG, "too many fragments")
                self._parts.append(payload)
                self._size += n
            elif opcode == _PING:
                events.append(("ping", payload))
                continue
            elif opcode == _PONG:
                events.append(("pong", payload))
                continue
            elif opcode == _CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                events.append(("close", code, reason))
                break
            else:
                raise FrameError(CLOSE_PROTOCOL, f"unknown opcode {opcode}")
            if fin:
                whole = b"".join(self._parts)
                self._parts, self._size = [], 0
                if self._opcode == _TEXT:
                    try:
                        events.append(("message", whole.decode()))
                    except UnicodeDecodeError:
                        raise FrameError(1007, "text message is not UTF-8") from None
                else:
                    events.append(("message", whole))
        del buf[:pos]
        return events


class WebSocket:
    """One accepted server-side WebSocket connection."""

    def __init__(self, stream: trio.SocketStream, max_message: int):
        self.stream = stream
        self._framer = Framer(max_message)
        self._lock = trio.Lock()
        self._messages: deque[str | bytes] = deque()
        self._pings: dict[bytes, trio.Event] = {}
        self.closed: int | None = None
        self._close_sent = False
        try:
            peer = stream.socket.getpeername()
            self.remote = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.remote = "?"

    # ------------------------------------------------------------ receiving

    async def get_message(self) -> str | bytes:
        """The next whole message; answers pings on the way."""
        while not self._messages:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = CLOSE_ABNORMAL
                raise ConnectionClosed(CLOSE_ABNORMAL, "connection lost")
            try:
                events = self._framer.feed(data)
            except FrameError as exc:
                await self.aclose(exc.code, exc.reason)
                raise ConnectionClosed(exc.code, exc.reason) from None
            for event in events:
                kind = event[0]
                if kind == "message":
                    self._messages.append(event[1])  # type: ignore[arg-type]
                elif kind == "ping":
                    payload = event[1]
                    assert isinstance(payload, bytes)
                    await self._write_raw(frame_control(_PONG, payload))
                elif kind == "pong":
                    pong = event[1]
                    assert isinstance(pong, bytes)
                    waiter = self._pings.pop(pong, None)
                    if waiter is not None:
                        waiter.set()
                elif kind == "close":
                    code, reason = event[1], event[2]
                    assert isinstance(code, int)
                    assert isinstance(reason, str)
                    if not self._close_sent:
                        self._close_sent = True
                        # Echo a valid code (1005 means none was given).
                        echo = code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000
                        try:
                            await self._write_raw(frame_close(echo))
                        except ConnectionClosed:
                            pass
                    self.closed = self.closed or code
                    await self._close_stream()
                    raise ConnectionClosed(code, reason)
        return self._messages.popleft()

    # -------------------------------------------------------------- sending

    async def _write_raw(self, data: bytes) -> None:
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = self.closed or CLOSE_ABNORMAL
                raise ConnectionClosed(self.closed, "connection lost") from None

    async def send_message(self, text: str) -> None:
        await self.send_texts([text])

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Send text messages in order with one socket write."""
        if self.closed is not None or self._close_sent:
            raise ConnectionClosed(self.closed or 1000)
        await self._write_raw(b"".join(frame_text(t) for t in texts))

    async def ping(self) -> None:
        """Send a ping and wait for its pong (the reading task records it)."""
        payload = os.urandom(8)
        waiter = self._pings[payload] = trio.Event()
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._write_raw(frame_control(_PING, payload))
        await waiter.wait()

    async def send_close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the reading task sees the peer's reply."""
        if self.closed is None and not self._close_sent:
            self._close_sent = True
            try:
                with trio.move_on_after(2):
                    await self._write_raw(frame_close(code, reason))
            except ConnectionClosed:
                pass
        self.closed = self.closed or code

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (if still open) and drop the TCP stream."""
        await self.send_close(code, reason)
        await self._close_stream()

    async def drain(self) -> None:
        """Read and drop until the peer's close frame (the caller bounds the wait).

        Used by the reading task after a close was sent: closing TCP with the
        peer's frames unread makes the kernel reset the connection, and the
        peer may then lose our last frames.
        """
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                if any(e[0] == "close" for e in self._framer.feed(data)):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
            return

    async def _close_stream(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.stream.aclose()


async def accept(stream: trio.SocketStream, *, path: str, max_message: int) -> WebSocket | None:
    """Run the opening handshake; ``None`` (after a 404/400) if it is not for us."""
    proto = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    while True:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        try:
            proto.receive_data(data)
        except RemoteProtocolError as exc:
            try:
                await stream.send_all(
                    proto.send(exc.event_hint or RejectConnection(status_code=400))
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                pass
            return None
        for event in proto.events():
            if isinstance(event, Request):
                try:
                    if event.target.split("?")[0] != path:
                        await stream.send_all(proto.send(RejectConnection(status_code=404)))
                        return None
                    await stream.send_all(proto.send(AcceptConnection()))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                return WebSocket(stream, max_message)
