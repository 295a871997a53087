"""Autostart against stand-in daemon commands, and shell completion scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from claudemesh.clients.cli import autostart
from claudemesh.clients.cli.app import run

FAKE = Path(__file__).with_name("fake_daemon.py")


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Record every daemon the CLI starts, and make sure none outlives the test."""
    procs: list[subprocess.Popen[bytes]] = []
    real = autostart.spawn_daemon

    def spawn(home: Path) -> subprocess.Popen[bytes]:
        proc = real(home)
        procs.append(proc)
        return proc

    monkeypatch.setattr(autostart, "spawn_daemon", spawn)
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _use(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(autostart, "daemon_command", lambda: argv)


def test_start_spawns_detached_and_stop_ends_it(
    home: Path,
    spawned: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use(monkeypatch, [sys.executable, os.fspath(FAKE)])
    assert run(["daemon", "start"]) == 0
    assert len(spawned) == 1
    proc = spawned[0]
    assert capsys.readouterr().out == f"Daemon started (pid {proc.pid}, version fake).\n"
    assert os.getsid(proc.pid) == proc.pid  # its own session: survives the terminal
    assert (home / "logs" / "daemon.stderr.log").stat().st_mode & 0o777 == 0o600
    assert run(["daemon", "start"]) == 0
    assert "already running" in capsys.readouterr().out
    assert len(spawned) == 1
    assert run(["daemon", "stop"]) == 0
    assert proc.wait(timeout=10) == 0


def test_daemon_that_dies_at_start_is_reported(
    home: Path,
    spawned: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use(monkeypatch, [sys.executable, "-c", "import sys; print('boom'); sys.exit(4)"])
    assert run(["peers"]) == 3
    err = capsys.readouterr().err
    assert "exited at start-up (status 4)" in err
    assert "daemon.stderr.log" in err
    assert "boom" in (home / "logs" / "daemon.stderr.log").read_text()


def test_daemon_without_socket_hits_the_deadline(
    home: Path,
    spawned: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use(monkeypatch, [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(autostart, "START_DEADLINE_S", 0.3)
    assert run(["send", "bob", "hi"]) == 3
    err = capsys.readouterr().err
    assert "did not appear within 0.3 s" in err
    assert "claudemesh daemon run" in err


@pytest.mark.parametrize(
    ("shell", "marker"), [("bash", "complete"), ("zsh", "#compdef"), ("fish", "complete -c")]
)
def test_completion_scripts(
    shell: str, marker: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert marker in script
    for word in ("workspace", "message", "peers", "daemon", "json", "no-start"):
        assert word in script
    assert run(["completion", "tcsh"]) == 2


VERBS = [
    "workspace create", "workspace join", "workspace list", "workspace use", "workspace leave",
    "invite create", "peer list", "message send", "message inbox", "message status",
    "status set", "summary set", "verify", "daemon run", "daemon start", "daemon stop",
    "daemon status", "daemon logs", "daemon install", "daemon uninstall", "doctor",
    "send", "peers", "inbox", "completion", "install", "uninstall", "demo",
]  # fmt: skip


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_of_cli_md_is_registered(
    verb: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help resolves each lazy import path, so a typo in a target fails here."""
    assert run([*verb.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert f"Usage: claudemesh {verb}" in out
    if verb not in ("daemon run", "completion", "demo"):
        assert "--json" in out or verb in ("install", "uninstall")


def test_daemon_logs_render_and_json(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert run(["daemon", "logs"]) == 1
    assert "No daemon log" in capsys.readouterr().err
    logs = home / "logs"
    logs.mkdir(parents=True)
    (logs / "daemon.log").write_text(
        '{"ts": 0, "level": "info", "logger": "claudemesh.daemon", "msg": "started"}\n'
        "not json\n"
        '{"ts": 1, "level": "warning", "logger": "claudemesh.link", "msg": "backoff"}\n'
    )
    assert run(["daemon", "logs", "--lines", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "not json"
    assert out[1].endswith("warning claudemesh.link: backoff")
    assert run(["daemon", "logs", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["msg"] for r in doc["records"]] == ["started", "not json", "backoff"]
