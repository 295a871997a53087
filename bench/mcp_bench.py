"""MCP adapter benchmarks (issue 6): message accepted -> channel notification line, hook times.

Runs a real broker, two real daemons and the real adapter subprocess
(``python -m claudemesh.clients.mcp``) in a temporary directory. Alice's
daemon accepts each message over a kept-open workspace socket (so no CLI
process start is counted); the clock stops when Bob's adapter has written
the ``notifications/claude/channel`` line and this process has read it.
Usage::

    .venv/bin/python bench/mcp_bench.py [--n 300] [--json]

Target (issue 6): accepted -> notification p50 <= 20 ms on loopback.
Hooks must finish in well under 200 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cmtest.broker import run_broker
from cmtest.daemon import IpcClient, call, run_daemon, wait_for


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def ms(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(xs, 50) * 1000, 2),
        "p95_ms": round(pct(xs, 95) * 1000, 2),
        "max_ms": round(max(xs) * 1000, 2),
        "n": len(xs),
    }


def link(home: Path) -> str:
    return str(call(home, "daemon.status")["workspaces"][0]["link"])


def hook_times(home: Path, event: str, data: dict[str, Any], n: int) -> list[float]:
    env = {**os.environ, "CLAUDEMESH_HOME": str(home)}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "claudemesh.clients.mcp.hook", event],
            input=json.dumps(data).encode(),
            env=env,
            capture_output=True,
            timeout=30,
            check=True,
        )
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    signal.alarm(600)  # never hang a shared machine
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cm-mcpb-") as d:
        root = Path(d)
        with (
            run_broker(root / "broker") as broker,
            run_daemon(root / "a") as alice,
            run_daemon(root / "b") as bob,
        ):
            call(alice.home, "workspace.create", name="team", broker_url=broker.url)
            wait_for(lambda: link(alice.home) == "connected", timeout=15)
            inv = call(alice.home, "invite.create")
            call(bob.home, "workspace.join", link=inv["link"], display_name="bob")
            wait_for(lambda: link(bob.home) == "connected", timeout=15)
            err_path = root / "adapter.err"
            env = {
                **os.environ,
                "CLAUDEMESH_HOME": str(bob.home),
                "CLAUDEMESH_SESSION_ID": "bench",
                "CLAUDEMESH_MCP_SETTLE_S": "0",
            }
            t_start = time.perf_counter()
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "claudemesh.clients.mcp"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=env,
                )
            assert proc.stdin is not None
            assert proc.stdout is not None
            try:
                init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
                proc.stdin.write(json.dumps(init).encode() + b"\n")
                proc.stdin.flush()
                proc.stdout.readline()
                t_init = time.perf_counter() - t_start
                proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
                proc.stdin.flush()
                wait_for(lambda: b"subscribed to" in err_path.read_bytes(), timeout=20)
                results["adapter_start_to_initialize_reply_ms"] = round(t_init * 1000, 1)
                results["adapter_start_to_subscribed_ms"] = round(
                    (time.perf_counter() - t_start) * 1000, 1
                )
                lat, lat_incl = [], []
                with IpcClient.open(alice.home, socket="team") as c:
                    for i in range(args.n + 20):
                        t0 = time.perf_counter()
                        c.request("message.send", to="bob", body=f"bench {i}")
                        t_acc = time.perf_counter()
                        line = proc.stdout.readline()
                        t1 = time.perf_counter()
                        note = json.loads(line)
                        assert note["params"]["content"] == f"bench {i}", note
                        if i >= 20:  # warm-up
                            lat.append(t1 - t_acc)
                            lat_incl.append(t1 - t0)
                results["accepted_to_notification"] = ms(lat)
                results["send_request_to_notification"] = ms(lat_incl)
            finally:
                proc.stdin.close()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            results["adapter_exit_code_on_stdin_close"] = proc.returncode
            results["hook_session_start"] = ms(
                hook_times(bob.home, "session-start", {"session_id": "bench"}, 20)
            )
            results["hook_prompt_submit"] = ms(
                hook_times(bob.home, "prompt-submit", {"session_id": "bench"}, 20)
            )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
