"""Start the daemon in the background when a verb finds no socket.

Only imported when the control socket is missing or refuses, so the hot
path never pays for ``subprocess``. The daemon is started detached (own
session, stdio to ``$CLAUDEMESH_HOME/logs/daemon.stderr.log``; the daemon
writes its own ``daemon.log``) so it outlives the
verb; we then wait for its socket with a deadline. A daemon managed by a
systemd/launchd unit is never started behind the service manager's back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from .client import Connection, control_socket_path
from .errors import DaemonUnreachable

#: How long a verb waits for a freshly started daemon to open its socket.
START_DEADLINE_S: Final = 5.0
_POLL_S: Final = 0.02


def log_path(home: Path) -> Path:
    """The daemon's own log (JSON lines, rotated by the daemon)."""
    return home / "logs" / "daemon.log"


def stderr_path(home: Path) -> Path:
    """Where a background daemon's stdout/stderr go: start-up crashes land here."""
    return home / "logs" / "daemon.stderr.log"


def daemon_command() -> list[str]:
    """The command that runs the daemon in the foreground with this interpreter."""
    return [sys.executable, "-m", "claudemesh.daemon"]


def spawn_daemon(home: Path) -> subprocess.Popen[bytes]:
    """Start a detached daemon for ``home``; its output goes to the log file."""
    logs = stderr_path(home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    logs.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ, CLAUDEMESH_HOME=os.fspath(home))
    fd = os.open(logs, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            daemon_command(),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=os.fspath(home),
        )
    finally:
        os.close(fd)


def wait_for_daemon(
    home: Path, proc: subprocess.Popen[bytes] | None, *, client: str = "cli"
) -> Connection:
    """Poll the control socket until the daemon greets us or the deadline passes."""
    path = control_socket_path(home)
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        try:
            return Connection.open(path, client=client)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if proc is not None and proc.poll() is not None:
            # It may have lost the home lock to a daemon started some other way.
            try:
                return Connection.open(path, client=client)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            raise DaemonUnreachable(
                f"The daemon exited at start-up (status {proc.returncode}). "
                f"See {stderr_path(home)} or run `claudemesh daemon run` to see why."
            )
        if time.monotonic() >= deadline:
            raise DaemonUnreachable(
                f"Started the daemon but its socket {path} did not appear within "
                f"{START_DEADLINE_S:g} s. See {stderr_path(home)} or run `claudemesh daemon run`."
            )
        time.sleep(_POLL_S)


def start_and_connect(home: Path, *, autostart: bool = True, client: str = "cli") -> Connection:
    """Start the daemon unless told not to or a unit manages it, then connect."""
    from .service import installed_unit, manual_start_hint

    if not autostart:
        raise DaemonUnreachable(
            f"The claudemesh daemon is not running (no socket at {control_socket_path(home)}). "
            "Start it with `claudemesh daemon start`, or drop --no-start."
        )
    unit = installed_unit()
    if unit is not None:
        raise DaemonUnreachable(
            f"The daemon is managed by a service unit ({unit}) but is not running. "
            f"Start it with `{manual_start_hint(unit)}` and check `claudemesh daemon logs`."
        )
    import fcntl

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Several verbs may find no daemon at once (a shell loop, two sessions):
    # one starts it, the others wait on the lock and then find its socket.
    fd = os.open(home / "autostart.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return Connection.open(control_socket_path(home), client=client)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        proc = spawn_daemon(home)
        conn = wait_for_daemon(home, proc, client=client)
        conn.started_daemon = True
        return conn
    finally:
        os.close(fd)  # releases the lock
