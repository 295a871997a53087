"""``claudemesh doctor``: check the installation and say what to do about each problem.

Every check yields one :class:`Check` (``ok``, ``warn`` or ``fail``, a
sentence, and a hint when something needs doing). The list is in
docs/troubleshooting.md, which explains each failure at more length; keep the
two in step. Doctor never starts the daemon (it would hide the problem it is
asked about) and never prints a secret. Like every verb it stays off trio:
plain sockets with short timeouts.
"""

from __future__ import annotations

import importlib
import os
import socket
import ssl
import stat
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from claudemesh import __version__
from claudemesh.shared.protocol.ipc import IPC_API_VERSION

from .client import Connection, claudemesh_home, control_socket_path
from .errors import CliError

Status = Literal["ok", "warn", "fail"]

#: Bound on one network probe (broker TCP + WebSocket upgrade).
PROBE_TIMEOUT_S: Final = 3.0
#: Clock offset against the broker that deserves a warning; the broker
#: refuses a hello more than 60 s off, so that is a failure.
SKEW_WARN_MS: Final = 10_000
SKEW_FAIL_MS: Final = 60_000
#: Outbox rows still waiting beyond which something is probably stuck.
PENDING_WARN: Final = 100

#: Files that hold secrets (relative to the home) and must be 0600.
_SECRET_FILES: Final = ("identity/root.key", "identity/device.id", "state.json")
_PRIVATE_DIRS: Final = ("", "identity", "sockets", "workspaces", "logs")


@dataclass
class Check:
    name: str
    status: Status
    message: str
    hint: str = ""


def _home_paths(home: Path) -> Iterator[tuple[Path, int, bool]]:
    """``(path, wanted mode, holds a key)`` for everything doctor inspects."""
    for name in _PRIVATE_DIRS:
        yield home / name, 0o700, True
    for name in _SECRET_FILES:
        yield home / name, 0o600, True
    ws_dir = home / "workspaces"
    if ws_dir.is_dir():
        for d in sorted(ws_dir.iterdir()):
            if d.is_dir():
                yield d, 0o700, True
                for p in sorted(d.iterdir()):
                    if p.is_file():
                        # config.json holds the workspace root key; the stores
                        # hold decrypted messages (and their -wal / -shm files).
                        yield p, 0o600, p.name == "config.json"


def check_home(home: Path) -> Iterator[Check]:
    """0700 directories and 0600 files, owned by this user.

    A directory or a key file that is too open, or anything owned by another
    uid, fails. A message store that is too open only warns: the 0700
    directories around it still keep other users out.
    """
    if not home.exists():
        yield Check(
            "home",
            "warn",
            f"{home} does not exist yet.",
            "It is created on first use: run `claudemesh daemon start`.",
        )
        return
    problems: list[str] = []
    fixes: list[str] = []
    status: Status = "ok"
    uid = os.getuid()
    for path, want, key in _home_paths(home):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid:
            problems.append(f"{path} belongs to uid {st.st_uid}, not you ({uid})")
            status = "fail"
        elif mode & ~want:
            problems.append(f"{path} is {mode:04o}, should be {want:04o}")
            fixes.append(f"chmod {want:o} {path}")
            if key:
                status = "fail"
            elif status == "ok":
                status = "warn"
    if not problems:
        yield Check("home", "ok", f"{home}: directories 0700, files 0600, all yours.")
        return
    if fixes:
        hint = f"Fix with: {'; '.join(fixes)}"
    else:
        hint = "Use a home that belongs to you (CLAUDEMESH_HOME) or chown it back."
    risk = (
        "Other users could read your keys"
        if status == "fail"
        else "Message stores are readable by group/others (the 0700 directories still "
        "keep other users out)"
    )
    yield Check("home", status, f"{risk}: " + "; ".join(problems) + ".", hint)


def connect_daemon(home: Path) -> tuple[Connection | None, Check]:
    path = control_socket_path(home)
    try:
        conn = Connection.open(path, client="cli")
    except FileNotFoundError:
        return None, Check(
            "daemon",
            "fail",
            f"The daemon is not running (no socket at {path}).",
            "Start it with `claudemesh daemon start` (or install it as a service with "
            "`claudemesh daemon install`).",
        )
    except ConnectionRefusedError:
        return None, Check(
            "daemon",
            "fail",
            f"A socket exists at {path} but nobody answers: the daemon died.",
            "Start it again with `claudemesh daemon start`; see `claudemesh daemon logs` for why "
            "it stopped.",
        )
    except (OSError, CliError) as exc:
        return None, Check(
            "daemon",
            "fail",
            f"Cannot talk to the daemon at {path}: {exc}.",
            "Restart it: `claudemesh daemon stop && claudemesh daemon start`.",
        )
    return conn, Check("daemon", "ok", f"Running and answering on {path}.")


