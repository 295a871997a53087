"""Real daemon subprocesses: one per home, crash recovery, clean stop."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cmtest.daemon import DaemonError, DaemonProc, call, run_daemon

from claudemesh.daemon.home import EXIT_ALREADY_RUNNING


def _second_start(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLAUDEMESH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "claudemesh.daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_second_daemon_exits_at_once(short_tmp: Path) -> None:
    with run_daemon(short_tmp / "h") as d:
        r = _second_start(d.home)
        assert r.returncode == EXIT_ALREADY_RUNNING
        assert "already running" in r.stderr
        assert call(d.home, "daemon.status")["pid"] == d.pid  # the first one is untouched


def test_kill9_leaves_nothing_that_blocks_a_restart(short_tmp: Path) -> None:
    d = DaemonProc(short_tmp / "h")
    try:
        d.start()
        first = d.pid
        d.kill(signal.SIGKILL)
        assert (d.home / "daemon.sock").exists()  # stale socket file left behind
        d.start()
        assert d.pid != first
        assert call(d.home, "daemon.status")["pid"] == d.pid
    finally:
        d.kill()


def test_sigterm_and_stop_request_exit_cleanly(short_tmp: Path) -> None:
    d = DaemonProc(short_tmp / "h")
    try:
        d.start()
        assert d.stop() == 0
        assert not (d.home / "daemon.sock").exists()
        d.start()
        call(d.home, "daemon.stop")
        assert d.proc is not None
        assert d.proc.wait(timeout=15) == 0
    finally:
        d.kill()


def test_everything_created_is_private(short_tmp: Path) -> None:
    with run_daemon(short_tmp / "h") as d:
        call(d.home, "daemon.status")
        for p in d.home.rglob("*"):
            mode = p.stat().st_mode & 0o777
            if p.is_dir():
                assert mode == 0o700, p
            else:
                assert mode & 0o077 == 0, (p, oct(mode))


def test_secret_files_copied_in_with_loose_modes_are_made_private(short_tmp: Path) -> None:
    # The same root on a second machine is copied in by hand; cp and editors
    # keep or widen modes. The daemon tightens what holds secrets at start.
    home = short_tmp / "h"
    (home / "identity").mkdir(parents=True, mode=0o700)
    (home / "identity" / "root.key").write_bytes(os.urandom(32))
    ws = home / "workspaces" / "team"
    ws.mkdir(parents=True, mode=0o700)
    cfg = {
        "name": "team",
        "mesh_id": "m1",
        "member_id": "u1",
        "broker_url": "ws://127.0.0.1:9/ws",
        "display_name": "me",
        "role": "member",
        "root_key": base64.b64encode(os.urandom(32)).decode(),
    }
    (ws / "config.json").write_text(json.dumps(cfg))
    (home / "state.json").write_text(json.dumps({"default": "team"}))
    loose = [home / "identity" / "root.key", ws / "config.json", home / "state.json"]
    for p in loose:
        p.chmod(0o644)
    with run_daemon(home):
        for p in loose:
            assert p.stat().st_mode & 0o777 == 0o600, p


def test_a_corrupt_store_or_config_stops_only_its_workspace(short_tmp: Path) -> None:
    home = short_tmp / "h"
    for name in ("good", "bad"):
        ws = home / "workspaces" / name
        ws.mkdir(parents=True, mode=0o700)
        cfg = {
            "name": name,
            "mesh_id": f"m-{name}",
            "member_id": "u1",
            "broker_url": "ws://127.0.0.1:9/ws",
            "display_name": "me",
            "role": "member",
            "root_key": base64.b64encode(os.urandom(32)).decode(),
        }
        (ws / "config.json").write_text(json.dumps(cfg))
    garbage = b"not a database " * 100
    (home / "workspaces" / "bad" / "store.db").write_bytes(garbage)
    (home / "workspaces" / "torn").mkdir(mode=0o700)
    (home / "workspaces" / "torn" / "config.json").write_text('{"name": "torn", "mesh')
    with run_daemon(home) as d:
        status = call(d.home, "daemon.status")
        assert [w["name"] for w in status["workspaces"]] == ["good"]
        bad, torn = status["unavailable_workspaces"]
        assert bad["name"] == "bad"
        assert "not a database" in bad["error"]
        assert torn["name"] == "torn"
        assert "unreadable" in torn["error"]
        # The broken store is left as it was, for the user to inspect or restore.
        assert (home / "workspaces" / "bad" / "store.db").read_bytes() == garbage
        with pytest.raises(DaemonError) as ei:  # and its config is not overwritten
            call(d.home, "workspace.create", name="bad", broker_url="ws://127.0.0.1:9/ws")
        assert ei.value.code == "conflict"
        shown = subprocess.run(
            [str(Path(sys.executable).with_name("claudemesh")), "daemon", "status"],
            env={**os.environ, "CLAUDEMESH_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "Workspace bad is not running" in shown
