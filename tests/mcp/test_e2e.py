"""End to end: a real broker, two real daemons, and the real adapter subprocess over stdio.

Alice's daemon sends; Bob's adapter (``python -m claudemesh.clients.mcp`` with
``CLAUDEMESH_HOME`` = Bob's home) must turn it into exactly one channel
notification. Driven both by the official ``mcp`` SDK client and by a raw
line-level JSON-RPC client that sees every byte on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cmtest.broker import run_broker
from cmtest.daemon import DaemonError, DaemonProc, call, run_daemon, wait_for
from mcp.client import Client
from mcp.client.extension import ClientExtension, NotificationBinding
from mcp.client.stdio import StdioServerParameters, stdio_client
from pydantic import BaseModel, ConfigDict

pytestmark = pytest.mark.slow

ADAPTER = [sys.executable, "-m", "claudemesh.clients.mcp"]
SETTLE_S = 0.3


class Mesh:
    def __init__(self, url: str, alice: DaemonProc, bob: DaemonProc, root: Path) -> None:
        self.url, self.alice, self.bob, self.root = url, alice, bob, root

    def env(self, session_id: str) -> dict[str, str]:
        return {
            "CLAUDEMESH_HOME": str(self.bob.home),
            "CLAUDEMESH_SESSION_ID": session_id,
            "CLAUDEMESH_MCP_SETTLE_S": str(SETTLE_S),
            "CLAUDEMESH_LOG_LEVEL": "INFO",
        }

    def send(self, body: str, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = call(self.alice.home, "message.send", to="bob", body=body, **kw)
        return out


def _link(home: Path) -> str:
    return str(call(home, "daemon.status")["workspaces"][0]["link"])


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="cm-mcpe-") as d:
        root = Path(d)
        with (
            run_broker(root / "broker") as broker,
            run_daemon(root / "a") as alice,
            run_daemon(root / "b") as bob,
        ):
            call(
                alice.home,
                "workspace.create",
                name="team",
                broker_url=broker.url,
                display_name="alice",
            )
            wait_for(lambda: _link(alice.home) == "connected", timeout=15, what="alice link")
            inv = call(alice.home, "invite.create", workspace="team")
            call(bob.home, "workspace.join", link=inv["link"], display_name="bob")
            wait_for(lambda: _link(bob.home) == "connected", timeout=15, what="bob link")
            yield Mesh(broker.url, alice, bob, root)


# ---- a raw line-level client ----------------------------------------------------------


class RawClient:
    """Drives the adapter subprocess line by line and keeps every stdout line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[bytes] = []
        self._buf = b""

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(json.dumps(msg).encode() + b"\n")

    async def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with trio.fail_after(20):
            while b"\n" not in self._buf:
                data = await self.proc.stdout.receive_some()
                if not data:
                    raise EOFError("adapter closed stdout")
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        self.lines.append(line)
        out: dict[str, Any] = json.loads(line)
        return out

    async def handshake(self) -> dict[str, Any]:
        await self.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            }
        )
        reply = await self.recv()
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply


async def wait_logged(stderr_path: Path, text: bytes) -> None:
    with trio.fail_after(20):
        while text not in await trio.Path(stderr_path).read_bytes():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def wait_subscribed(stderr_path: Path) -> None:
    """The adapter logs once its subscription is live; before that a send would be missed."""
    await wait_logged(stderr_path, b"subscribed to")


async def start_adapter(
    nursery: trio.Nursery, env: dict[str, str], stderr_path: Path, argv: list[str] = ADAPTER
) -> RawClient:
    with open(stderr_path, "ab") as err:  # noqa: ASYNC230 - a local log file
        proc = await nursery.start(
            partial(
                trio.run_process,
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **env},
                check=False,
            )
        )
    return RawClient(proc)


def assert_channel(note: dict[str, Any], body: str) -> dict[str, str]:
    assert note["method"] == "notifications/claude/channel", note
    assert note["params"]["content"] == body
    meta: dict[str, str] = note["params"]["meta"]
    assert all(isinstance(v, str) for v in meta.values()), meta
    return meta


