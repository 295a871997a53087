"""A stand-in daemon for pure client behaviour: a real unix socket, scripted replies.

The end-to-end tests use the real daemon; this one lets the CLI's own
logic (rendering, error sentences, exit codes, api_mismatch, autostart)
be tested without a broker. Run as a script (``python fake_daemon.py HOME``)
it serves ``daemon.status`` on HOME's control socket until ``daemon.stop``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from claudemesh.shared.protocol import ipc
from claudemesh.shared.protocol.framing import FrameBuffer


class HangUp(Exception):
    """Raised by a handler: the fake closes the connection without answering."""


class Fail(Exception):
    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


Handler = Callable[[dict[str, Any]], Any]


class FakeDaemon:
    def __init__(self, home: Path, handlers: dict[str, Handler] | None = None) -> None:
        self.home = home
        #: Reported by daemon.status; None in-thread (the test process never exits).
        self.pid: int | None = None
        self.path = home / "daemon.sock"
        self.handlers: dict[str, Handler] = {
            "daemon.status": lambda p: {"pid": self.pid, "version": "fake", "workspaces": []},
            "daemon.stop": self._stop,
            **(handlers or {}),
        }
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.hellos: list[ipc.Hello] = []
        self.mismatch = False
        #: ``message`` event payloads streamed after a ``subscribe`` reply.
        self.events: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.fspath(self.path))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopped.set()
        # shutdown() wakes the thread blocked in accept(); close() alone may not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def _stop(self, params: dict[str, Any]) -> dict[str, Any]:
        threading.Timer(0.05, self.close).start()
        return {}

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        buf = FrameBuffer()
        with conn:
            greeted = False
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for body in buf.feed(data):
                    frame = ipc.decode_ipc(body)
                    if not greeted:
                        assert isinstance(frame, ipc.Hello)
                        self.hellos.append(frame)
                        if self.mismatch:
                            conn.sendall(
                                ipc.encode_ipc(
                                    ipc.Error(
                                        code=ipc.API_MISMATCH,
                                        message="client api 1 is newer than daemon api 0; "
                                        "restart the daemon",
                                    )
                                )
                            )
                            return
                        conn.sendall(ipc.encode_ipc(ipc.Welcome(daemon_version="fake")))
                        greeted = True
                        continue
                    assert isinstance(frame, ipc.Request)
                    self.requests.append((frame.method, frame.params))
                    handler = self.handlers.get(frame.method)
                    if handler is None:
                        reply = ipc.error_reply(frame.id, ipc.UNKNOWN_METHOD, frame.method)
                    else:
                        try:
                            reply = ipc.Reply(id=frame.id, result=handler(frame.params))
                        except Fail as exc:
                            reply = ipc.error_reply(frame.id, exc.code, exc.message, **exc.details)
                        except HangUp:
                            return  # like a daemon that died with the request in hand
                    conn.sendall(ipc.encode_ipc(reply))
                    if frame.method == "subscribe":
                        for i, event in enumerate(self.events):
                            ev = ipc.Event(sub=frame.id, cursor=i + 1, kind="message", data=event)
                            conn.sendall(ipc.encode_ipc(ev))
                        return  # end of the scripted stream: hang up


if __name__ == "__main__":
    fake = FakeDaemon(Path(os.environ.get("CLAUDEMESH_HOME", sys.argv[-1])))
    fake.pid = os.getpid()
    with fake:
        fake.stopped.wait()
