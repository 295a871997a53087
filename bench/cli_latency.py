"""Whole-process wall time of hot CLI verbs against a running daemon.

Starts a real broker and two daemons (alice, bob) in a temporary folder,
joins bob through an invite, then times N complete runs of the installed
``claudemesh`` executable for each verb: ``message send bob ...`` (the reply
comes after the outbox row is committed: durable accept included) and
``peer list`` (which asks the broker for fresh presence). Also times
``workspace list`` (the cyclopts path) and a bare interpreter for scale,
and sums ``python -X importtime`` for the send path.

    .venv/bin/python bench/cli_latency.py [RUNS]   # default 50
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXE = Path(sys.executable).with_name("claudemesh")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [os.fspath(EXE), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"claudemesh {' '.join(args)} failed: {done.stderr}")
    return done.stdout


CPU: dict[str, list[float]] = {}


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(argv: list[str], env: dict[str, str], runs: int, name: str = "") -> list[float]:
    """Wall ms per run; the child's CPU ms (less sensitive to a busy machine) go to CPU[name]."""
    out = []
    cpu = CPU.setdefault(name, [])
    for _ in range(runs):
        c0 = _child_cpu()
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True, timeout=60)
        out.append((time.perf_counter() - t0) * 1000)
        cpu.append((_child_cpu() - c0) * 1000)
    return out


def in_process_ms(env: dict[str, str], argv: list[str], runs: int) -> list[float]:
    """The verb without interpreter start-up or imports: daemon round trip + rendering."""
    code = (
        "import os, sys, time, json\n"
        "from claudemesh.clients.cli.app import run\n"
        "out = []\n"
        "null = open(os.devnull, 'w')\n"
        f"for _ in range({runs}):\n"
        "    t0 = time.perf_counter()\n"
        "    sys.stdout = null\n"
        "    rc = run(sys.argv[1:])\n"
        "    sys.stdout = sys.__stdout__\n"
        "    assert rc == 0\n"
        "    out.append((time.perf_counter() - t0) * 1000)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    values: list[float] = json.loads(done.stdout)
    return values


def import_total_ms(env: dict[str, str], argv: list[str]) -> float:
    code = "import sys; from claudemesh.clients.cli.app import run; sys.exit(run(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    total = 0
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|", line)
        if m:
            total += int(m.group(1))
    return total / 1000


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    root = Path(tempfile.mkdtemp(prefix="cmbench"))
    procs: list[subprocess.Popen[bytes]] = []
    homes = {n: root / n for n in ("alice", "bob")}
    envs = {n: dict(os.environ, CLAUDEMESH_HOME=os.fspath(h)) for n, h in homes.items()}
    try:
        port_file = root / "broker.port"
        broker = subprocess.Popen(
            [sys.executable, "-m", "claudemesh.broker", "serve", "--port", "0",
             "--port-file", os.fspath(port_file), "--db", os.fspath(root / "broker.db")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(broker)
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or broker.poll() is not None:
                raise SystemExit("broker did not start")
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{port_file.read_text().strip()}/ws"
        cli(envs["alice"], "workspace", "create", "bench", "--broker", url)
        link = cli(envs["alice"], "invite", "create").splitlines()[0]
        cli(envs["bob"], "workspace", "join", link, "--name", "bob")
        deadline = time.monotonic() + 20
        while "bob" not in cli(envs["alice"], "peer", "list"):
            if time.monotonic() > deadline:
                raise SystemExit("alice never saw bob")
            time.sleep(0.1)

        env = envs["alice"]
        results: dict[str, list[float]] = {}
        for _ in range(3):  # warm the page cache and the daemon
            timed([os.fspath(EXE), "send", "bob", "warm"], env, 1)
        verbs = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "claudemesh message send bob TEXT": [
                os.fspath(EXE), "message", "send", "bob", "benchmark message"
            ],
            "claudemesh peer list": [os.fspath(EXE), "peer", "list"],
            "claudemesh workspace list (cyclopts path)": [os.fspath(EXE), "workspace", "list"],
        }  # fmt: skip
        # Interleaved rounds, so a burst of load elsewhere hits every verb alike.
        for name in verbs:
            results[name] = []
        for _ in range(runs):
            for name, argv in verbs.items():
                results[name] += timed(argv, env, 1, name)
        inproc = {
            "message send": in_process_ms(env, ["send", "bob", "in-process"], runs),
            "peer list": in_process_ms(env, ["peer", "list"], runs),
        }
        imports = {
            "send path": import_total_ms(env, ["send", "bob", "importtime"]),
            "workspace list (cyclopts)": import_total_ms(env, ["workspace", "list"]),
        }
        report: dict[str, Any] = {
            "runs": runs,
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "wall": {},
            "child_cpu_p50_ms": {
                k: round(statistics.median(v), 1) for k, v in CPU.items() if k in results
            },
            "in_process": {},
            "importtime_total_ms": imports,
        }
        for name, values in results.items():
            report["wall"][name] = {
                "p50_ms": round(statistics.median(values), 1),
                "p95_ms": round(pct(values, 95), 1),
                "max_ms": round(max(values), 1),
            }
        for name, values in inproc.items():
            report["in_process"][name] = {
                "p50_ms": round(statistics.median(values), 2),
                "p95_ms": round(pct(values, 95), 2),
            }
        print(json.dumps(report, indent=2))
    finally:
        for env in envs.values():
            subprocess.run([os.fspath(EXE), "daemon", "stop"], env=env, capture_output=True,
                           timeout=30, check=False)  # fmt: skip
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
