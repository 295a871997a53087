"""Render, install and remove the daemon's systemd user unit / launchd agent.

The templates live in ``packaging/`` (mapped into the wheel as
``claudemesh/packaging``). Installing writes the rendered file into the
user's unit folder and runs the service manager; every command is printed
before it runs, and where the manager is not usable (no ``systemctl
--user`` bus, no ``launchctl``) we write the file and print what to run by
hand instead of failing. ``CLAUDEMESH_SYSTEMCTL`` / ``CLAUDEMESH_LAUNCHCTL``
name other executables (tests use recording fakes).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import claudemesh

from .errors import CliError

Kind = Literal["systemd", "launchd"]

SYSTEMD_UNIT: Final = "claudemesh-daemon.service"
LAUNCHD_LABEL: Final = "com.claudemesh.daemon"
LAUNCHD_PLIST: Final = f"{LAUNCHD_LABEL}.plist"


def templates_dir() -> Path:
    """Where the unit templates are: in the wheel, else in the source checkout."""
    installed = Path(claudemesh.__file__).parent / "packaging"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "packaging"


def default_kind() -> Kind:
    return "launchd" if sys.platform == "darwin" else "systemd"


def systemd_unit_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(config) / "systemd" / "user" / SYSTEMD_UNIT


def launchd_plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / LAUNCHD_PLIST


def unit_path(kind: Kind) -> Path:
    return systemd_unit_path() if kind == "systemd" else launchd_plist_path()


def installed_unit() -> Path | None:
    """The unit file of an installed service, if any (then autostart stays off)."""
    for path in (systemd_unit_path(), launchd_plist_path()):
        if path.exists():
            return path
    return None


def manual_start_hint(unit: Path) -> str:
    if unit.name == SYSTEMD_UNIT:
        return f"systemctl --user start {SYSTEMD_UNIT}"
    return f"launchctl kickstart gui/{os.getuid()}/{LAUNCHD_LABEL}"


def start_steps(unit: Path) -> list[Step]:
    """Start an installed unit through its service manager."""
    if unit.name == SYSTEMD_UNIT:
        return [Step([_systemctl(), "--user", "start", SYSTEMD_UNIT])]
    return [Step([_launchctl(), "kickstart", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"])]


def _systemd_quote(value: str) -> str:
    """Quote one word for a unit file: ``%`` specifiers and spaces are special."""
    value = value.replace("%", "%%")
    if any(c in value for c in " \t\"\\'"):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _check_path(value: str, what: str) -> None:
    if "\n" in value or "\r" in value or "\x00" in value:
        raise CliError("invalid_path", f"The {what} path contains a line break: {value!r}.")


def render_systemd(python: str, home: str, log: str) -> str:
    """The user unit with interpreter, home and log path filled in."""
    for value, what in ((python, "interpreter"), (home, "CLAUDEMESH_HOME"), (log, "log")):
        _check_path(value, what)
    text = (templates_dir() / "systemd" / SYSTEMD_UNIT).read_text()
    return (
        text.replace("@PYTHON@", _systemd_quote(python))
        # append: takes the rest of the line as the path; only % is special.
        .replace("@LOG@", log.replace("%", "%%"))
        .replace("@HOME_ENV@", _systemd_quote(f"CLAUDEMESH_HOME={home}"))
        .replace("@HOME@", _systemd_quote(home))
    )


def render_launchd(python: str, home: str, log: str) -> str:
    """The launchd agent with interpreter, home and log path filled in."""
    # Imported here: xml.sax.saxutils pulls in urllib.request, ~15 ms that the
    # autostart path (which imports this module) should not pay.
    from xml.sax.saxutils import escape

    for value, what in ((python, "interpreter"), (home, "CLAUDEMESH_HOME"), (log, "log")):
        _check_path(value, what)
    text = (templates_dir() / "launchd" / LAUNCHD_PLIST).read_text()
    return (
        text.replace("@PYTHON@", escape(python))
        .replace("@HOME@", escape(home))
        .replace("@LOG@", escape(log))
    )


def render(kind: Kind, home: Path) -> str:
    python = os.path.abspath(sys.executable)
    # The daemon writes logs/daemon.log itself; this catches what it prints.
    log = os.fspath(home / "logs" / "daemon.stderr.log")
    if kind == "systemd":
        return render_systemd(python, os.fspath(home), log)
    return render_launchd(python, os.fspath(home), log)


@dataclass
class Step:
    """One service-manager command: run it, or tell the user to."""

    argv: list[str]

    def __str__(self) -> str:
        return shlex.join(self.argv)


def _systemctl() -> str:
    return os.environ.get("CLAUDEMESH_SYSTEMCTL") or "systemctl"


def _launchctl() -> str:
    return os.environ.get("CLAUDEMESH_LAUNCHCTL") or "launchctl"


def install_steps(kind: Kind, path: Path) -> list[Step]:
    if kind == "systemd":
        ctl = _systemctl()
        return [
            Step([ctl, "--user", "daemon-reload"]),
            Step([ctl, "--user", "enable", "--now", SYSTEMD_UNIT]),
        ]
    return [Step([_launchctl(), "bootstrap", f"gui/{os.getuid()}", os.fspath(path)])]


def uninstall_steps(kind: Kind, path: Path) -> list[Step]:
    if kind == "systemd":
        ctl = _systemctl()
        return [Step([ctl, "--user", "disable", "--now", SYSTEMD_UNIT])]
    return [Step([_launchctl(), "bootout", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"])]


def after_uninstall_steps(kind: Kind) -> list[Step]:
    return [Step([_systemctl(), "--user", "daemon-reload"])] if kind == "systemd" else []


def manager_usable(kind: Kind) -> tuple[bool, str]:
    """Whether the service manager can be driven here, and if not why."""
    exe = shutil.which(_systemctl() if kind == "systemd" else _launchctl())
    if exe is None:
        name = "systemctl" if kind == "systemd" else "launchctl"
        return False, f"{name} is not installed"
    if kind == "systemd":
        probe = subprocess.run(
            [exe, "--user", "show-environment"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
        if probe.returncode != 0:
            return False, "`systemctl --user` cannot reach a user service manager here"
    return True, ""


Printer = Callable[[str], None]


def run_steps(steps: list[Step], say: Printer) -> None:
    """Run each step, printing it first; a failing step stops with its stderr."""
    for step in steps:
        say(f"$ {step}")
        try:
            done = subprocess.run(
                step.argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CliError("service_failed", f"`{step}` could not run: {exc}.") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            raise CliError("service_failed", f"`{step}` failed (exit {done.returncode}): {detail}")


@dataclass
class InstallReport:
    kind: Kind
    path: str
    ran: list[str]
    manual: list[str]
    reason: str = ""


def install(
    kind: Kind,
    home: Path,
    say: Printer,
    *,
    dry_run: bool = False,
    before_start: Callable[[], None] | None = None,
    manual_first: list[str] | None = None,
) -> InstallReport:
    """Write the unit for ``kind`` and enable + start it (or say how to).

    ``before_start`` runs just before the manager starts the unit (the CLI
    stops a daemon it started itself, so the unit's daemon can take the
    home); when the manager is not usable nothing is stopped and
    ``manual_first`` lead the commands printed for the user instead.
    """
    path = unit_path(kind)
    text = render(kind, home)
    steps = install_steps(kind, path)
    if dry_run:
        say(f"would write {path}:")
        say(text)
        return InstallReport(kind, os.fspath(path), [], [str(s) for s in steps], "dry run")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / "logs").mkdir(mode=0o700, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    say(f"wrote {path}")
    usable, reason = manager_usable(kind)
    if not usable:
        manual = [*(manual_first or []), *(str(s) for s in steps)]
        say(f"{reason}; run these by hand to enable and start the daemon:")
        for line in manual:
            say(f"  {line}")
        return InstallReport(kind, os.fspath(path), [], manual, reason)
    if before_start is not None:
        before_start()
    run_steps(steps, say)
    return InstallReport(kind, os.fspath(path), [str(s) for s in steps], [])


def uninstall(kind: Kind, say: Printer, *, dry_run: bool = False) -> InstallReport:
    """Stop and disable the unit, then delete its file: the exact reverse of install."""
    path = unit_path(kind)
    steps = uninstall_steps(kind, path)
    after = after_uninstall_steps(kind)
    if dry_run:
        say(f"would remove {path}")
        return InstallReport(kind, os.fspath(path), [], [str(s) for s in steps + after], "dry run")
    if not path.exists():
        raise CliError("not_installed", f"No {kind} unit is installed at {path}.")
    usable, reason = manager_usable(kind)
    if usable:
        run_steps(steps, say)
    path.unlink()
    say(f"removed {path}")
    if usable:
        run_steps(after, say)
        return InstallReport(kind, os.fspath(path), [str(s) for s in steps + after], [])
    say(f"{reason}; if the service manager knows the unit, run these by hand:")
    for step in steps + after:
        say(f"  {step}")
    return InstallReport(kind, os.fspath(path), [], [str(s) for s in steps + after], reason)
