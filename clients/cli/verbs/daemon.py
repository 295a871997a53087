"""``daemon run | start | stop | status | logs | install | uninstall``."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..client import Connection, claudemesh_home, control_socket_path
from ..errors import CliError, DaemonUnreachable
from ..output import ago, now_ms, print_json, say, table, warn

#: How long `daemon stop` waits for the socket to go away.
STOP_DEADLINE_S = 15.0


def _try_connect(home: Path) -> Connection | None:
    try:
        return Connection.open(control_socket_path(home))
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as exc:
        raise DaemonUnreachable(f"Cannot reach the daemon: {exc}.") from None


def run() -> int:
    """Run the daemon in the foreground (what service units call)."""
    import importlib

    # By name, so the CLI does not depend on the daemon's module at type-check time.
    daemon_main = importlib.import_module("claudemesh.daemon.main").main
    sys.argv = ["claudemesh-daemon"]
    result: Any = daemon_main()
    return result if isinstance(result, int) else 0


def start(*, json: bool = False) -> int:
    """Start the daemon in the background if it is not running.

    Parameters
    ----------
    json
        Print one JSON document.
    """
    from ..autostart import start_and_connect, wait_for_daemon
    from ..service import installed_unit, run_steps

    home = claudemesh_home()
    conn = _try_connect(home)
    started = False
    if conn is None:
        unit = installed_unit()
        if unit is not None:
            from ..service import start_steps

            run_steps(start_steps(unit), warn if json else say)
            conn = wait_for_daemon(home, None)
            started = True
        else:
            conn = start_and_connect(home)
            # False when another verb won the race and started it first.
            started = conn.started_daemon
    with conn:
        st = conn.call("daemon.status")
    if json:
        print_json({"started": started, "pid": st.get("pid"), "version": st.get("version")})
    elif started:
        say(f"Daemon started (pid {st.get('pid')}, version {st.get('version')}).")
    else:
        say(f"Daemon already running (pid {st.get('pid')}).")
    return 0


def _wait_gone(home: Path, pid: int | None) -> bool:
    deadline = time.monotonic() + STOP_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            gone = _try_connect(home)
        except DaemonUnreachable:
            # Accepted, then hung up mid-hello: it is on its way out.
            time.sleep(0.05)
            continue
        if gone is None and (pid is None or not _alive(pid)):
            return True
        if gone is not None:
            gone.close()
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        # Our own child (started by this very process) stays a zombie until reaped.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Someone else's child that exited but is not reaped yet is a zombie: gone for us.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop(*, json: bool = False) -> int:
    """Ask the daemon to drain and exit; waits until it has.

    Parameters
    ----------
    json
        Print one JSON document.
    """
    home = claudemesh_home()
    conn = _try_connect(home)
    if conn is None:
        if json:
            print_json({"stopped": False, "running": False})
        else:
            say("Daemon is not running.")
        return 0
    with conn:
        pid = conn.call("daemon.status").get("pid")
        conn.call("daemon.stop")
    if not _wait_gone(home, pid):
        raise CliError(
            "stop_timeout",
            f"The daemon (pid {pid}) did not exit within {STOP_DEADLINE_S:g} s; "
            "see `claudemesh daemon logs`.",
        )
    if json:
        print_json({"stopped": True, "pid": pid})
    else:
        say(f"Daemon stopped (pid {pid}).")
    return 0


def status(*, json: bool = False) -> int:
    """Is the daemon running, and how are its workspaces doing.

    Exit code 3 when it is not running.

    Parameters
    ----------
    json
        Print one JSON document.
    """
    home = claudemesh_home()
    conn = _try_connect(home)
    if conn is None:
        if json:
            print_json({"running": False, "home": os.fspath(home)})
        else:
            say(f"Daemon is not running (home {home}). Start it with `claudemesh daemon start`.")
        return 3
    with conn:
        st = conn.call("daemon.status")
    if json:
        print_json({"running": True, **st})
        return 0
    now = now_ms()
    say(
        f"Daemon running: pid {st.get('pid')}, version {st.get('version')}, "
        f"up since {ago(st.get('started_at'), now)}, home {st.get('home')}"
    )
    from claudemesh import __version__

    if st.get("version") and st.get("version") != __version__:
        say(
            f"Note: this CLI is version {__version__}; to run the same version, restart the "
            "daemon: claudemesh daemon stop && claudemesh daemon start"
        )
    rows = []
    for ws in st.get("workspaces", []):
        ob = ws.get("outbox") or {}
        mark = "*" if ws.get("name") == st.get("default_workspace") else ""
        rows.append(
            [
                mark,
                str(ws.get("name")),
                str(ws.get("link")),
                f"{ob.get('pending', 0)}/{ob.get('inflight', 0)}/{ob.get('dead', 0)}",
                str(ws.get("inbox_unread", 0)),
                str(ws.get("last_error") or ""),
            ]
        )
    if rows:
        say(table(["", "WORKSPACE", "LINK", "OUTBOX p/i/d", "UNREAD", "LAST ERROR"], rows))
    elif not st.get("unavailable_workspaces"):
        say("No workspaces yet.")
    for bad in st.get("unavailable_workspaces") or []:
        say(f"Workspace {bad.get('name')} is not running: {bad.get('error')}")
    return 0


def format_log_line(line: str) -> str:
    """A JSON log record as ``date time level logger: message``; other lines as they are."""
    import json as jsonlib

    try:
        rec = jsonlib.loads(line)
    except ValueError:
        return line
    if not isinstance(rec, dict) or "msg" not in rec:
        return line
    ts = rec.get("ts")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
        if isinstance(ts, int | float)
        else "?"
    )
    text = f"{when} {rec.get('level', '')!s:<7} {rec.get('logger', '')}: {rec['msg']}"
    if rec.get("exc"):
        text += "\n" + str(rec["exc"])
    return text + "\n"


def _record(line: str) -> Any:
    import json as jsonlib

    try:
        return jsonlib.loads(line)
    except ValueError:
        return {"msg": line.rstrip("\n")}


def logs(*, lines: int = 50, follow: bool = False, raw: bool = False, json: bool = False) -> int:
    """Print the end of the daemon's log file.

    Parameters
    ----------
    lines
        How many lines from the end.
    follow
        Keep printing new lines until Ctrl-C.
    raw
        Print the JSON records as stored.
    json
        Print one JSON document ({path, records}); with --follow, one record per line.
    """
    from ..autostart import log_path, stderr_path

    home = claudemesh_home()
    path = log_path(home)
    show = (lambda line: line) if raw else format_log_line
    try:
        f = path.open("r", errors="replace")
    except FileNotFoundError:
        hint = ""
        if stderr_path(home).exists():
            hint = f" The daemon's start-up output is in {stderr_path(home)}."
        raise CliError("no_logs", f"No daemon log at {path} yet.{hint}") from None
    with f:
        tail = deque(f, maxlen=max(lines, 0))
        if json and not follow:
            print_json({"path": os.fspath(path), "records": [_record(x) for x in tail]})
            return 0
        for line in tail:
            if json:
                print_json(_record(line))
            else:
                sys.stdout.write(show(line))
        sys.stdout.flush()
        if not follow:
            return 0
        try:
            while True:
                line = f.readline()
                if line and json:
                    print_json(_record(line))
                elif line:
                    sys.stdout.write(show(line))
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return 0


def _kind(systemd: bool, launchd: bool) -> Any:
    from ..errors import UsageError
    from ..service import default_kind

    if systemd and launchd:
        raise UsageError("Choose one of --systemd and --launchd.")
    if systemd:
        return "systemd"
    if launchd:
        return "launchd"
    return default_kind()


def install(
    *,
    systemd: bool = False,
    launchd: bool = False,
    dry_run: bool = False,
    json: bool = False,
) -> int:
    """Install the daemon as a login service (systemd user unit or launchd agent).

    Writes the unit with this Python interpreter and CLAUDEMESH_HOME, then
    enables and starts it, printing each command; prints what to run by hand
    when the service manager is not usable here.

    Parameters
    ----------
    systemd
        Install a systemd user unit (default on Linux).
    launchd
        Install a launchd agent (default on macOS).
    dry_run
        Print the unit and the commands; change nothing.
    json
        Print one JSON document.
    """
    from .. import service

    kind = _kind(systemd, launchd)
    home = claudemesh_home()
    out = warn if json else say
    running = None if dry_run else _try_connect(home)
    if running is not None:
        running.close()

    def hand_over() -> None:
        # A daemon started by a verb holds the home lock; the unit's daemon needs it.
        conn = _try_connect(home)
        if conn is None:
            return
        with conn:
            pid = conn.call("daemon.status").get("pid")
            out(f"stopping the running daemon (pid {pid}) so the service can own it")
            conn.call("daemon.stop")
        if not _wait_gone(home, pid):
            raise CliError("stop_timeout", f"The running daemon (pid {pid}) did not stop.")

    report = service.install(
        kind,
        home,
        out,
        dry_run=dry_run,
        before_start=hand_over,
        manual_first=["claudemesh daemon stop"] if running is not None else None,
    )
    if json:
        print_json(report.__dict__)
    return 0


def uninstall(
    *,
    systemd: bool = False,
    launchd: bool = False,
    dry_run: bool = False,
    json: bool = False,
) -> int:
    """Stop and remove the login service that `daemon install` set up.

    Parameters
    ----------
    systemd
        Remove the systemd user unit (default on Linux).
    launchd
        Remove the launchd agent (default on macOS).
    dry_run
        Print what would be done; change nothing.
    json
        Print one JSON document.
    """
    from .. import service

    kind = _kind(systemd, launchd)
    report = service.uninstall(kind, warn if json else say, dry_run=dry_run)
    if json:
        print_json(report.__dict__)
    return 0
