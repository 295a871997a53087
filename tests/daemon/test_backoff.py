"""Reconnect backoff on virtual time: a fake dialer, a fake store, trio's autojump clock."""

from __future__ import annotations

import base64
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from claudemesh.daemon import workspace as wsmod
from claudemesh.daemon.home import WorkspaceConfig


class FakeStore:
    """Just what run_link touches; real SQLite stays out of virtual time."""

    async def reset_inflight(self) -> int:
        return 0


def make_ws() -> wsmod.Workspace:
    cfg = WorkspaceConfig(
        name="w",
        mesh_id="m",
        member_id="me",
        broker_url="ws://127.0.0.1:9/ws",
        display_name="x",
        role="member",
        root_key=base64.b64encode(b"\0" * 32).decode(),
    )
    return wsmod.Workspace(cfg, FakeStore(), b"\1" * 32, "dev", Path("/"))  # type: ignore[arg-type]


async def test_backoff_doubles_with_jitter_up_to_30s(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    attempts: list[float] = []

    @contextlib.asynccontextmanager
    async def refuse(*args: Any, **kw: Any) -> AsyncIterator[None]:
        attempts.append(trio.current_time())
        raise OSError("connection refused")
        yield  # pragma: no cover

    monkeypatch.setattr(wsmod, "open_websocket_url", refuse)
    ws = make_ws()
    with trio.move_on_after(400):
        await ws.run_link()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    expected = [min(2**i, 30) for i in range(len(gaps))]
    for gap, base in zip(gaps, expected, strict=True):
        assert 0.5 * base + 0.05 <= gap <= base + 0.05 + 1e-6, (gap, base)
    assert gaps[-1] >= 15  # reached the 30 s cap (with jitter)
    assert len({round(g, 6) for g in gaps[:5]}) == 5  # jittered, not fixed
    assert ws.link_state == "backoff"
    assert ws.last_error is not None
    assert "refused" in ws.last_error


async def test_refusal_by_the_broker_is_reported_as_refused(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    class FakeConn:
        async def send_message(self, text: str) -> None:
            pass

        async def get_message(self) -> str:
            return '{"type":"error","code":"revoked","message":"you were removed"}'

    @contextlib.asynccontextmanager
    async def dial(*args: Any, **kw: Any) -> AsyncIterator[FakeConn]:
        yield FakeConn()

    monkeypatch.setattr(wsmod, "open_websocket_url", dial)
    ws = make_ws()
    with trio.move_on_after(5):
        await ws.run_link()
    assert ws.link_state == "refused"
    assert ws.last_error == "revoked: you were removed"
