"""How long a newcomer waits: ``claudemesh demo`` wall time and per-state latency.

Runs ``claudemesh demo --json`` N times (real broker, two real daemons,
everything started and stopped each run) and prints the median wall time of
a whole run and the median time from ``message.send`` until the sender's
daemon reported each state, for the online messages (1 and 2) and for the
message sent while Bob was offline (3: ``delivered`` includes restarting
Bob's daemon). Also times ``claudemesh doctor --json`` with no daemon.

    .venv/bin/python bench/demo_bench.py [RUNS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLAUDEMESH = Path(sys.executable).parent / "claudemesh"


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    walls: list[float] = []
    online: dict[str, list[float]] = {}
    offline: dict[str, list[float]] = {}
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [os.fspath(CLAUDEMESH), "demo", "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        walls.append(time.perf_counter() - t0)
        doc = json.loads(proc.stdout)
        for i, m in enumerate(doc["messages"]):
            into = offline if i == 2 else online
            for state, ms in m["elapsed_ms"].items():
                into.setdefault(state, []).append(ms)
    print(f"claudemesh demo, {runs} runs")
    print(f"  whole run (wall): median {statistics.median(walls):.2f} s, max {max(walls):.2f} s")
    for label, data in (("online DMs", online), ("offline DM", offline)):
        cells = ", ".join(f"{s} {statistics.median(v):.0f} ms" for s, v in data.items())
        print(f"  {label} (median from send): {cells}")
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, CLAUDEMESH_HOME=os.fspath(Path(home) / "h"))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(
                [os.fspath(CLAUDEMESH), "doctor", "--json"],
                capture_output=True,
                env=env,
                timeout=60,
                check=False,
            )
            times.append(time.perf_counter() - t0)
    print(f"claudemesh doctor (no daemon): median {statistics.median(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
