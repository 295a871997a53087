"""A real broker subprocess for end-to-end tests, and admin helpers.

Interface (stable; other suites depend on it)::

    from cmtest.broker import run_broker, create_mesh, add_member

    with run_broker(tmp_path) as broker:          # -> BrokerProc
        broker.url        # "ws://127.0.0.1:PORT/ws"
        broker.port       # int
        broker.db_path    # pathlib.Path of the SQLite file
        mesh_id = create_mesh(broker.db_path, "demo")
        member_id = add_member(broker.db_path, mesh_id, pubkey_hex, "alice")
        broker.stop()     # SIGTERM and reap (broker.kill() for SIGKILL)
        broker.start()    # again, same port and same database
        broker.logs()     # everything it wrote on stderr (JSON lines)

``run_broker(tmp_path, *, db_path=None, args=())`` starts
``python -m claudemesh.broker serve --port 0 --port-file ... --db ...``
(``args`` are extra ``serve`` options such as ``["--lease", "0.5"]``), waits
for the port file with a deadline, and always terminates and reaps the
process on exit, even when the test fails.  Everything here is blocking and
fast (well under a second per call), so it is fine inside trio tests too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class BrokerError(RuntimeError):
    """The broker subprocess failed to start, or an admin command failed."""


class BrokerProc:
    """A ``claudemesh-broker serve`` subprocess on loopback."""

    def __init__(self, workdir: Path, db_path: Path, args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.db_path = db_path
        self.args = list(args)
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = workdir / "broker.stderr"
        self._port_file = workdir / "broker.port"
        self._starts = 0

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def start(self) -> None:
        """Start (or restart on the same port and database); wait until listening."""
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError("broker is already running")
        self._port_file.unlink(missing_ok=True)
        self._starts += 1
        cmd = [
            sys.executable,
            "-m",
            "claudemesh.broker",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--db",
            str(self.db_path),
            "--port-file",
            str(self._port_file),
            *self.args,
        ]
        with open(self._stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._port_file.exists():
                text = self._port_file.read_text().strip()
                if text:
                    self.port = int(text)
                    return
            if self.proc.poll() is not None:
                raise BrokerError(f"broker exited with {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"broker did not listen within {START_TIMEOUT} s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` and reap; SIGKILL if it does not exit in time. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return proc.returncode

    def kill(self) -> int | None:
        """``kill -9`` the broker (nothing gets a chance to flush) and reap it."""
        return self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def logs(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextmanager
def run_broker(
    tmp_path: Path, *, db_path: Path | None = None, args: Sequence[str] = ()
) -> Iterator[BrokerProc]:
    """Start a broker subprocess in ``tmp_path``; always stop and reap it."""
    workdir = Path(tmp_path) / f"broker-{os.getpid()}-{time.monotonic_ns()}"
    workdir.mkdir(parents=True, mode=0o700)
    broker = BrokerProc(workdir, db_path or workdir / "broker.db", args)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def admin(db_path: Path, *args: str) -> str:
    """Run ``claudemesh-broker ARGS --db DB_PATH``; return stripped stdout."""
    cmd = [sys.executable, "-m", "claudemesh.broker", *args, "--db", str(db_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise BrokerError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


def create_mesh(db_path: Path, name: str) -> str:
    """``mesh create NAME``; returns the mesh id."""
    return admin(db_path, "mesh", "create", name)


def add_member(db_path: Path, mesh_id: str, pubkey: str, name: str, role: str = "member") -> str:
    """``member add MESH --pubkey --name --role``; returns the member id."""
    return admin(
        db_path, "member", "add", mesh_id, "--pubkey", pubkey, "--name", name, "--role", role
    )


def revoke_member(db_path: Path, mesh_id: str, member: str) -> str:
    """``member revoke MESH MEMBER``; returns the member id."""
    return admin(db_path, "member", "revoke", mesh_id, member)


# ------------------------------------------------------------------------
# In-process broker and a raw WebSocket peer, for the broker's own tests (and
# anyone who wants to speak wire frames directly).

import math  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import trio  # noqa: E402
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url  # noqa: E402

from claudemesh.shared.protocol import crypto, wire  # noqa: E402

F = TypeVar("F", bound=wire.Frame)


@dataclass
class Identity:
    """A member key registered in a mesh."""

    mesh_id: str
    member_id: str
    key: crypto.KeyPair
    name: str

    @property
    def pubkey(self) -> str:
        return self.key.public_hex


def new_key() -> crypto.KeyPair:
    return crypto.KeyPair(crypto.new_root_secret())


def now_ms() -> int:
    return int(time.time() * 1000)


def signed_hello(ident: Identity, *, timestamp: int | None = None, **extra: Any) -> wire.Hello:
    ts = now_ms() if timestamp is None else timestamp
    canonical = wire.hello_canonical(ident.mesh_id, ident.member_id, ident.pubkey, ts)
    fields: dict[str, Any] = {
        "session_id": "s-" + ident.name,
        "pid": os.getpid(),
        "cwd": "/tmp",
        "display_name": ident.name,
        **extra,
    }
    return wire.Hello(
        mesh_id=ident.mesh_id,
        member_id=ident.member_id,
        pubkey=ident.pubkey,
        timestamp=ts,
        signature=ident.key.sign(canonical),
        **fields,
    )


def session_hello(ident: Identity, skey: crypto.KeyPair, **extra: Any) -> wire.SessionHello:
    """A session presentation signed by the session key, attested by the member key."""
    ts = now_ms()
    expires = ts + 3_600_000
    return wire.SessionHello(
        session_pubkey=skey.public_hex,
        session_id="sess-" + skey.public_hex[:6],
        timestamp=ts,
        signature=skey.sign(
            wire.session_hello_canonical(ident.mesh_id, ident.pubkey, skey.public_hex, ts)
        ),
        attestation=wire.SessionAttestation(
            parent_pk=ident.pubkey,
            session_pk=skey.public_hex,
            expires_at=expires,
            signature=ident.key.sign(
                wire.session_attest_canonical(ident.pubkey, skey.public_hex, expires)
            ),
        ),
        **extra,
    )


@dataclass
class Peer:
    """A raw wire client: send frames, wait for frames of a type with a deadline."""

    ws: WebSocketConnection
    ident: Identity | None = None
    backlog: list[wire.Frame] = field(default_factory=list)
    hello_ack: wire.HelloAck | None = None
    _n: int = 0

    def next_id(self) -> str:
        self._n += 1
        return f"r{self._n}"

    async def send(self, frame: wire.Frame) -> None:
        await self.ws.send_message(wire.encode_frame(frame).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def recv(self, within: float = 10.0) -> wire.Frame:
        if self.backlog:
            return self.backlog.pop(0)
        with trio.fail_after(within):
            return wire.decode_frame(await self.ws.get_message())

    async def expect(self, kind: type[F], within: float = 10.0, where: Any = None) -> F:
        """Next frame of ``kind`` (matching ``where(frame)``); others stay queued."""
        for i, f in enumerate(self.backlog):
            if isinstance(f, kind) and (where is None or where(f)):
                return self.backlog.pop(i)  # type: ignore[return-value]
        with trio.fail_after(within):
            while True:
                f = wire.decode_frame(await self.ws.get_message())
                if isinstance(f, kind) and (where is None or where(f)):
                    return f
                self.backlog.append(f)

    async def expect_none(self, kind: type[wire.Frame], within: float, where: Any = None) -> None:
        """Fail if a frame of ``kind`` arrives within ``within`` seconds."""
        with trio.move_on_after(within):
            f = await self.expect(kind, math.inf, where=where)
            raise AssertionError(f"unexpected {f!r}")

    async def request(self, frame: wire.Frame, within: float = 10.0) -> wire.Frame:
        """Send a frame with an ``id`` and return the reply carrying that id."""
        rid = frame.id  # type: ignore[union-attr]
        await self.send(frame)
        return await self.expect(
            wire.Frame.__args__,  # type: ignore[attr-defined]
            within,
            where=lambda f: getattr(f, "id", None) == rid,
        )

    async def dm(
        self,
        to: str,
        text: bytes,
        *,
        cmid: str | None = None,
        priority: wire.Priority = "now",
        **extra: Any,
    ) -> wire.Ack:
        """Encrypt ``text`` to ``to`` as a real client would and wait for the ack."""
        assert self.ident is not None
        nonce, ct = crypto.box_encrypt(text, sender=self.ident.key, recipient_pubkey_hex=to)
        rid = self.next_id()
        await self.send(
            wire.Send(
                id=rid,
                target_spec=to,
                priority=priority,
                nonce=nonce,
                ciphertext=ct,
                client_message_id=cmid if cmid is not None else f"c-{rid}-{time.time_ns()}",
                **extra,
            )
        )
        return await self.expect(wire.Ack, where=lambda a: a.id == rid)

    async def message(self, within: float = 10.0) -> wire.Push:
        """Next non-system push."""
        return await self.expect(wire.Push, within, where=lambda p: p.subtype is None)

    async def closed(self, within: float = 10.0) -> int | None:
        """Wait until the broker closes us; return the close code."""
        with trio.fail_after(within):
            try:
                while True:
                    self.backlog.append(wire.decode_frame(await self.ws.get_message()))
            except ConnectionClosed as exc:
                return exc.reason.code


@asynccontextmanager
async def open_peer(
    url: str, ident: Identity | None = None, *, hello: bool = True, **hello_extra: Any
) -> AsyncIterator[Peer]:
    """Connect to ``url``; with ``hello`` (and an identity) complete the handshake."""
    async with open_websocket_url(url, max_message_size=4 * 1024 * 1024) as ws:
        try:
            peer = Peer(ws=ws, ident=ident)
            if hello and ident is not None:
                await peer.send(signed_hello(ident, **hello_extra))
                peer.hello_ack = await peer.expect(wire.HelloAck)
            yield peer
        finally:
            if ws.closed is not None:
                # trio-websocket's client leaves the TCP stream open when the
                # server closed first; close it so no socket leaks.
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws._stream.aclose()


@dataclass
class InProcBroker:
    """A broker served inside the test's trio run (port 0 on loopback)."""

    broker: Any
    store: Any
    url: str

    def mesh(self, name: str = "m") -> str:
        mesh, _ = self.store.db.create_mesh(name, now=now_ms())
        return str(mesh.id)

    def member(self, mesh_id: str, name: str, role: str = "member") -> Identity:
        key = new_key()
        m = self.store.db.add_member(mesh_id, key.public_hex, name, role, now_ms())
        return Identity(mesh_id=mesh_id, member_id=m.id, key=key, name=name)


@asynccontextmanager
async def open_inproc_broker(tmp_path: Path, **config: Any) -> AsyncIterator[InProcBroker]:
    """Serve a broker on a fresh SQLite file in ``tmp_path`` for the block's duration."""
    from claudemesh.broker.server import BrokerConfig, serve_broker
    from claudemesh.broker.store import SqliteStore

    db = Path(tmp_path) / f"inproc-{time.monotonic_ns()}.db"
    store = SqliteStore.open(db)
    cfg = BrokerConfig(port=0, **config)
    try:
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(serve_broker, store, cfg)
            yield InProcBroker(broker=broker, store=store, url=f"ws://127.0.0.1:{broker.port}/ws")
            nursery.cancel_scope.cancel()
    finally:
        store.db.close()


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    """Poll a cheap condition (e.g. a row count) until true, with a deadline."""
    with trio.fail_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)
