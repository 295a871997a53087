"""A lean server-side WebSocket over a trio stream, on wsproto.

Why not trio-websocket: it runs a reader task and a channel hop per message
and one socket write per message, which was most of the broker's CPU per
delivered envelope.  Here the connection's own task parses frames as it asks
for the next message, and a writer can put many frames into one write.

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
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_SIZE: Final = 65536
CLOSE_ABNORMAL: Final = 1006
CLOSE_TOO_BIG: Final = 1009
CLOSE_PROTOCOL: Final = 1002


class ConnectionClosed(Exception):
    """The WebSocket is closed (or the TCP stream died); ``code`` says how."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"websocket closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class WebSocket:
    """One accepted server-side WebSocket connection."""

    def __init__(self, stream: trio.SocketStream, proto: wsproto.WSConnection, max_message: int):
        self.stream = stream
        self._proto = proto
        self._max = max_message
        self._lock = trio.Lock()
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self._size = 0
        self._pings: dict[bytes, trio.Event] = {}
        self.closed: int | None = None
        self._primed = False
        try:
            peer = stream.socket.getpeername()
            self.remote = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.remote = "?"

    # ------------------------------------------------------------ receiving

    async def get_message(self) -> str | bytes:
        """The next whole message; answers pings on the way."""
        if not self._primed:  # bytes that came in with the handshake
            self._primed = True
            await self._process()
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
                self._proto.receive_data(data)
                await self._process()
            except RemoteProtocolError as exc:
                await self._fail(CLOSE_PROTOCOL, str(exc)[:100])
        return self._messages.popleft()

    async def _process(self) -> None:
        for event in self._proto.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._size += len(event.data)
                if self._size > self._max:
                    await self._fail(CLOSE_TOO_BIG, "message too big")
                self._parts.append(event.data if isinstance(event.data, str) else bytes(event.data))
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    if len(parts) == 1:
                        self._messages.append(parts[0])
                    elif isinstance(parts[0], str):
                        self._messages.append("".join(p for p in parts if isinstance(p, str)))
                    else:
                        self._messages.append(b"".join(p for p in parts if isinstance(p, bytes)))
            elif isinstance(event, Ping):
                await self._write([event.response()])
            elif isinstance(event, Pong):
                waiter = self._pings.pop(bytes(event.payload), None)
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, CloseConnection):
                self.closed = event.code
                try:
                    await self._write([event.response()])
                except ConnectionClosed:
                    pass
                await self._close_stream()
                raise ConnectionClosed(event.code, event.reason or "")

    async def _fail(self, code: int, reason: str) -> None:
        await self.aclose(code, reason)
        raise ConnectionClosed(code, reason)

    # -------------------------------------------------------------- sending

    async def _write(self, events: Sequence[wsproto.events.Event]) -> None:
        try:
            data = b"".join(self._proto.send(e) for e in events)
        except LocalProtocolError:
            raise ConnectionClosed(self.closed or CLOSE_ABNORMAL) from None
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
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._write([TextMessage(data=t) for t in texts])

    async def ping(self) -> None:
        """Send a ping and wait for its pong (the reading task records it)."""
        payload = os.urandom(8)
        waiter = self._pings[payload] = trio.Event()
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._write([Ping(payload=payload)])
        await waiter.wait()

    async def send_close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the reading task sees the peer's reply."""
        if self.closed is None:
            self.closed = code
            try:
                with trio.move_on_after(2):
                    await self._write([CloseConnection(code=code, reason=reason)])
            except ConnectionClosed:
                pass

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
                self._proto.receive_data(data)
                if any(isinstance(e, CloseConnection) for e in self._proto.events()):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
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
                return WebSocket(stream, proto, max_message)
