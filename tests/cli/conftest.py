"""Fixtures for the CLI tests: short temporary homes and a scripted fake daemon."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fake_daemon import FakeDaemon


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A CLAUDEMESH_HOME short enough for a unix socket path; HOME and XDG moved too."""
    root = Path(tempfile.mkdtemp(prefix="cmcli"))
    h = root / "home"
    monkeypatch.setenv("CLAUDEMESH_HOME", os.fspath(h))
    monkeypatch.setenv("HOME", os.fspath(root / "user"))
    monkeypatch.setenv("XDG_CONFIG_HOME", os.fspath(root / "user" / ".config"))
    yield h
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fake(home: Path) -> Iterator[FakeDaemon]:
    with FakeDaemon(home) as f:
        yield f
