"""The daemon's tree under ``CLAUDEMESH_HOME`` and the one-daemon-per-user lock.

Layout (every directory 0700, every file holding a secret 0600)::

    identity/root.key          32 raw bytes, the root secret
    identity/device.id         stable random id of this machine's daemon
    workspaces/<name>/config.json   mesh id, member id, broker url, root key...
    workspaces/<name>/store.db      outbox, inbox, receipts, events
    sockets/<name>.sock        per-workspace local socket
    daemon.sock                control socket
    daemon.lock                flock'ed while a daemon runs
    state.json                 default workspace
    logs/daemon.log            JSON lines, size-rotated

The lock is an OS lock (``fcntl.flock``), so a crashed daemon never blocks
the next start: the kernel drops the lock with the process.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from claudemesh.shared.protocol import crypto
from claudemesh.shared.protocol.errors import CryptoError

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
#: Exit code of a second ``claudemesh-daemon`` while one already runs.
EXIT_ALREADY_RUNNING: Final = 75
#: Exit code when the home cannot be used (bad permissions, corrupt root key).
EXIT_BAD_HOME: Final = 78

_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class HomeError(Exception):
    """The home directory cannot be used; the message says why and what to do."""


class AlreadyRunning(HomeError):
    """Another daemon holds the lock of this home."""


def default_home() -> Path:
    env = os.environ.get("CLAUDEMESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".claudemesh"


def is_workspace_name(name: str) -> bool:
    """Local workspace names become file names, so they are kept simple."""
    return _NAME_RE.match(name) is not None


def _ensure_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def write_private(path: Path, data: bytes) -> None:
    """Atomically write a 0600 file (tmp + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class WorkspaceConfig:
    """What the daemon keeps per workspace (the file is 0600: it holds the root key)."""

    name: str
    mesh_id: str
    member_id: str
    broker_url: str
    display_name: str
    role: str
    #: Workspace root key, base64 (topic keys derive from it).
    root_key: str
    #: The id the member key is derived from; equals ``mesh_id`` unless the
    #: broker assigned a different id than the one this daemon proposed.
    key_id: str = ""

    def __post_init__(self) -> None:
        if not self.key_id:
            self.key_id = self.mesh_id

    @property
    def root_key_bytes(self) -> bytes:
        return base64.b64decode(self.root_key)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root_key")
        d.pop("key_id")
        return d


class Home:
    """Paths and files of one daemon home."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None

    # paths
    @property
    def identity_dir(self) -> Path:
        return self.root / "identity"

    @property
    def sockets_dir(self) -> Path:
        return self.root / "sockets"

    @property
    def workspaces_dir(self) -> Path:
        return self.root / "workspaces"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def control_socket(self) -> Path:
        return self.root / "daemon.sock"

    @property
    def lock_path(self) -> Path:
        return self.root / "daemon.lock"

    def workspace_socket(self, name: str) -> Path:
        return self.sockets_dir / f"{name}.sock"

    def workspace_dir(self, name: str) -> Path:
        return self.workspaces_dir / name

    def store_path(self, name: str) -> Path:
        return self.workspace_dir(name) / "store.db"

    # setup
    def ensure(self) -> None:
        """Create the tree with private permissions (and tighten an existing one)."""
        _ensure_dir(self.root)
        for d in (self.identity_dir, self.sockets_dir, self.workspaces_dir, self.logs_dir):
            _ensure_dir(d)
        # Files copied in by hand (the same root on a second machine) keep
        # their modes: whatever holds a secret is made private again.
        secret_files = [
            self.identity_dir / "root.key",
            self.identity_dir / "device.id",
            self.root / "state.json",
            *self.workspaces_dir.glob("*/config.json"),
            *self.workspaces_dir.glob("*/store.db*"),
            *self.logs_dir.glob("daemon.log*"),
        ]
        for path in secret_files:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mode & 0o077:
                    path.chmod(FILE_MODE)
        for d in self.workspaces_dir.iterdir():
            if d.is_dir():
                _ensure_dir(d)

    def acquire_lock(self) -> None:
        """Take the per-home flock or raise :class:`AlreadyRunning`; then clear stale sockets."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"a claudemesh daemon is already running for {self.root} "
                "(stop it with `claudemesh daemon stop`)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # We hold the lock, so any socket file left here belongs to a dead daemon.
        stale = [self.control_socket, *self.sockets_dir.glob("*.sock")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def root_secret(self) -> bytes:
        """Load ``identity/root.key``, creating it on first use."""
        path = self.identity_dir / "root.key"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            write_private(path, crypto.new_root_secret())
            data = path.read_bytes()
        try:
            return crypto.parse_root_secret(data)
        except CryptoError as exc:
            raise HomeError(f"{path}: {exc.message}") from None

    def device_id(self) -> str:
        path = self.identity_dir / "device.id"
        try:
            value = path.read_text().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        value = secrets.token_hex(16)
        write_private(path, value.encode())
        return value

    # workspaces
    def load_workspaces(
        self, unreadable: dict[str, str] | None = None
    ) -> dict[str, WorkspaceConfig]:
        """Every workspace's config; one that cannot be read is reported in
        ``unreadable`` (name -> why) when given, else raises :class:`HomeError`."""
        out: dict[str, WorkspaceConfig] = {}
        if not self.workspaces_dir.exists():
            return out
        for d in sorted(self.workspaces_dir.iterdir()):
            cfg = d / "config.json"
            if not cfg.is_file():
                continue
            try:
                raw = json.loads(cfg.read_text())
                out[d.name] = WorkspaceConfig(**raw)
            except (ValueError, TypeError, OSError) as exc:
                if unreadable is None:
                    raise HomeError(f"{cfg} is unreadable: {exc}") from None
                unreadable[d.name] = f"{cfg} is unreadable: {exc}"
        return out

    def save_workspace(self, cfg: WorkspaceConfig) -> None:
        d = self.workspace_dir(cfg.name)
        _ensure_dir(d)
        write_private(d / "config.json", json.dumps(asdict(cfg), indent=1).encode())

    def archive_workspace(self, name: str) -> Path | None:
        """Move a left workspace's files (inbox, outbox, keys) under ``archive/``.

        Leaving must not destroy mail or the workspace key: the user deletes
        the archive when sure.  The archive stays 0700 like the rest of home.
        """
        d = self.workspace_dir(name)
        if not d.exists():
            return None
        archive = self.root / "archive"
        archive.mkdir(mode=0o700, exist_ok=True)
        os.chmod(archive, 0o700)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = archive / f"{name}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = archive / f"{name}-{stamp}-{n}"
        os.replace(d, target)
        return target

    def load_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.root / "state.json").read_text())
            return state
        except (FileNotFoundError, ValueError):
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_private(self.root / "state.json", json.dumps(state).encode())
