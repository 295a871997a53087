"""Service units: both templates render and validate; install/uninstall are exact reverses.

The service manager is never the real one: HOME and XDG_CONFIG_HOME point
into a temporary folder and CLAUDEMESH_SYSTEMCTL names a recording fake.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from claudemesh.clients.cli import service
from claudemesh.clients.cli.app import run


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_renders_with_hardening(tmp_path: Path) -> None:
    home = tmp_path / "cm home"
    text = service.render_systemd("/opt/py/bin/python3", os.fspath(home), "/l/daemon.log")
    assert "@" not in text.replace("claudemesh-daemon", "")
    unit = parse_unit(text)
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert svc["ExecStart"] == ["/opt/py/bin/python3 -m claudemesh.daemon"]
    assert svc["Environment"] == [f'"CLAUDEMESH_HOME={home}"']
    assert svc["Restart"] == ["on-failure"]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert svc["PrivateTmp"] == ["yes"]
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["ReadWritePaths"] == [f'"{home}"']
    assert svc["StandardOutput"] == ["append:/l/daemon.log"]
    assert unit["Unit"]["StartLimitBurst"] == ["5"]
    assert unit["Install"]["WantedBy"] == ["default.target"]


def test_systemd_quoting_escapes_specifiers() -> None:
    text = service.render_systemd("/p/100%/python", "/h", "/h/l")
    assert parse_unit(text)["Service"]["ExecStart"] == ["/p/100%%/python -m claudemesh.daemon"]


def test_line_breaks_in_paths_are_refused() -> None:
    with pytest.raises(service.CliError):
        service.render_systemd("/p/python", "/h\nExecStartPre=/bin/evil", "/h/l")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    unit = tmp_path / service.SYSTEMD_UNIT
    unit.write_text(service.render_systemd(sys.executable, os.fspath(home), "/tmp/x.log"))

    def verify(*mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", *mode, os.fspath(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = verify("--user")
    if done.returncode != 0 and "Failed to initialize manager" in done.stderr:
        # No user manager here (containers, CI): the system-mode check still
        # parses every key and resolves ExecStart.
        done = verify()
    assert done.returncode == 0, done.stderr
    assert service.SYSTEMD_UNIT not in done.stderr, done.stderr


def test_launchd_plist_renders_and_parses(tmp_path: Path) -> None:
    text = service.render_launchd("/opt/py & co/python", "/Users/a/.claudemesh", "/l/d.log")
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == "com.claudemesh.daemon"
    assert plist["ProgramArguments"] == ["/opt/py & co/python", "-m", "claudemesh.daemon"]
    assert plist["EnvironmentVariables"] == {"CLAUDEMESH_HOME": "/Users/a/.claudemesh"}
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "/l/d.log"


def _fake_ctl(tmp: Path) -> tuple[Path, Path]:
    """A systemctl/launchctl stand-in that appends its argv to a file."""
    record = tmp / "calls.jsonl"
    script = tmp / "fakectl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({os.fspath(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    return script, record


def _calls(record: Path) -> list[list[str]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_install_then_uninstall_systemd(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ctl, record = _fake_ctl(tmp_path)
    monkeypatch.setenv("CLAUDEMESH_SYSTEMCTL", os.fspath(ctl))
    assert run(["daemon", "install", "--systemd"]) == 0
    out = capsys.readouterr().out
    path = service.systemd_unit_path()
    assert path.is_file()
    assert os.fspath(Path(os.environ["XDG_CONFIG_HOME"])) in os.fspath(path)
    unit = parse_unit(path.read_text())
    assert unit["Service"]["ExecStart"] == [
        f"{os.path.abspath(sys.executable)} -m claudemesh.daemon"
    ]
    assert unit["Service"]["Environment"] == [f"CLAUDEMESH_HOME={home}"]
    enable = ["--user", "enable", "--now", "claudemesh-daemon.service"]
    assert _calls(record) == [
        ["--user", "show-environment"],
        ["--user", "daemon-reload"],
        enable,
    ]
    assert f"$ {ctl} --user enable --now claudemesh-daemon.service" in out
    record.unlink()

    assert run(["daemon", "uninstall", "--systemd"]) == 0
    assert not path.exists()
    assert _calls(record) == [
        ["--user", "show-environment"],
        ["--user", "disable", "--now", "claudemesh-daemon.service"],
        ["--user", "daemon-reload"],
    ]
    assert run(["daemon", "uninstall", "--systemd"]) == 1  # nothing left to remove


def test_install_without_service_manager_prints_manual_steps(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLAUDEMESH_SYSTEMCTL", "/nonexistent/systemctl")
    assert run(["daemon", "install", "--systemd", "--json"]) == 0
    got = capsys.readouterr()
    doc = json.loads(got.out)
    assert doc["ran"] == []
    assert doc["manual"] == [
        "/nonexistent/systemctl --user daemon-reload",
        "/nonexistent/systemctl --user enable --now claudemesh-daemon.service",
    ]
    assert "not installed" in got.err
    assert "run these by hand" in got.err
    assert service.systemd_unit_path().exists()


def test_install_launchd_dry_run_writes_nothing(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["daemon", "install", "--launchd", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would write" in out
    assert "<key>RunAtLoad</key>" in out
    assert not service.launchd_plist_path().exists()
    assert run(["daemon", "install", "--launchd", "--systemd"]) == 2


def test_failing_service_manager_is_reported(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "badctl"
    script.write_text(
        "#!/bin/sh\n[ \"$2\" = show-environment ] && exit 0\necho 'unit masked' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("CLAUDEMESH_SYSTEMCTL", os.fspath(script))
    assert run(["daemon", "install", "--systemd"]) == 1
    assert "unit masked" in capsys.readouterr().err


def test_install_without_manager_leaves_a_running_daemon_alone(
    fake: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLAUDEMESH_SYSTEMCTL", "/nonexistent/systemctl")
    assert run(["daemon", "install", "--systemd"]) == 0
    out = capsys.readouterr().out
    assert "  claudemesh daemon stop\n" in out
    assert ("daemon.stop", {}) not in fake.requests


def test_install_hands_a_running_daemon_over_to_the_unit(
    fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ctl, record = _fake_ctl(tmp_path)
    monkeypatch.setenv("CLAUDEMESH_SYSTEMCTL", os.fspath(ctl))
    assert run(["daemon", "install", "--systemd"]) == 0
    assert "stopping the running daemon" in capsys.readouterr().out
    assert ("daemon.stop", {}) in fake.requests
    assert _calls(record)[-1] == ["--user", "enable", "--now", "claudemesh-daemon.service"]


def test_daemon_start_goes_through_an_installed_unit(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from claudemesh.clients.cli import autostart

    ctl, record = _fake_ctl(tmp_path)
    monkeypatch.setenv("CLAUDEMESH_SYSTEMCTL", os.fspath(ctl))
    monkeypatch.setattr(autostart, "START_DEADLINE_S", 0.2)
    unit = service.systemd_unit_path()
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    # The recording systemctl starts nothing, so the socket never appears.
    assert run(["daemon", "start"]) == 3
    assert _calls(record) == [["--user", "start", "claudemesh-daemon.service"]]
    assert "did not appear within 0.2 s" in capsys.readouterr().err


def test_install_then_uninstall_launchd(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ctl, record = _fake_ctl(tmp_path)
    monkeypatch.setenv("CLAUDEMESH_LAUNCHCTL", os.fspath(ctl))
    assert run(["daemon", "install", "--launchd", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    path = service.launchd_plist_path()
    assert doc["path"] == os.fspath(path)
    assert path.parent == Path(os.environ["HOME"]) / "Library" / "LaunchAgents"
    plist = plistlib.loads(path.read_bytes())
    assert plist["EnvironmentVariables"]["CLAUDEMESH_HOME"] == os.fspath(home)
    assert plist["ProgramArguments"][0] == os.path.abspath(sys.executable)
    domain = f"gui/{os.getuid()}"
    assert _calls(record) == [["bootstrap", domain, os.fspath(path)]]
    record.unlink()
    assert run(["daemon", "uninstall", "--launchd"]) == 0
    assert _calls(record) == [["bootout", f"{domain}/com.claudemesh.daemon"]]
    assert not path.exists()
