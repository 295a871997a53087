"""``claudemesh doctor``: real subprocesses end to end, plus the pure checks.

End-to-end cases run the installed ``claudemesh doctor`` against a real
broker and a real daemon in a temporary home and read its JSON document
(and once, its human output). Short temporary paths keep the daemon's unix
socket under the ~107-byte limit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cmtest.broker import BrokerProc, run_broker
from cmtest.daemon import DaemonProc, call, run_daemon, wait_for

from claudemesh import __version__
from claudemesh.clients.cli import doctor as doc
from claudemesh.shared.protocol.ipc import IPC_API_VERSION

CLAUDEMESH = Path(sys.executable).parent / "claudemesh"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cmdr-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_doctor(home: Path, *args: str) -> tuple[int, str]:
    env = dict(os.environ, CLAUDEMESH_HOME=os.fspath(home), HOME=os.fspath(home.parent))
    proc = subprocess.run(
        [os.fspath(CLAUDEMESH), "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def doctor_json(home: Path) -> tuple[int, dict[str, Any]]:
    rc, out = run_doctor(home, "--json")
    return rc, json.loads(out)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def link_state(home: Path) -> str:
    ws = call(home, "daemon.status")["workspaces"]
    return str(ws[0]["link"]) if ws else "none"


@pytest.fixture
def setup(short_tmp: Path) -> Iterator[tuple[BrokerProc, DaemonProc]]:
    """A broker and a daemon with one connected workspace ``team``."""
    with run_broker(short_tmp) as broker, run_daemon(short_tmp / "h") as daemon:
        call(daemon.home, "workspace.create", name="team", broker_url=broker.url)
        wait_for(lambda: link_state(daemon.home) == "connected", what="link up")
        yield broker, daemon


# ------------------------------------------------------------------ end to end


def test_no_daemon_fails_with_advice(short_tmp: Path) -> None:
    rc, report = doctor_json(short_tmp / "nothing")
    checks = by_name(report)
    assert rc == 1
    assert report["ok"] is False
    assert checks["home"]["status"] == "warn"
    assert checks["daemon"]["status"] == "fail"
    assert "claudemesh daemon start" in checks["daemon"]["hint"]
    # Doctor must not have started a daemon behind our back.
    assert not (short_tmp / "nothing" / "daemon.sock").exists()


def test_healthy_installation_passes(setup: tuple[BrokerProc, DaemonProc]) -> None:
    broker, daemon = setup
    rc, report = doctor_json(daemon.home)
    checks = by_name(report)
    assert rc == 0, report
    assert report["ok"] is True
    for name in ("daemon", "versions", "workspace team", "workspace team queues"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks[f"broker {broker.url}"]["status"] == "ok"
    assert checks["home"]["status"] in ("ok", "warn")
    assert "claude code" in checks
    # No secret ever appears in the report.
    root_key = (daemon.home / "identity" / "root.key").read_bytes()
    text = json.dumps(report)
    assert root_key.hex() not in text
    assert "root_key" not in text


def test_broker_down_is_a_failure_that_says_what_to_do(
    setup: tuple[BrokerProc, DaemonProc],
) -> None:
    broker, daemon = setup
    broker.stop()
    wait_for(lambda: link_state(daemon.home) != "connected", what="link down")
    rc, report = doctor_json(daemon.home)
    checks = by_name(report)
    assert rc == 1
    assert checks[f"broker {broker.url}"]["status"] == "fail"
    assert "Cannot reach" in checks[f"broker {broker.url}"]["message"]
    assert checks["workspace team"]["status"] == "warn"
    rc, text = run_doctor(daemon.home)
    assert rc == 1
    assert f"FAIL  broker {broker.url}: Cannot reach" in text
    assert "→ Is the broker running" in text
    assert "failed" in text.splitlines()[-1]


def test_open_key_file_fails_with_the_chmod_to_run(
    setup: tuple[BrokerProc, DaemonProc],
) -> None:
    _, daemon = setup
    key = daemon.home / "identity" / "root.key"
    key.chmod(0o644)
    rc, report = doctor_json(daemon.home)
    home = by_name(report)["home"]
    assert rc == 1
    assert home["status"] == "fail"
    assert f"chmod 600 {key}" in home["hint"]
    key.chmod(0o600)
    (daemon.home / "identity").chmod(0o755)
    rc, report = doctor_json(daemon.home)
    assert rc == 1
    assert f"chmod 700 {daemon.home / 'identity'}" in by_name(report)["home"]["hint"]


# ------------------------------------------------------------------ pure checks


def test_probe_reports_a_non_websocket_answer() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        check = doc.probe_broker(f"ws://127.0.0.1:{port}/ws")
    finally:
        t.join(5)
        srv.close()
    assert check.status == "fail"
    assert "404 Not Found" in check.message
    assert "Upgrade" in check.hint


def test_probe_rejects_a_malformed_url() -> None:
    assert doc.probe_broker("http://example.com/ws").status == "fail"


def test_versions() -> None:
    assert doc.check_versions(__version__, IPC_API_VERSION).status == "ok"
    assert doc.check_versions("0.0.0-old", IPC_API_VERSION).status == "warn"
    mismatch = doc.check_versions(__version__, IPC_API_VERSION + 1)
    assert mismatch.status == "fail"
    assert "daemon stop && claudemesh daemon start" in mismatch.hint


def _ws(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "team",
        "broker_url": "ws://b/ws",
        "link": "connected",
        "outbox": {"pending": 0, "inflight": 0, "dead": 0},
        "inbox_unread": 0,
        "quarantined": 0,
    }
    base.update(extra)
    return base


def _statuses(ws: dict[str, Any]) -> dict[str, str]:
    return {c.name: c.status for c in doc.check_workspace(ws)}


def test_workspace_checks() -> None:
    assert set(_statuses(_ws()).values()) == {"ok"}
    refused = _statuses(_ws(link="refused", last_error="revoked"))
    assert refused["workspace team"] == "fail"
    assert _statuses(_ws(link="backoff"))["workspace team"] == "warn"
    dead = _ws(outbox={"pending": 0, "inflight": 0, "dead": 2})
    assert _statuses(dead)["workspace team queues"] == "warn"
    backlog = _ws(outbox={"pending": 500, "inflight": 0, "dead": 0})
    assert _statuses(backlog)["workspace team queues"] == "warn"
    assert _statuses(_ws(quarantined=1))["workspace team quarantine"] == "warn"


@pytest.mark.parametrize(
    ("offset_ms", "status"), [(5, "ok"), (-15_000, "warn"), (61_000, "fail"), (-90_000, "fail")]
)
def test_clock_skew(offset_ms: int, status: str) -> None:
    assert _statuses(_ws(server_time_offset_ms=offset_ms))["workspace team clock"] == status


def test_claude_code_registration_is_checked(short_tmp: Path) -> None:
    home = short_tmp / "h"
    env = dict(os.environ, CLAUDEMESH_HOME=os.fspath(home), HOME=os.fspath(short_tmp))
    # Keep any real `claude` command off PATH: install would hand it the config.
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not (Path(p) / "claude").exists()
    )
    _, report = doctor_json(home)
    assert by_name(report)["claude code"]["status"] == "warn"
    subprocess.run(
        [os.fspath(CLAUDEMESH), "install"], env=env, capture_output=True, timeout=60, check=True
    )
    _, report = doctor_json(home)
    assert by_name(report)["claude code"]["status"] == "ok", report
    skill = short_tmp / ".claude" / "skills" / "claudemesh" / "SKILL.md"
    skill.unlink()
    rc, report = doctor_json(home)
    check = by_name(report)["claude code"]
    assert rc == 1
    assert check["status"] == "fail"
    assert "skill" in check["message"]
    assert "claudemesh install" in check["hint"]