async def test_nothing_before_initialized_then_one_notification_with_meta(
    mesh: Mesh, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        raw = await start_adapter(nursery, mesh.env("s-raw"), tmp_path / "adapter.err")
        await wait_logged(tmp_path / "adapter.err", b"registered session")
        sent = mesh.send("before the handshake")
        call(
            mesh.alice.home,
            "message.wait",
            client_message_id=sent["client_message_id"],
            state="delivered",
        )
        # Claude Code cannot show it yet, so it is not surfaced: the adapter
        # has not taken it from the daemon (bob's unread inbox still has it).
        with pytest.raises(DaemonError) as ei:
            call(
                mesh.alice.home,
                "message.wait",
                client_message_id=sent["client_message_id"],
                state="surfaced",
                timeout_s=1.0,
            )
        assert ei.value.code == "timeout"
        await raw.send({"jsonrpc": "2.0", "id": 7, "method": "ping"})
        assert await raw.recv() == {"jsonrpc": "2.0", "id": 7, "result": {}}
        reply = await raw.handshake()
        t0 = trio.current_time()
        assert reply["result"]["capabilities"]["experimental"] == {"claude/channel": {}}
        assert reply["result"]["protocolVersion"] == "2025-11-25"
        note = await raw.recv()
        assert trio.current_time() - t0 >= SETTLE_S
        meta = assert_channel(note, "before the handshake")
        assert meta["from_name"] == "alice"
        assert meta["workspace"] == "team"
        assert meta["client_message_id"] == sent["client_message_id"]
        assert meta["priority"] == "next"
        assert set(meta) >= {"from_pubkey", "message_id"}
        done = call(
            mesh.alice.home,
            "message.wait",
            client_message_id=sent["client_message_id"],
            state="surfaced",
        )
        assert done["state"] == "surfaced"
        await raw.send({"jsonrpc": "2.0", "id": 8, "method": "server/discover"})
        assert (await raw.recv())["error"]["code"] == -32601
        # Stdin closes: the adapter exits on its own, cleanly.
        assert raw.proc.stdin is not None
        await raw.proc.stdin.aclose()
        with trio.fail_after(10):
            assert await raw.proc.wait() == 0
    for line in raw.lines:
        json.loads(line)  # stdout held nothing but JSON-RPC lines
    assert b"before the handshake" not in (tmp_path / "adapter.err").read_bytes()


async def test_daemon_restart_loses_and_repeats_nothing(mesh: Mesh, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        raw = await start_adapter(nursery, mesh.env("s-restart"), tmp_path / "adapter.err")
        await raw.handshake()
        await wait_subscribed(tmp_path / "adapter.err")
        bodies = [f"r{i}" for i in range(3)]
        for b in bodies:
            mesh.send(b)
        got = [(await raw.recv())["params"]["content"] for _ in bodies]
        await trio.to_thread.run_sync(mesh.bob.kill)
        more = [f"r{i}" for i in range(3, 6)]
        for b in more:
            mesh.send(b)  # queued at the broker while Bob's daemon is down
        await trio.to_thread.run_sync(mesh.bob.start)
        got += [(await raw.recv())["params"]["content"] for _ in more]
        mesh.send("sentinel")
        # Anything repeated would arrive before the sentinel (one ordered event log).
        got.append((await raw.recv())["params"]["content"])
        assert sorted(got[:-1]) == sorted(bodies + more)
        assert got[-1] == "sentinel"
        assert raw.proc.stdin is not None
        await raw.proc.stdin.aclose()
        with trio.fail_after(10):
            assert await raw.proc.wait() == 0


# ---- the official SDK client ----------------------------------------------------------


class ChannelParams(BaseModel):
    # strict: a non-string meta value fails validation, as it does in Claude Code.
    model_config = ConfigDict(strict=True, extra="forbid")
    content: str
    meta: dict[str, str]


class ClaudeChannel(ClientExtension):
    identifier = "com.anthropic.test/claude-channel"

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[ChannelParams](100)

    def notifications(self) -> list[NotificationBinding[Any]]:
        return [
            NotificationBinding(
                method="notifications/claude/channel",
                params_type=ChannelParams,
                handler=self._on,
            )
        ]

    async def _on(self, params: ChannelParams) -> None:
        await self.send.send(params)


async def test_official_sdk_client_gets_exactly_one_channel_notification(
    mesh: Mesh, tmp_path: Path
) -> None:
    channel = ClaudeChannel()
    from claudemesh.clients.mcp.install import claudemesh_executable

    # Exactly what Claude Code runs: `claudemesh mcp`.
    params = StdioServerParameters(
        command=claudemesh_executable(), args=["mcp"], env=mesh.env("s-sdk")
    )
    err_path = tmp_path / "adapter.err"
    with open(err_path, "w") as err:  # noqa: ASYNC230 - a local log file
        async with Client(stdio_client(params, errlog=err), extensions=[channel]) as client:
            assert client.server_capabilities.experimental == {"claude/channel": {}}
            assert client.protocol_version in ("2025-11-25", "2025-06-18")
            instructions = client.instructions or ""
            assert "untrusted" in instructions
            assert len(instructions) <= 2048
            assert (await client.list_tools()).tools == []
            await wait_subscribed(err_path)
            mesh.send("from the sdk test", priority="now")
            with trio.fail_after(20):
                first = await channel.receive.receive()
            assert first.content == "from the sdk test"
            assert first.meta["from_name"] == "alice"
            assert first.meta["priority"] == "now"
            mesh.send("sentinel")
            nxt = await channel.receive.receive()
            assert nxt.content == "sentinel"  # nothing repeated in between


# ---- the hooks against the real daemon ------------------------------------------------


def run_hook(home: Path, event: str, data: dict[str, Any]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "claudemesh.clients.mcp.hook", event],
        input=json.dumps(data).encode(),
        env={**os.environ, "CLAUDEMESH_HOME": str(home)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == b""


def session_status(home: Path, session_id: str) -> str | None:
    for p in call(home, "peer.list")["peers"]:
        if p.get("session_id") == session_id:
            return str(p.get("status"))
    return None


async def test_sessionstart_binds_the_claude_session_and_status_hooks_report(
    mesh: Mesh, tmp_path: Path
) -> None:
    # The hook runs first, as Claude Code does; both are children of this process.
    await trio.to_thread.run_sync(
        run_hook, mesh.bob.home, "session-start", {"session_id": "claude-s-1", "cwd": "/w"}
    )
    env = {k: v for k, v in mesh.env("unused").items() if k != "CLAUDEMESH_SESSION_ID"}
    err = tmp_path / "adapter.err"
    async with trio.open_nursery() as nursery:
        raw = await start_adapter(nursery, env, err)
        await raw.handshake()
        await wait_subscribed(err)
        assert b"as session claude-s-1" in err.read_bytes()
        for event, status in (("prompt-submit", "working"), ("stop", "idle")):
            await trio.to_thread.run_sync(
                run_hook, mesh.bob.home, event, {"session_id": "claude-s-1"}
            )
            await trio.to_thread.run_sync(
                partial(
                    wait_for,
                    lambda s=status: session_status(mesh.bob.home, "claude-s-1") == s,
                    timeout=15,
                    what=f"session {status}",
                )
            )
        assert raw.proc.stdin is not None
        await raw.proc.stdin.aclose()
        with trio.fail_after(10):
            assert await raw.proc.wait() == 0


async def test_the_command_install_registers_is_what_runs(
    mesh: Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from claudemesh.clients.mcp import install

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", os.defpath)  # no `claude` CLI: the file is edited
    install.install()
    entry = json.loads((tmp_path / ".claude.json").read_text())["mcpServers"]["claudemesh"]
    err = tmp_path / "adapter.err"
    async with trio.open_nursery() as nursery:
        raw = await start_adapter(
            nursery, mesh.env("s-installed"), err, [entry["command"], *entry["args"]]
        )
        reply = await raw.handshake()
        assert reply["result"]["serverInfo"]["name"] == "claudemesh"
        await wait_subscribed(err)
        mesh.send("via the installed command")
        assert_channel(await raw.recv(), "via the installed command")
        assert raw.proc.stdin is not None
        await raw.proc.stdin.aclose()
        with trio.fail_after(10):
            assert await raw.proc.wait() == 0


async def test_a_peer_joining_is_a_short_system_notice(mesh: Mesh, tmp_path: Path) -> None:
    err = tmp_path / "adapter.err"
    async with trio.open_nursery() as nursery:
        raw = await start_adapter(nursery, mesh.env("s-peers"), err)
        await raw.handshake()
        await wait_subscribed(err)
        with run_daemon(mesh.root / "c") as carol:
            inv = call(mesh.alice.home, "invite.create")
            call(carol.home, "workspace.join", link=inv["link"], display_name="carol")
            note = await raw.recv()
            assert note["params"]["content"] == "carol joined workspace team."
            assert note["params"]["meta"]["kind"] == "system"
            assert note["params"]["meta"]["event"] == "peer_joined"
            assert all(isinstance(v, str) for v in note["params"]["meta"].values())
        assert raw.proc.stdin is not None
        await raw.proc.stdin.aclose()
        with trio.fail_after(10):
            assert await raw.proc.wait() == 0
