"""The local sockets: unix listeners, peer-uid check, Hello/Welcome, request dispatch.

Rules:

- A connection from a uid other than ``allowed_uid`` is closed before one
  byte is read (:func:`peer_uid` is the only place that asks the kernel).
- The first frame must be ``Hello``; a client whose ``api_version`` is newer
  than ours gets ``Error{api_mismatch}`` telling the user to restart the
  daemon, then the connection closes.
- Each ``Request`` runs in its own task, so a long ``subscribe`` or
  ``message.wait`` never blocks other requests on the same connection.
  The handler returns the result or raises :class:`ApiError`; any other
  exception becomes an ``internal`` reply and a log line, never a crash.
- A bad frame body gets an ``Error``; only broken framing closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import trio

from claudemesh import __version__
from claudemesh.shared.protocol import errors, ipc
from claudemesh.shared.protocol.errors import LocalProtocolError, RemoteProtocolError
from claudemesh.shared.protocol.framing import FrameBuffer

log = logging.getLogger("claudemesh.daemon.ipc")

HELLO_TIMEOUT_S: Final = 10.0
FEATURES: Final = ["subscribe", "sessions", "receipts", "message.wait", "outbox"]


class ApiError(Exception):
    """A request failed in a way the client should be told about."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


def peer_uid(sock: trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a unix socket."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux: struct ucred {pid, uid, gid}
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
        return int(uid)
    if sys.platform == "darwin":  # LOCAL_PEERCRED -> struct xucred {version, uid, ...}
        raw = sock.getsockopt(0, 0x001, struct.calcsize("IIh16I"))
        return int(struct.unpack_from("II", raw)[1])
    raise OSError("cannot check the peer uid of a unix socket on this platform")


def short_socket_path(path: Path) -> tuple[str, int | None]:
    """A bindable path for ``path`` even when it exceeds sun_path's ~107 bytes.

    Long paths go through ``/proc/self/fd/<dirfd>/name`` (Linux); the caller
    closes the returned fd after bind/connect.
    """
    if len(os.fsencode(path)) < 100 or not Path("/proc/self/fd").exists():
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class IpcConn:
    """One client connection: serialised writes, its Hello, its subscriptions."""

    def __init__(self, stream: trio.SocketStream, workspace: str | None) -> None:
        self.stream = stream
        self.workspace = workspace
        self.hello: ipc.Hello | None = None
        self._send_lock = trio.Lock()
        self.closed = False

    async def send(self, frame: ipc.IpcFrame) -> None:
        try:
            data = ipc.encode_ipc(frame)
        except LocalProtocolError as exc:
            if isinstance(frame, ipc.Reply):
                data = ipc.encode_ipc(ipc.error_reply(frame.id, exc.code, exc.message))
            else:
                raise
        async with self._send_lock:
            await self.stream.send_all(data)


class Streaming:
    """A handler result that sends ``result`` as the reply, then runs ``stream()``."""

    def __init__(self, result: Any, stream: Callable[[], Awaitable[None]]) -> None:
        self.result = result
        self.stream = stream


Handler = Callable[[IpcConn, ipc.Request], Awaitable[Any]]


class IpcServer:
    """Serves one unix socket path with one request handler."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        workspace: str | None = None,
        allowed_uid: int | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.workspace = workspace
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.refused = 0
        self.connections = 0
        self._cancel = trio.CancelScope()

    def statistics(self) -> dict[str, int]:
        return {"connections": self.connections, "refused": self.refused}

    def close(self) -> None:
        self._cancel.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, listen, report ready, and serve until cancelled (then unlink)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target, fd = short_socket_path(self.path)
        try:
            await sock.bind(target)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    task_status.started()
                    while True:
                        try:
                            stream = await listener.accept()
                        except OSError as exc:  # e.g. out of file descriptors: back off
                            log.warning("accept failed on %s: %s", self.path.name, exc)
                            await trio.sleep(0.1)
                            continue
                        nursery.start_soon(self._handle, stream)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()
            sock.close()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            uid = peer_uid(stream.socket)
        except OSError:
            uid = -1
        if uid != self.allowed_uid:
            self.refused += 1
            log.warning("refused a connection from uid %s on %s", uid, self.path.name)
            await stream.aclose()
            return
        self.connections += 1
        conn = IpcConn(stream, self.workspace)
        try:
            await self._converse(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except BaseExceptionGroup as eg:
            _, rest = eg.split((trio.BrokenResourceError, trio.ClosedResourceError))
            if rest is not None:
                if rest.split(Exception)[1] is not None:
                    raise  # cancellation: not ours to swallow
                log.error("connection handler failed: %r", rest)
        except Exception:
            log.exception("connection handler failed")
        finally:
            conn.closed = True
            self.connections -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _converse(self, conn: IpcConn) -> None:
        buf = FrameBuffer()
        async with trio.open_nursery() as nursery:
            while True:
                if conn.hello is None:
                    with trio.move_on_after(HELLO_TIMEOUT_S) as scope:
                        data = await conn.stream.receive_some(65536)
                    if scope.cancelled_caught:
                        await conn.send(ipc.Error(code=errors.NO_HELLO, message="no Hello sent"))
                        break
                else:
                    data = await conn.stream.receive_some(65536)
                if not data:
                    break
                try:
                    bodies = buf.feed(data)
                except RemoteProtocolError as exc:
                    await conn.send(ipc.Error(code=exc.code, message=exc.message))
                    break
                stop = False
                for body in bodies:
                    if not await self._frame(conn, body, nursery):
                        stop = True
                        break
                if stop:
                    break
            nursery.cancel_scope.cancel()

    async def _frame(self, conn: IpcConn, body: bytes, nursery: trio.Nursery) -> bool:
        """Handle one frame body; False closes the connection."""
        try:
            frame = ipc.decode_ipc(body)
        except RemoteProtocolError as exc:
            await conn.send(ipc.Error(code=exc.code, message=exc.message))
            return True
        if conn.hello is None:
            if not isinstance(frame, ipc.Hello):
                await conn.send(
                    ipc.Error(code=errors.NO_HELLO, message="the first frame must be a Hello")
                )
                return False
            if frame.api_version > ipc.IPC_API_VERSION:
                await conn.send(
                    ipc.Error(
                        code=ipc.API_MISMATCH,
                        message=(
                            f"this client speaks local API {frame.api_version} but the running "
                            f"daemon speaks {ipc.IPC_API_VERSION}; restart the daemon: "
                            "claudemesh daemon stop && claudemesh daemon start"
                        ),
                    )
                )
                return False
            conn.hello = frame
            await conn.send(
                ipc.Welcome(
                    daemon_version=__version__,
                    api_version=ipc.IPC_API_VERSION,
                    features=list(FEATURES),
                    workspace=conn.workspace,
                )
            )
            return True
        if isinstance(frame, ipc.Request):
            nursery.start_soon(self._request, conn, frame)
            return True
        await conn.send(
            ipc.Error(
                code=errors.UNKNOWN_TYPE,
                message=f"a client may send Request frames here, not {type(frame).__name__}",
            )
        )
        return True

    async def _request(self, conn: IpcConn, req: ipc.Request) -> None:
        try:
            result = await self.handler(conn, req)
            if isinstance(result, Streaming):
                await conn.send(ipc.Reply(id=req.id, result=result.result))
                await self._stream(conn, req, result)
                return
            reply = ipc.Reply(id=req.id, result=result if result is not None else {})
        except ApiError as exc:
            reply = ipc.error_reply(req.id, exc.code, exc.message, **exc.details)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            log.exception("request %s failed", req.method)
            reply = ipc.error_reply(
                req.id, errors.INTERNAL, f"the daemon failed on {req.method}; see its log"
            )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.send(reply)

    async def _stream(self, conn: IpcConn, req: ipc.Request, result: Streaming) -> None:
        """Run a stream after its reply; a failure ends it with one ``Error`` for its id
        (a second ``Reply`` would break "exactly one reply per request")."""
        try:
            await result.stream()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except ApiError as exc:  # the stream ended for a reason the client can act on
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.send(ipc.Error(code=exc.code, message=exc.message, id=req.id))
        except Exception:
            log.exception("stream of %s failed", req.method)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.send(
                    ipc.Error(
                        code=errors.INTERNAL,
                        message=f"the daemon's {req.method} stream failed (see its log); "
                        "subscribe again from your last cursor",
                        id=req.id,
                    )
                )
