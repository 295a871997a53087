"""A small fake daemon for unit tests of the adapter's own logic.

It speaks the real IPC frames on a real unix socket in a temporary
``CLAUDEMESH_HOME`` and implements just what the adapter calls
(``workspace.list``, ``session.register``, ``subscribe`` with cursor replay).
End-to-end tests against the real daemon live in ``test_e2e.py``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from claudemesh.shared.protocol import ipc
from claudemesh.shared.protocol.framing import FrameBuffer


class FakeDaemon:
    def __init__(self, home: Path, workspaces: tuple[str, ...] = ("acme",)) -> None:
        self.home = home
        self.workspaces = workspaces
        self.log: list[tuple[int, str, str, dict[str, Any]]] = []  # cursor, ws, kind, data
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.replay_overlap = 0  # a sloppy daemon replays this many events too many
        self.weird_replies = False  # a daemon of another version, or a buggy one
        self._subs: list[tuple[trio.MemorySendChannel[ipc.IpcFrame], int, str]] = []
        self._scope: trio.CancelScope | None = None
        self.connections = 0
        self.sent_events = 0

    @property
    def head(self) -> int:
        return self.log[-1][0] if self.log else 0

    def push(self, ws: str, kind: str, data: dict[str, Any]) -> int:
        cursor = self.head + 1
        self.log.append((cursor, ws, kind, data))
        for chan, sub, sws in list(self._subs):
            if sws == ws:
                chan.send_nowait(ipc.Event(sub=sub, cursor=cursor, kind=kind, data=data))
        return cursor

    def message(self, ws: str = "acme", body: str = "hello", **extra: Any) -> int:
        n = len(self.log) + 1
        data = {
            "broker_message_id": f"bm-{n}",
            "client_message_id": f"cm-{n}",
            "from_pubkey": "ab" * 32,
            "from_member_pubkey": "ab" * 32,
            "from_name": "alice",
            "workspace": ws,
            "mesh_id": "mesh-1",
            "to": "cd" * 32,
            "priority": "next",
            "body": body,
            "created_at": 1764000000000 + n,
            "received_at": 1764000000001 + n,
            "seen": False,
            **extra,
        }
        return self.push(ws, "message", data)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self.home / "daemon.sock"
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen()
        listener = trio.SocketListener(sock)
        with trio.CancelScope() as self._scope:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._handle, stream)

    def fail_streams(self) -> None:
        """End every subscription with an ``Error`` frame, as a daemon whose stream broke."""
        for chan, sub, _ws in self._subs:
            chan.send_nowait(ipc.Error(code="internal", message="stream failed", id=sub))
        self._subs.clear()

    def stop(self) -> None:
        """Drop the listener and every connection, like a daemon that died."""
        assert self._scope is not None
        self._scope.cancel()
        self._subs.clear()
        (self.home / "daemon.sock").unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        send, receive = trio.open_memory_channel[ipc.IpcFrame](math.inf)
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, receive)
                buf = FrameBuffer()
                while data := await stream.receive_some(65536):
                    for body in buf.feed(data):
                        self._answer(ipc.decode_ipc(body), send)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            self._subs = [s for s in self._subs if s[0] is not send]

    async def _writer(
        self, stream: trio.SocketStream, frames: trio.MemoryReceiveChannel[ipc.IpcFrame]
    ) -> None:
        async for frame in frames:
            await stream.send_all(ipc.encode_ipc(frame))
            if isinstance(frame, ipc.Event):
                self.sent_events += 1

    def _answer(self, frame: ipc.IpcFrame, out: trio.MemorySendChannel[ipc.IpcFrame]) -> None:
        if isinstance(frame, ipc.Hello):
            out.send_nowait(ipc.Welcome(daemon_version="fake"))
            return
        assert isinstance(frame, ipc.Request)
        self.requests.append((frame.method, dict(frame.params)))
        p = frame.params
        if frame.method == "workspace.list":
            result: Any = {"workspaces": [{"name": w} for w in self.workspaces]}
            if self.weird_replies:
                result = ["not", "a", "map"]
        elif frame.method == "session.register":
            result = {"session_id": p.get("session_id") or "made-by-daemon", "session_pubkey": "0"}
        elif frame.method == "subscribe":
            if p.get("cursor", 0) > self.head:  # as the real daemon: a cursor of another store
                out.send_nowait(
                    ipc.error_reply(frame.id, "cursor_ahead", "cursor ahead", head=self.head)
                )
                return
            out.send_nowait(ipc.Reply(id=frame.id, result={"cursor": self.head}))
            if "cursor" in p:
                start = max(0, p["cursor"] - self.replay_overlap)
                for cursor, ws, kind, data in self.log:
                    if ws == p["workspace"] and cursor > start:
                        out.send_nowait(
                            ipc.Event(sub=frame.id, cursor=cursor, kind=kind, data=data)
                        )
            self._subs.append((out, frame.id, p["workspace"]))
            return
        else:
            out.send_nowait(ipc.error_reply(frame.id, ipc.UNKNOWN_METHOD, frame.method))
            return
        out.send_nowait(ipc.Reply(id=frame.id, result=result))

    def subscribes(self) -> list[dict[str, Any]]:
        return [p for m, p in self.requests if m == "subscribe"]

    def live_subscribes(self) -> list[dict[str, Any]]:
        """Subscriptions that stream (not the adapter's early look at the head)."""
        return [p for p in self.subscribes() if p.get("kinds") != ["-"]]


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A temporary CLAUDEMESH_HOME with a path short enough for AF_UNIX (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="cm-mcp-") as d:
        home = Path(d)
        os.chmod(home, 0o700)
        yield home


@pytest.fixture
def fake_daemon_cls() -> type[FakeDaemon]:
    return FakeDaemon


@pytest.fixture
async def fake_daemon(short_home: Path) -> AsyncIterator[FakeDaemon]:
    daemon = FakeDaemon(short_home)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        yield daemon
        nursery.cancel_scope.cancel()
