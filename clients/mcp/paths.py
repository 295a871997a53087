"""Where the adapter and its hooks find the daemon and each other.

Kept free of trio so the Claude Code hooks (which must finish in well under
200 ms) can import it cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that moves the whole per-user tree (tests use it).
HOME_ENV = "CLAUDEMESH_HOME"


def claudemesh_home() -> Path:
    """``$CLAUDEMESH_HOME``, else ``~/.claudemesh``."""
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.home() / ".claudemesh"


def control_socket(home: Path) -> Path:
    return home / "daemon.sock"


def workspace_sockets(home: Path) -> list[Path]:
    """Every per-workspace socket the daemon currently exposes."""
    try:
        return sorted((home / "sockets").glob("*.sock"))
    except OSError:
        return []


def session_bind_file(home: Path, claude_pid: int) -> Path:
    """The file through which the SessionStart hook hands the Claude session id
    to the adapter: both are children of the same Claude Code process."""
    return home / "sessions" / f"claude-{claude_pid}.json"


def adapter_session_file(home: Path, claude_pid: int) -> Path:
    """The session id the adapter actually registered, for the status hooks."""
    return home / "sessions" / f"adapter-{claude_pid}.json"


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh"})


def _proc_info(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) from Linux ``/proc``."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return comm, int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ps_info(pid: int) -> tuple[str, int] | None:
    """The same through ``ps`` (macOS has no ``/proc``); about 10 ms."""
    import subprocess

    try:
        out = subprocess.run(
            ["ps", "-o", "ppid=", "-o", "comm=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=1,
            check=False,
        ).stdout.split(None, 1)
        return Path(out[1].strip()).name, int(out[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def claude_pid() -> int:
    """The Claude Code process this one was started by, skipping a wrapping shell.

    Hooks run through ``sh -c``; the adapter usually does not. Both must name
    the same process, so a shell parent is stepped over.
    """
    pid = os.getppid()
    info = _proc_info if Path("/proc/self/stat").exists() else _ps_info
    for _ in range(2):
        found = info(pid)
        if found is None or found[0].lstrip("-") not in _SHELLS:
            return pid
        pid = found[1]
    return pid