def check_versions(daemon_version: str, api_version: int) -> Check:
    if api_version != IPC_API_VERSION:
        return Check(
            "versions",
            "fail",
            f"The daemon speaks local API {api_version}, this CLI speaks {IPC_API_VERSION}.",
            "Restart the daemon so it runs the installed code: "
            "`claudemesh daemon stop && claudemesh daemon start`.",
        )
    if daemon_version != __version__:
        return Check(
            "versions",
            "warn",
            f"The daemon is version {daemon_version}, this CLI is {__version__} "
            f"(same API {api_version}).",
            "Restart the daemon after an upgrade: "
            "`claudemesh daemon stop && claudemesh daemon start`.",
        )
    return Check("versions", "ok", f"CLI and daemon are both {__version__}, API {api_version}.")


def check_workspace(ws: dict[str, Any]) -> Iterator[Check]:
    """Link state, queue depths and clock skew of one workspace from ``daemon.status``."""
    name = str(ws.get("name", "?"))
    label = f"workspace {name}"
    link = str(ws.get("link", "unknown"))
    broker = ws.get("broker_url", "?")
    err = ws.get("last_error")
    if link == "connected":
        yield Check(label, "ok", f"Connected to {broker}.")
    elif link == "refused":
        yield Check(
            label,
            "fail",
            f"The broker {broker} refused this member: {err or 'no reason given'}.",
            "If you were removed, ask an admin for a new invite; if it says timestamp_skew, "
            "fix this machine's clock.",
        )
    else:
        yield Check(
            label,
            "warn",
            f"Not connected to {broker} (link: {link}"
            + (f", last error: {err}" if err else "")
            + ").",
            "Messages wait in the outbox meanwhile. Check the broker check below and your network.",
        )
    outbox = ws.get("outbox") or {}
    pending = int(outbox.get("pending", 0)) + int(outbox.get("inflight", 0))
    dead = int(outbox.get("dead", 0))
    quarantined = int(ws.get("quarantined", 0) or 0)
    unread = int(ws.get("inbox_unread", 0) or 0)
    depth = f"outbox {pending} waiting, {dead} dead; inbox {unread} unread"
    if dead:
        yield Check(
            f"{label} queues",
            "warn",
            f"{depth}: {dead} message(s) failed for good.",
            "See why with `claudemesh message status ID` and send again if still wanted.",
        )
    elif pending > PENDING_WARN:
        yield Check(
            f"{label} queues",
            "warn",
            f"{depth}: a backlog is building up.",
            "The link is probably down or the broker is refusing sends; see the checks above.",
        )
    else:
        yield Check(f"{label} queues", "ok", depth + ".")
    if quarantined:
        yield Check(
            f"{label} quarantine",
            "warn",
            f"{quarantined} inbound message(s) failed to decrypt or verify and were set aside.",
            "Someone sent garbage or a forged message; compare safety numbers "
            "(`claudemesh verify PEER`).",
        )
    offset = ws.get("server_time_offset_ms")
    if offset is None:
        return
    off = int(offset)
    if abs(off) >= SKEW_FAIL_MS:
        yield Check(
            f"{label} clock",
            "fail",
            f"This clock is {off / 1000:+.1f} s off the broker's; it refuses hellos beyond 60 s.",
            "Enable time sync (e.g. `timedatectl set-ntp true`).",
        )
    elif abs(off) >= SKEW_WARN_MS:
        yield Check(
            f"{label} clock",
            "warn",
            f"This clock is {off / 1000:+.1f} s off the broker's.",
            "Enable time sync (e.g. `timedatectl set-ntp true`) before it reaches 60 s.",
        )
    else:
        yield Check(f"{label} clock", "ok", f"Within {abs(off)} ms of the broker's clock.")


def probe_broker(url: str) -> Check:
    """TCP connect and a WebSocket upgrade on the broker URL, then hang up."""
    label = f"broker {url}"
    try:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("not a ws:// or wss:// URL")
        host = parts.hostname
        port = parts.port or (443 if secure else 80)
    except ValueError as exc:
        return Check(label, "fail", f"The broker URL is malformed: {exc}.", "")
    path = parts.path or "/"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as raw:
            sock: socket.socket = raw
            if secure:
                sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: Y2xhdWRlbWVzaGRvY3Rvcg==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.sendall(request.encode())
            head = sock.recv(256).decode("latin-1")
    except ssl.SSLError as exc:
        return Check(
            label,
            "fail",
            f"TLS failed: {exc}.",
            "Check the certificate of the reverse proxy (docs/self-hosting.md).",
        )
    except OSError as exc:
        return Check(
            label,
            "fail",
            f"Cannot reach {host}:{port}: {exc}.",
            "Is the broker running (`claudemesh-broker serve`) and reachable from here?",
        )
    status_line = head.split("\r\n", 1)[0]
    if " 101 " in f"{status_line} ":
        return Check(label, "ok", f"Reachable; {host}:{port} accepts WebSocket upgrades.")
    return Check(
        label,
        "fail",
        f"{host}:{port} answered {status_line or 'nothing'!r} instead of a WebSocket upgrade.",
        "Check the URL path (/ws) and that a reverse proxy passes Upgrade headers.",
    )


