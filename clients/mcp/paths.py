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


def claude_pid() -> int:
    """The Claude Code process this one was started by, skipping a wrapping shell.

    Hooks run through ``sh -c``; the adapter usually does not. Both must name
    the same process, so a shell parent is stepped over (Linux ``/proc``;
    elsewhere the direct parent is used).
    """
    pid = os.getppid()
    for _ in range(2):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if comm not in _SHELLS:
                return pid
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return pid
    return pid
