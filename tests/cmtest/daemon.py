"""Real daemon subprocesses in temporary homes, and a tiny blocking IPC client.

Usage::

    with run_daemon(tmp_path / "a") as d:
        call(d.home, "workspace.create", name="team", broker_url=broker.url)
        with IpcClient.open(d.home) as c:          # or socket=... for a workspace socket
            sub = c.request_raw("subscribe", cursor=0)
            ev = c.next_event(timeout=5)
        d.kill()        # SIGKILL by default
        d.restart()     # same home, waits for the socket again

Nothing here imports trio or the daemon: it is what a CLI does, with a
blocking socket, :mod:`framing` and :mod:`ipc`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from claudemesh.shared.protocol import ipc
from claudemesh.shared.protocol.framing import FrameBuffer


class DaemonError(Exception):
    """An error reply (or Error frame) from the daemon."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


def _connect_path(path: Path) -> tuple[str, int | None]:
    # sun_path is ~107 bytes; pytest tmp paths can be longer.
    if len(os.fsencode(path)) < 100 or not Path("/proc/self/fd").exists():
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class IpcClient:
    """Blocking client of one daemon socket (control or workspace)."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        target, fd = _connect_path(path)
        try:
            self.sock.connect(target)
        except BaseException:
            self.sock.close()
            raise
        finally:
            if fd is not None:
                os.close(fd)
        self.buf = FrameBuffer()
        self.frames: list[ipc.IpcFrame] = []
        self.events: list[ipc.Event] = []
        self._next_id = 0
        self.welcome: ipc.Welcome | None = None

    @classmethod
    def open(
        cls,
        home: Path,
        *,
        socket: str | None = None,
        timeout: float = 10.0,
        session_id: str | None = None,
        api_version: int = ipc.IPC_API_VERSION,
    ) -> IpcClient:
        """Connect to ``home/daemon.sock`` (or ``home/sockets/<socket>.sock``) and say Hello."""
        path = home / "daemon.sock" if socket is None else home / "sockets" / f"{socket}.sock"
        c = cls(path, timeout=timeout)
        try:
            c.hello(session_id=session_id, api_version=api_version)
        except BaseException:
            c.close()
            raise
        return c

    def __enter__(self) -> IpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, frame: ipc.IpcFrame) -> None:
        self.sock.sendall(ipc.encode_ipc(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self, timeout: float | None = None) -> ipc.IpcFrame:
        """Next frame (events included) or ``TimeoutError``/``EOFError``."""
        deadline = time.monotonic() + (timeout if timeout is not None else 10.0)
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the daemon in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no frame from the daemon in time") from None
            if not data:
                raise EOFError("daemon closed the connection")
            self.frames.extend(ipc.decode_ipc(b) for b in self.buf.feed(data))
        return self.frames.pop(0)

    def hello(
        self, *, session_id: str | None = None, api_version: int = ipc.IPC_API_VERSION
    ) -> ipc.Welcome:
        self.send(
            ipc.Hello(
                api_version=api_version,
                client="test",
                pid=os.getpid(),
                cwd=os.getcwd(),
                session_id=session_id,
            )
        )
        f = self.read_frame()
        if isinstance(f, ipc.Error):
            raise DaemonError(f.code, f.message)
        assert isinstance(f, ipc.Welcome), f
        self.welcome = f
        return f

    def request_raw(self, method: str, **params: Any) -> int:
        """Send a request without waiting; returns its id."""
        self._next_id += 1
        self.send(ipc.Request(id=self._next_id, method=method, params=params))
        return self._next_id

    def reply(self, rid: int, timeout: float = 10.0) -> Any:
        """Wait for the reply to ``rid``, buffering events met on the way."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(f, ipc.Event):
                self.events.append(f)
            elif isinstance(f, ipc.Reply) and f.id == rid:
                if f.error is not None:
                    raise DaemonError(f.error.code, f.error.message, f.error.details)
                return f.result
            elif isinstance(f, ipc.Error):
                raise DaemonError(f.code, f.message)

    def request(self, method: str, *, timeout: float = 10.0, **params: Any) -> Any:
        return self.reply(self.request_raw(method, **params), timeout=timeout)

    def next_event(self, timeout: float = 10.0) -> ipc.Event:
        if self.events:
            return self.events.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            f = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(f, ipc.Event):
                return f


def call(
    home: Path, method: str, *, socket: str | None = None, timeout: float = 10.0, **params: Any
) -> Any:
    """One request on a fresh connection; returns the result or raises :class:`DaemonError`."""
    with IpcClient.open(home, socket=socket, timeout=timeout) as c:
        return c.request(method, timeout=timeout, **params)


def wait_for(
    predicate: Any, *, timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate()`` until truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or predicate}: last={last!r}")


class DaemonProc:
    """A running ``python -m claudemesh.daemon`` with ``CLAUDEMESH_HOME=home``."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = home.parent / f"{home.name}.daemon-stderr.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, ready_timeout: float = 15.0) -> DaemonProc:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["CLAUDEMESH_HOME"] = str(self.home)
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "claudemesh.daemon"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.wait_ready(timeout=ready_timeout)
        return self

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, *, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode}:\n{self.stderr_text()[-4000:]}"
                )
            with contextlib.suppress(OSError, DaemonError, EOFError, TimeoutError):
                call(self.home, "daemon.status", timeout=2.0)
                return
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"daemon not ready in {timeout}s:\n{self.stderr_text()[-4000:]}")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=15)

    def stop(self) -> int | None:
        return self.kill(signal.SIGTERM)

    def restart(self, *, ready_timeout: float = 15.0) -> DaemonProc:
        self.kill()
        return self.start(ready_timeout=ready_timeout)

    def call(self, method: str, **params: Any) -> Any:
        return call(self.home, method, **params)


@contextlib.contextmanager
def run_daemon(
    home: Path, env: dict[str, str] | None = None, *, ready_timeout: float = 15.0
) -> Iterator[DaemonProc]:
    """Start a daemon in ``home``, yield it, and always kill it on exit."""
    d = DaemonProc(home, env)
    try:
        d.start(ready_timeout=ready_timeout)
        yield d
    finally:
        d.kill()