def check_claude_code() -> Check:
    """Ask the MCP installer (if present) whether Claude Code is set up and consistent."""
    try:
        # Imported by name: the installer is optional for doctor.
        install = importlib.import_module("claudemesh.clients.mcp.install")
    except ImportError:
        return Check(
            "claude code",
            "warn",
            "This build cannot inspect the Claude Code integration.",
            "Register it with `claudemesh install`.",
        )
    probe = getattr(install, "check", None) or getattr(install, "status", None)
    if probe is None:
        return Check(
            "claude code",
            "warn",
            "This build cannot inspect the Claude Code integration.",
            "Register it with `claudemesh install`.",
        )
    try:
        result = probe()
    except Exception as exc:  # a third-party config file may be anything
        return Check("claude code", "warn", f"Could not read the Claude Code config: {exc}.", "")
    return _claude_result(result)


def _claude_result(result: Any) -> Check:
    if isinstance(result, dict):
        installed = bool(result.get("installed"))
        problems = [str(p) for p in result.get("problems", []) or []]
        where = result.get("path") or result.get("config") or "the Claude Code config"
    else:
        installed = bool(getattr(result, "installed", False))
        problems = [str(p) for p in getattr(result, "problems", []) or []]
        where = getattr(result, "path", None) or "the Claude Code config"
    if not installed:
        return Check(
            "claude code",
            "warn",
            f"claudemesh is not registered in {where}.",
            "Run `claudemesh install` to let Claude Code sessions use it.",
        )
    if problems:
        return Check(
            "claude code",
            "fail",
            f"Registered in {where}, but: " + "; ".join(problems) + ".",
            "Run `claudemesh install` again to rewrite the entries.",
        )
    return Check("claude code", "ok", f"Registered in {where} and consistent.")


def run_checks(home: Path) -> list[Check]:
    checks = list(check_home(home))
    conn, daemon_check = connect_daemon(home)
    checks.append(daemon_check)
    workspaces: list[dict[str, Any]] = []
    if conn is not None:
        with conn:
            checks.append(check_versions(conn.welcome.daemon_version, conn.welcome.api_version))
            try:
                status = conn.call("daemon.status", {}, timeout=PROBE_TIMEOUT_S * 2)
            except CliError as exc:
                checks.append(
                    Check("daemon status", "fail", f"daemon.status failed: {exc.message}", "")
                )
                status = {}
        workspaces = list(status.get("workspaces", []))
        if not workspaces and status:
            checks.append(
                Check(
                    "workspaces",
                    "warn",
                    "No workspace joined yet.",
                    "Create one (`claudemesh workspace create NAME --broker URL`) or join with "
                    "an invite (`claudemesh workspace join LINK`).",
                )
            )
        for ws in workspaces:
            checks.extend(check_workspace(ws))
    else:
        checks.append(Check("versions", "warn", "Not checked: the daemon is not reachable.", ""))
    for url in sorted({str(ws["broker_url"]) for ws in workspaces if ws.get("broker_url")}):
        checks.append(probe_broker(url))
    checks.append(check_claude_code())
    return checks


_MARK: Final = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


def doctor(*, json: bool = False) -> int:
    """Check the installation and explain each problem and what to do about it.

    Checks: the home's permissions, the daemon (running, reachable, same
    version and API as this CLI), each workspace's broker link and queue
    depths, clock skew against the broker, that each broker answers, and the
    Claude Code integration. Exits 1 if any check fails.

    Parameters
    ----------
    json
        Print one JSON document ``{ok, checks: [{name, status, message, hint}]}``.
    """
    home = claudemesh_home()
    checks = run_checks(home)
    failed = any(c.status == "fail" for c in checks)
    if json:
        import json as jsonlib

        doc = {"ok": not failed, "home": os.fspath(home), "checks": [asdict(c) for c in checks]}
        sys.stdout.write(jsonlib.dumps(doc, indent=2) + "\n")
    else:
        for c in checks:
            print(f"{_MARK[c.status]}  {c.name}: {c.message}")
            if c.hint and c.status != "ok":
                print(f"      → {c.hint}")
        warned = sum(c.status == "warn" for c in checks)
        nfail = sum(c.status == "fail" for c in checks)
        print(
            f"\n{len(checks)} checks: {nfail} failed, {warned} warnings."
            if failed or warned
            else f"\nAll {len(checks)} checks passed."
        )
    sys.stdout.flush()
    return 1 if failed else 0
