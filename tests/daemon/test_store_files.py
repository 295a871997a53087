"""The store's SQLite side files are as private as the database itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys, trio
from pathlib import Path
os.umask(0o022)  # a permissive umask, as a library user or a test runner may have
from claudemesh.daemon.store import Store

store = Store(Path(sys.argv[1]))

async def main():
    await store.kv_set("k", 1)
    for suffix in ("", "-wal", "-shm"):
        print(oct(os.stat(sys.argv[1] + suffix).st_mode & 0o777))

trio.run(main)
"""


def test_wal_and_shm_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ},
    )
    assert out.stdout.split() == ["0o600", "0o600", "0o600"], out.stdout
