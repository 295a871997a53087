"""The layout rules of architecture.md section 2, proven under the test runner."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_source_folders_importable() -> None:
    for name in ("daemon", "broker", "clients", "shared"):
        assert importlib.util.find_spec(name) is None, name


def test_protocol_package_does_not_import_trio() -> None:
    code = (
        "import sys\n"
        "import claudemesh.shared.protocol.wire, claudemesh.shared.protocol.framing\n"
        "import claudemesh.shared.protocol.ipc, claudemesh.shared.protocol.crypto\n"
        "import claudemesh.shared.protocol.ids, claudemesh.shared.protocol.errors\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'trio', 'trio_websocket'}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)


def test_editable_install_picks_up_new_modules() -> None:
    name = f"_probe_{uuid.uuid4().hex[:8]}"
    path = ROOT / "shared" / "protocol" / f"{name}.py"
    path.write_text("VALUE = 42\n")
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from claudemesh.shared.protocol import {name}; print({name}.VALUE)",
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT.parent,
        )
        assert out.stdout.strip() == "42"
    finally:
        path.unlink()


@pytest.mark.slow
def test_wheel_contains_only_the_claudemesh_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("claudemesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"claudemesh", next(t for t in tops if t.endswith(".dist-info"))}
    for expected in (
        "claudemesh/__init__.py",
        "claudemesh/py.typed",
        "claudemesh/shared/protocol/wire.py",
        "claudemesh/daemon/__init__.py",
        "claudemesh/broker/__init__.py",
        "claudemesh/clients/cli/__init__.py",
    ):
        assert expected in names
    assert not any("__pycache__" in n for n in names)
