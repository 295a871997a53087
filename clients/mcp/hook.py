"""Claude Code hook commands that ``claudemesh install`` registers.

``python -m claudemesh.clients.mcp.hook EVENT`` with the hook's JSON on stdin:

- ``session-start``: hands the Claude session id (and cwd) to this Claude
  process's adapter through a small file, so the adapter registers with the
  daemon under the Claude session id and ``claude --resume`` keeps the same
  session identity (and key);
- ``prompt-submit`` / ``stop``: report the session ``working`` / ``idle`` on
  every workspace socket.

A hook must never get in the user's way: it imports no trio, gives the daemon
a total budget of :data:`BUDGET_S`, never prints on stdout (Claude Code would
show it to the model) and always exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final

from claudemesh.shared.protocol import ipc
from claudemesh.shared.protocol.framing import FrameBuffer

from . import paths

BUDGET_S: Final = 0.15
EVENTS: Final = {"session-start": None, "prompt-submit": "working", "stop": "idle"}


def _read_input() -> dict[str, Any]:
    try:
        data = json.loads(sys.stdin.buffer.read(1024 * 1024) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_private(target: Path, payload: dict[str, Any]) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, target)


def session_start(home: Path, data: dict[str, Any], claude_pid: int) -> None:
    sid = data.get("session_id")
    if not isinstance(sid, str) or not sid:
        return
    payload = {"session_id": sid, "cwd": str(data.get("cwd") or os.getcwd())}
    payload["source"] = str(data.get("source") or "")
    _write_private(paths.session_bind_file(home, claude_pid), payload)


def _session_for_status(home: Path, data: dict[str, Any], claude_pid: int) -> str | None:
    """The id the adapter registered (it may differ after ``/clear``), else Claude's."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sid = json.loads(paths.adapter_session_file(home, claude_pid).read_text())["session_id"]
        if isinstance(sid, str) and sid:
            return sid
    sid = data.get("session_id")
    return sid if isinstance(sid, str) and sid else None


def _status_on(sock_path: Path, status: str, session_id: str, deadline: float) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        s.connect(str(sock_path))
        hello = ipc.Hello(client="other", pid=os.getpid(), cwd=os.getcwd(), session_id=session_id)
        req = ipc.Request(
            id=1, method="status.set", params={"status": status, "session_id": session_id}
        )
        s.sendall(ipc.encode_ipc(hello) + ipc.encode_ipc(req))
        buf = FrameBuffer()
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                return
            for body in buf.feed(chunk):
                frame = ipc.decode_ipc(body)
                if isinstance(frame, ipc.Error) or (isinstance(frame, ipc.Reply) and frame.id == 1):
                    return


def set_status(home: Path, status: str, session_id: str) -> None:
    deadline = time.monotonic() + BUDGET_S
    for sock_path in paths.workspace_sockets(home):
        if time.monotonic() >= deadline:
            return
        with contextlib.suppress(Exception):  # a hook never fails the user's prompt
            _status_on(sock_path, status, session_id, deadline)


def run(argv: list[str]) -> None:
    event = argv[0] if argv else ""
    if event not in EVENTS:
        print(f"claudemesh hook: unknown event {event!r}", file=sys.stderr)
        return
    home = paths.claudemesh_home()
    data = _read_input()
    claude_pid = paths.claude_pid()
    if event == "session-start":
        session_start(home, data, claude_pid)
        return
    sid = _session_for_status(home, data, claude_pid)
    status = EVENTS[event]
    if sid and status:
        set_status(home, status, sid)


def main() -> None:
    """Entry point; always exits 0 so Claude Code never blocks on us."""
    try:
        run(sys.argv[1:])
    except Exception as exc:
        print(f"claudemesh hook: {exc}", file=sys.stderr)
    sys.exit(0)


if __name__ == "__main__":
    main()
