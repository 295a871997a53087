"""Fixtures for the daemon suite: in-process daemons on real unix sockets, real brokers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cmtest.daemon import wait_for

from claudemesh.daemon.home import Home
from claudemesh.daemon.service import Daemon
from claudemesh.shared.protocol import ipc
from claudemesh.shared.protocol.framing import FrameBuffer


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir, so unix socket paths stay well under sun_path's limit."""
    with tempfile.TemporaryDirectory(prefix="cmd") as d:
        yield Path(d)


class AsyncClient:
    """Minimal trio IPC client used by in-process tests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = FrameBuffer()
        self.frames: list[ipc.IpcFrame] = []
        self.next_id = 0

    async def send(self, frame: ipc.IpcFrame) -> None:
        await self.stream.send_all(ipc.encode_ipc(frame))

    async def read(self) -> ipc.IpcFrame:
        while not self.frames:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.frames.extend(ipc.decode_ipc(b) for b in self.buf.feed(data))
        return self.frames.pop(0)

    async def request(self, method: str, **params: Any) -> ipc.Reply:
        self.next_id += 1
        rid = self.next_id
        await self.send(ipc.Request(id=rid, method=method, params=params))
        while True:
            f = await self.read()
            if isinstance(f, ipc.Reply) and f.id == rid:
                return f


@contextlib.asynccontextmanager
async def open_client(path: Path, *, hello: bool = True) -> AsyncIterator[AsyncClient]:
    stream = await trio.open_unix_socket(str(path))
    c = AsyncClient(stream)
    try:
        if hello:
            await c.send(ipc.Hello(client="test", pid=os.getpid()))
            w = await c.read()
            assert isinstance(w, ipc.Welcome), w
        yield c
    finally:
        await stream.aclose()


@contextlib.asynccontextmanager
async def open_daemon(root: Path, **kw: Any) -> AsyncIterator[Daemon]:
    home = Home(root)
    home.ensure()
    home.acquire_lock()
    d = Daemon(home, **kw)
    try:
        async with trio.open_nursery() as n:
            await n.start(d.run)
            yield d
            d.stop_requested.set()
    finally:
        home.release_lock()


@pytest.fixture
def broker_url(short_tmp: Path) -> Iterator[str]:
    """A real broker subprocess on loopback (``python -m claudemesh.broker serve``)."""
    port_file = short_tmp / "broker.port"
    err = open(short_tmp / "broker.err", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "claudemesh.broker",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            str(short_tmp / "broker.db"),
            "--port-file",
            str(port_file),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        wait_for(
            lambda: (
                proc.poll() is not None or (port_file.exists() and port_file.read_text().strip())
            ),
            timeout=20,
            what="broker port file",
        )
        assert proc.poll() is None, (short_tmp / "broker.err").read_text()
        yield f"ws://127.0.0.1:{port_file.read_text().strip()}/ws"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        err.close()
