"""A small blocking client of the daemon's local API (docs/ipc.md).

One verb = one connection: connect, ``Hello``/``Welcome``, one ``Request``,
one ``Reply``, close (or a stream of ``Event`` frames for ``subscribe``).
Plain ``socket`` + msgspec and nothing else, because every import here is
paid on each CLI invocation; in particular trio must never be imported on
this path. Starting the daemon when it is not running lives in
:mod:`.autostart`, imported only when the socket is missing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from claudemesh import __version__
from claudemesh.shared.protocol.errors import ProtocolError
from claudemesh.shared.protocol.framing import FrameBuffer
from claudemesh.shared.protocol.ipc import (
    API_MISMATCH,
    IPC_API_VERSION,
    Error,
    Event,
    Hello,
    Reply,
    Request,
    Welcome,
    decode_ipc,
    encode_ipc,
)

from .errors import CliError, DaemonUnreachable, RequestFailed

if TYPE_CHECKING:
    # pathlib (with urllib.parse and ipaddress) costs ~3 ms per verb; the hot
    # path works on strings and builds a Path only where one is asked for.
    from pathlib import Path

#: Bound on connect + hello; a daemon that cannot greet in this long is stuck.
CONNECT_TIMEOUT_S: Final = 5.0
#: Bound on an ordinary request (``message.wait`` adds its own timeout to it).
REQUEST_TIMEOUT_S: Final = 30.0

RESTART_ADVICE: Final = "claudemesh daemon stop && claudemesh daemon start"


def _home_str() -> str:
    env = os.environ.get("CLAUDEMESH_HOME")
    return os.path.expanduser(env) if env else os.path.join(os.path.expanduser("~"), ".claudemesh")


def claudemesh_home() -> Path:
    """``$CLAUDEMESH_HOME``, else ``~/.claudemesh``."""
    from pathlib import Path

    return Path(_home_str())


def control_socket_path(home: Path) -> Path:
    return home / "daemon.sock"


def _connect_unix(sock: socket.socket, path: str | Path) -> None:
    """Connect even when ``path`` is longer than ``sun_path`` (~107 bytes).

    Deep homes (temporary folders, long user names) are common; on Linux we
    go through ``/proc/self/fd/<dir fd>/<name>``, which is short.
    """
    raw = os.fsencode(path)
    if len(raw) < 100 or not os.path.isdir("/proc/self/fd"):
        sock.connect(raw)
        return
    parent, name = os.path.split(os.fspath(path))
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


class Connection:
    """One greeted connection to the daemon; use as a context manager."""

    def __init__(self, sock: socket.socket, welcome: Welcome) -> None:
        self._sock = sock
        self._buf = FrameBuffer()
        self._pending: list[bytes] = []
        #: Events that arrived while we waited for a reply; ``events`` yields them first.
        self._events: list[Event] = []
        self._next_id = 1
        self.welcome = welcome
        #: True when this verb had to start the daemon (``daemon start`` says so).
        self.started_daemon = False

    @classmethod
    def open(
        cls, path: str | Path, *, client: str = "cli", session_id: str | None = None
    ) -> Connection:
        """Connect to ``path`` and greet; raises ``OSError`` if nobody listens.

        ``api_mismatch`` (this CLI is newer than the daemon) becomes a
        :class:`CliError` that says how to restart the daemon.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            _connect_unix(sock, path)
            hello = Hello(
                client=client,
                client_version=__version__,
                pid=os.getpid(),
                cwd=os.getcwd(),
                session_id=session_id,
            )
            sock.sendall(encode_ipc(hello))
            conn = cls(sock, Welcome(daemon_version="?"))
            first = conn._read_frame()
        except BaseException:
            sock.close()
            raise
        if isinstance(first, Welcome):
            conn.welcome = first
            return conn
        sock.close()
        if isinstance(first, Error) and first.code == API_MISMATCH:
            raise CliError(
                API_MISMATCH,
                f"This claudemesh CLI ({__version__}, API {IPC_API_VERSION}) is newer than the "
                f"running daemon. Restart the daemon: {RESTART_ADVICE}",
                exit_code=3,
            )
        if isinstance(first, Error):
            raise CliError(first.code, f"The daemon refused the connection: {first.message}")
        raise CliError("protocol", f"The daemon answered hello with {type(first).__name__}.")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _read_frame(self) -> Any:
        """Read one frame, blocking; EOF or garbage become a :class:`CliError`."""
        while not self._pending:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise CliError("timeout", "The daemon did not answer in time.") from None
            except OSError as exc:
                raise DaemonUnreachable(f"Lost the connection to the daemon: {exc}.") from None
            if not data:
                raise DaemonUnreachable(
                    "The daemon closed the connection. Check `claudemesh daemon logs`."
                )
            try:
                self._pending.extend(self._buf.feed(data))
            except ProtocolError as exc:
                raise CliError(exc.code, f"The daemon sent a bad frame: {exc.message}") from None
        body = self._pending.pop(0)
        try:
            return decode_ipc(body)
        except ProtocolError as exc:
            raise CliError(exc.code, f"The daemon sent a bad frame: {exc.message}") from None

    def send_request(self, method: str, params: dict[str, Any] | None = None) -> int:
        request_id = self._next_id
        self._next_id += 1
        frame = Request(id=request_id, method=method, params=params or {})
        try:
            self._sock.sendall(encode_ipc(frame))
        except OSError as exc:
            raise DaemonUnreachable(f"Lost the connection to the daemon: {exc}.") from None
        return request_id

    def _wait_reply(self, request_id: int) -> Any:
        while True:
            frame = self._read_frame()
            if isinstance(frame, Reply) and frame.id == request_id:
                if frame.error is not None:
                    err = frame.error
                    raise RequestFailed(err.code, err.message, details=err.details)
                return frame.result
            if isinstance(frame, Event):
                self._events.append(frame)
            elif isinstance(frame, Error):
                raise CliError(frame.code, frame.message)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = REQUEST_TIMEOUT_S,
    ) -> Any:
        """Send one request and return its ``result``; an error reply raises."""
        self._sock.settimeout(timeout)
        return self._wait_reply(self.send_request(method, params))

    def start_subscription(self, params: dict[str, Any] | None = None) -> int:
        """Subscribe; returns the subscription id for :meth:`events`.

        Further requests may share the connection: events that arrive
        meanwhile are kept, not lost.
        """
        self._sock.settimeout(REQUEST_TIMEOUT_S)
        sub = self.send_request("subscribe", params)
        self._wait_reply(sub)
        return sub

    def events(self, sub: int) -> Iterator[Event]:
        """Yield the events of subscription ``sub`` until the daemon closes."""
        self._sock.settimeout(None)
        while self._events:
            event = self._events.pop(0)
            if event.sub == sub:
                yield event
        while True:
            frame = self._read_frame()
            if isinstance(frame, Event) and frame.sub == sub:
                yield frame
            elif isinstance(frame, Error):
                raise CliError(frame.code, frame.message)


def connect(home: Path | None = None, *, autostart: bool = True, client: str = "cli") -> Connection:
    """A greeted connection to the control socket, starting the daemon if needed."""
    root = os.fspath(home) if home is not None else _home_str()
    path = os.path.join(root, "daemon.sock")
    try:
        return Connection.open(path, client=client)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    except OSError as exc:
        raise DaemonUnreachable(f"Cannot reach the daemon at {path}: {exc}.") from None
    from pathlib import Path

    from .autostart import start_and_connect

    return start_and_connect(Path(root), autostart=autostart, client=client)
