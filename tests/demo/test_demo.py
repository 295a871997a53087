"""``claudemesh demo`` end to end: the real command, as a subprocess.

Each test reads the narration (or the JSON document) for every step and
state, then proves that no process the demo started is left and that its
temporary tree is gone -- after success, after Ctrl-C, and after
``--keep`` once the printed stop commands have run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLAUDEMESH = Path(sys.executable).parent / "claudemesh"
RUN_TIMEOUT_S = 150.0


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CLAUDEMESH_HOME", None)
    # The demo must not need (or touch) the user's real home.
    env["HOME"] = os.fspath(tmp_path)
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _ours(pid: int) -> bool:
    """Still a claudemesh process (not a recycled pid)."""
    try:
        return b"claudemesh" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid)
    except OSError:
        return False


def _wait_gone(pids: list[int], deadline_s: float = 15.0) -> list[int]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        left = [p for p in pids if _ours(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _ours(p)]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if _ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"\(pid (\d+)", text)]


def _workdir(text: str) -> Path:
    m = re.search(r"on this machine, in (\S+)", text)
    assert m, text
    return Path(m.group(1))


def test_demo_narrates_every_state_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [os.fspath(CLAUDEMESH), "demo"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=_env(tmp_path),
        check=False,
    )
    out = proc.stdout
    pids = _pids(out)
    try:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
        assert "Broker listening on ws://127.0.0.1:" in out
        for who in ("Alice", "Bob"):
            assert f"{who}'s daemon started" in out
        assert 'Alice created workspace "demo"' in out
        assert "invite link: claudemesh://join/" in out
        assert "Bob joined through the link" in out
        # The link's secret (after '#') must not be printed.
        assert re.search(r"claudemesh://join/\S+#[A-Za-z0-9_-]{8}", out) is None
        # Three messages, each through all four states, in order.
        states = re.findall(r"^\s+(accepted|sent|delivered|surfaced)\s", out, re.M)
        assert states == ["accepted", "sent", "delivered", "surfaced"] * 3, out
        assert out.count("reads the inbox") == 3
        numbers = re.findall(r"view of \w+:\s+((?:\d{5} ){5}\d{5})", out)
        assert len(numbers) == 2, out
        assert numbers[0] == numbers[1], out
        assert "they agree" in out
        assert "Bob is offline" in out
        assert "waits on the broker (state: sent)" in out
        assert "Bob's daemon restarted" in out
        assert "Cleaned up" in out
        # broker, Alice, Bob, Bob again (the stopped one is reported twice).
        assert len(set(pids)) == 4, out
        assert _wait_gone(pids) == []
        assert not _workdir(out).exists()
    finally:
        _kill(pids)


def _read_until(proc: subprocess.Popen[bytes], needle: str, deadline_s: float) -> str:
    """Read the demo's stdout until ``needle`` shows up (or fail at the deadline)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    seen = b""
    end = time.monotonic() + deadline_s
    while needle.encode() not in seen:
        left = end - time.monotonic()
        if left <= 0:
            pytest.fail(f"never saw {needle!r} in time:\n{seen.decode()}")
        if sel.select(min(left, 0.5)):
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"never saw {needle!r} (exit {proc.wait(5)}):\n{seen.decode()}")
            seen += chunk
    return seen.decode()


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGINT, 130, b"Interrupted"), (signal.SIGTERM, 143, b"Terminated")],
)
def test_interrupt_stops_everything(tmp_path: Path, sig: int, code: int, said: bytes) -> None:
    proc = subprocess.Popen(
        [os.fspath(CLAUDEMESH), "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(tmp_path),
    )
    pids: list[int] = []
    try:
        seen = _read_until(proc, "Bob's daemon started", 60)
        pids = _pids(seen)
        assert len(pids) == 3
        assert all(_ours(p) for p in pids)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == code, f"{seen}{rest.decode()}\n{err.decode()}"
        assert said in err
        assert _wait_gone(pids) == []
        assert not _workdir(seen).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _kill(pids)


def test_keep_leaves_it_running_and_the_printed_commands_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [os.fspath(CLAUDEMESH), "demo", "--keep"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=_env(tmp_path),
        check=False,
    )
    out = proc.stdout
    pids = _pids(out)
    workdir = _workdir(out) if "on this machine, in" in out else None
    try:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
        assert "Cleaned up" not in out
        running = [p for p in set(pids) if _ours(p)]
        assert len(running) == 3, out  # broker, Alice, restarted Bob
        lines = out.splitlines()
        # The hand-use commands really talk to the kept daemons.
        inbox = next(line.strip() for line in lines if line.strip().endswith(" message inbox"))
        shown = subprocess.run(
            ["bash", "-c", inbox],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(tmp_path),
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert "The link is in the PR description" in shown.stdout
        # And doctor finds the kept installation healthy.
        alice_home = re.search(r"CLAUDEMESH_HOME=(\S+/alice)\b", out)
        assert alice_home, out
        checked = subprocess.run(
            [os.fspath(CLAUDEMESH), "doctor", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(_env(tmp_path), CLAUDEMESH_HOME=alice_home.group(1)),
            check=False,
        )
        assert checked.returncode == 0, checked.stdout
        assert json.loads(checked.stdout)["ok"] is True
        stop = lines[lines.index("Stop it all when done:") + 1].strip()
        done = subprocess.run(
            ["bash", "-c", stop], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert _wait_gone(pids) == []
        assert workdir is not None
        assert not workdir.exists()
    finally:
        _kill(pids)
        if workdir is not None:
            subprocess.run(["rm", "-rf", os.fspath(workdir)], check=False)


def test_json_is_one_document(tmp_path: Path) -> None:
    proc = subprocess.run(
        [os.fspath(CLAUDEMESH), "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=_env(tmp_path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    pids = [doc["broker"]["pid"], *(u["pid"] for u in doc["users"].values())]
    try:
        assert doc["ok"] is True
        assert [m["states"] for m in doc["messages"]] == [
            ["accepted", "sent", "delivered", "surfaced"]
        ] * 3
        sn = doc["safety_numbers"]
        assert sn["alice_sees_bob"] == sn["bob_sees_alice"]
        assert _wait_gone(pids) == []
        assert not Path(doc["workdir"]).exists()
    finally:
        _kill(pids)
