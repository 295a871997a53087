"""The adapter's JSON-RPC and daemon-link logic, in process, against a fake daemon."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from claudemesh.clients.mcp import adapter as ad

META_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


async def wait_until(predicate: Any) -> None:
    """Wait for a condition with a deadline; the adapter exposes no event for these."""
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - polling a foreign state, bounded
            await trio.sleep(0.01)


# ---- pure JSON-RPC answers ------------------------------------------------------------


@pytest.mark.parametrize("version", ad.PROTOCOL_VERSIONS)
def test_initialize_echoes_supported_versions(version: str) -> None:
    reply = ad.rpc_response(
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": version}}
    )
    assert reply is not None
    assert reply["id"] == 1
    assert reply["result"]["protocolVersion"] == version
    assert reply["result"]["capabilities"]["experimental"] == {"claude/channel": {}}


@pytest.mark.parametrize("version", ["2026-07-28", "1999-01-01", None, 7])
def test_initialize_unknown_version_gets_newest(version: object) -> None:
    reply = ad.rpc_response(
        {
            "jsonrpc": "2.0",
            "id": "a",
            "method": "initialize",
            "params": {"protocolVersion": version},
        }
    )
    assert reply is not None
    assert reply["result"]["protocolVersion"] == "2025-11-25"


def test_instructions_fit_and_say_what_matters() -> None:
    text = ad.initialize_result("2025-06-18")["instructions"]
    assert len(text) <= 2048
    assert "untrusted" in text
    assert "consent" in text
    assert 'claudemesh message send <from_name> "' in text


@pytest.mark.parametrize(
    ("method", "expected"),
    [("ping", {}), ("tools/list", {"tools": []})],
)
def test_ping_and_empty_tools(method: str, expected: dict[str, Any]) -> None:
    assert ad.rpc_response({"jsonrpc": "2.0", "id": 3, "method": method}) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": expected,
    }


@pytest.mark.parametrize("method", ["server/discover", "resources/list", "nope"])
def test_discover_and_unknown_methods_are_32601(method: str) -> None:
    reply = ad.rpc_response({"jsonrpc": "2.0", "id": 9, "method": method})
    assert reply is not None
    assert reply["error"]["code"] == -32601
    assert reply["id"] == 9


@pytest.mark.parametrize("msg", [[], 5, "x", {"id": 1}, {"jsonrpc": "2.0", "id": 1, "method": 4}])
def test_invalid_requests_get_32600(msg: object) -> None:
    reply = ad.rpc_response(msg)
    assert reply is not None
    assert reply["error"]["code"] == -32600


def test_notifications_and_responses_get_no_answer() -> None:
    assert ad.rpc_response({"jsonrpc": "2.0", "method": "notifications/cancelled"}) is None
    assert ad.rpc_response({"jsonrpc": "2.0", "id": 1, "result": {}}) is None


# ---- event -> notification -----------------------------------------------------------


def test_message_meta_is_all_strings_with_valid_keys() -> None:
    data = {
        "broker_message_id": 123,
        "client_message_id": "c1",
        "from_pubkey": "ab" * 32,
        "from_name": "alice",
        "workspace": "acme",
        "priority": "now",
        "body": "hi there",
        "topic": "deploys",
        "reply_to": 77,
        "created_at": 5,
    }
    note = ad.event_notification("message", data, "acme")
    assert note is not None
    assert note["method"] == "notifications/claude/channel"
    assert note["params"]["content"] == "hi there"
    meta = note["params"]["meta"]
    assert all(isinstance(v, str) for v in meta.values())
    assert all(META_KEY.match(k) for k in meta)
    assert meta["message_id"] == "123"
    assert meta["reply_to"] == "77"
    assert meta["topic"] == "deploys"
    assert meta["from_name"] == "alice"


def test_optional_meta_absent_when_missing() -> None:
    note = ad.event_notification("message", {"body": "x", "from_name": "bob"}, "acme")
    assert note is not None
    meta = note["params"]["meta"]
    assert "topic" not in meta
    assert "reply_to" not in meta
    assert meta["workspace"] == "acme"


def test_peer_events_become_system_notices() -> None:
    note = ad.event_notification(
        "peer", {"event": "peer_joined", "pubkey": "ef" * 32, "name": "carol"}, "acme"
    )
    assert note is not None
    assert note["params"]["content"] == "carol joined workspace acme."
    assert note["params"]["meta"]["kind"] == "system"
    assert all(isinstance(v, str) for v in note["params"]["meta"].values())
    assert ad.event_notification("peer", {"event": "weird"}, "acme") is None
    assert ad.event_notification("receipt", {}, "acme") is None


# ---- the adapter in process against the fake daemon ----------------------------------


class Harness:
    def __init__(self, home: Path, **kw: Any) -> None:
        self.stdin_send, self.stdin_recv = trio.testing.memory_stream_one_way_pair()
        self.stdout_send, self.stdout_recv = trio.testing.memory_stream_one_way_pair()
        self.adapter = ad.Adapter(self.stdout_send, home=home, claude_pid=1, **kw)
        self._buf = b""

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stdin_send.send_all(json.dumps(msg).encode() + b"\n")

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while b"\n" not in self._buf:
                self._buf += await self.stdout_recv.receive_some()
        line, self._buf = self._buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    async def handshake(self) -> dict[str, Any]:
        await self.send(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}},
            }
        )
        reply = await self.recv()
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return reply


async def test_nothing_pushed_before_initialized_then_after_settle(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0.3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await wait_until(lambda: fake_daemon.subscribes())
        fake_daemon.message(body="early")
        await trio.testing.wait_all_tasks_blocked()
        # Only the head was asked for: the daemon (which reports a message
        # written to a session as surfaced) is not read before initialized.
        assert fake_daemon.live_subscribes() == []
        assert h.adapter.statistics()["pushed"] == 0
        await h.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert await h.recv() == {"jsonrpc": "2.0", "id": 1, "result": {}}
        reply = await h.handshake()
        sent_initialized = trio.current_time()
        assert reply["result"]["capabilities"]["experimental"] == {"claude/channel": {}}
        note = await h.recv()
        assert trio.current_time() - sent_initialized >= 0.3
        assert note["method"] == "notifications/claude/channel"
        assert note["params"]["content"] == "early"
        await h.stdin_send.aclose()
    method, params = fake_daemon.requests[1]
    assert method == "session.register"
    assert params["workspace"] == "acme"
    assert params["session_id"] == "s1"
    assert params["claude_pid"] == 1


async def test_stdin_close_ends_serve(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.adapter.serve, h.stdin_recv)
            await h.handshake()
            await h.stdin_send.aclose()


async def test_garbage_lines_get_parse_errors_and_the_adapter_survives(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.stdin_send.send_all(b"{not json\n\xff\xfe\n\x80\n[1,2]\n")
        assert (await h.recv())["error"]["code"] == -32700
        assert (await h.recv())["error"]["code"] == -32700
        assert (await h.recv())["error"]["code"] == -32700
        assert (await h.recv())["error"]["code"] == -32600
        await h.send({"jsonrpc": "2.0", "id": "p", "method": "ping"})
        assert await h.recv() == {"jsonrpc": "2.0", "id": "p", "result": {}}
        await h.stdin_send.aclose()


async def test_daemon_restart_resumes_from_cursor_without_loss_or_repeat(
    fake_daemon: Any,
) -> None:
    fake_daemon.replay_overlap = 2  # the adapter must drop what it already pushed
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.live_subscribes())
        for i in range(3):
            fake_daemon.message(body=f"m{i}")
        got = [(await h.recv())["params"]["content"] for _ in range(3)]
        fake_daemon.stop()
        for i in range(3, 6):
            fake_daemon.message(body=f"m{i}")
        await nursery.start(fake_daemon.serve)
        got += [(await h.recv())["params"]["content"] for _ in range(3)]
        fake_daemon.message(body="m6")
        got.append((await h.recv())["params"]["content"])
        assert got == [f"m{i}" for i in range(7)]
        subs = fake_daemon.live_subscribes()
        assert len(subs) == 2
        assert subs[0]["cursor"] == 0  # the head noted before initialized
        assert subs[1]["cursor"] == 3
        assert h.adapter.statistics()["skipped_duplicates"] == 2
        await h.stdin_send.aclose()
        fake_daemon.stop()


async def test_daemon_not_running_then_started(short_home: Path, fake_daemon_cls: Any) -> None:
    daemon = fake_daemon_cls(short_home)
    h = Harness(short_home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await nursery.start(daemon.serve)
        await wait_until(lambda: daemon.subscribes())
        daemon.message(body="late")
        assert (await h.recv())["params"]["content"] == "late"
        await h.stdin_send.aclose()
        daemon.stop()


async def test_every_workspace_is_subscribed_and_labelled(
    short_home: Path, fake_daemon_cls: Any
) -> None:
    daemon = fake_daemon_cls(short_home, workspaces=("acme", "beta"))
    h = Harness(short_home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: len(daemon.live_subscribes()) == 2)
        daemon.message("beta", body="b")
        daemon.push("acme", "peer", {"event": "peer_left", "pubkey": "ab" * 32, "name": "dan"})
        first, second = await h.recv(), await h.recv()
        assert first["params"]["meta"]["workspace"] == "beta"
        assert second["params"] == {
            "content": "dan left workspace acme.",
            "meta": {
                "kind": "system",
                "event": "peer_left",
                "workspace": "acme",
                "peer_name": "dan",
                "peer_pubkey": "ab" * 32,
            },
        }
        await h.stdin_send.aclose()
        daemon.stop()


async def test_session_id_comes_from_the_sessionstart_binding(fake_daemon: Any) -> None:
    from claudemesh.clients.mcp import paths

    bind = paths.session_bind_file(fake_daemon.home, 4242)
    bind.parent.mkdir(mode=0o700)
    bind.write_text(json.dumps({"session_id": "claude-uuid", "cwd": "/x"}))
    h = Harness(fake_daemon.home, settle_s=0, bind_wait_s=5)
    h.adapter.claude_pid = 4242
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.live_subscribes())
        assert fake_daemon.live_subscribes()[0]["session_id"] == "claude-uuid"
        await h.stdin_send.aclose()


async def test_no_binding_lets_the_daemon_name_the_session(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, settle_s=0, bind_wait_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.live_subscribes())
        register = next(p for m, p in fake_daemon.requests if m == "session.register")
        assert "session_id" not in register
        assert fake_daemon.live_subscribes()[0]["session_id"] == "made-by-daemon"
        await h.stdin_send.aclose()


async def test_stdout_closed_ends_serve_quietly(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.adapter.serve, h.stdin_recv)
            await h.handshake()
            await wait_until(lambda: fake_daemon.subscribes())
            await h.stdout_recv.aclose()  # Claude Code went away
            fake_daemon.message(body="nobody reads this")
    assert h.adapter.statistics()["pushed"] == 0


def test_session_peer_events_are_labelled() -> None:
    note = ad.event_notification(
        "peer", {"event": "peer_returned", "pubkey": "ab", "name": "ann", "is_session": True}, "w"
    )
    assert note is not None
    assert note["params"]["content"] == "ann (a Claude session) is back in workspace w."
    assert note["params"]["meta"]["is_session"] == "true"


async def test_own_session_presence_is_not_announced(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.subscribes())
        # The fake daemon gives every session the key "0".
        fake_daemon.push("acme", "peer", {"event": "peer_joined", "pubkey": "0", "name": "me"})
        fake_daemon.message(body="after")
        assert (await h.recv())["params"]["content"] == "after"
        await h.stdin_send.aclose()


async def test_a_message_during_the_session_id_wait_is_not_lost(fake_daemon: Any) -> None:
    from claudemesh.clients.mcp import paths

    h = Harness(fake_daemon.home, settle_s=0, bind_wait_s=10)
    h.adapter.claude_pid = 4343
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.subscribes())  # the head, noted early
        assert fake_daemon.subscribes()[0]["kinds"] == ["-"]
        fake_daemon.message(body="while waiting for the hook")
        bind = paths.session_bind_file(fake_daemon.home, 4343)
        bind.parent.mkdir(mode=0o700, exist_ok=True)
        bind.write_text(json.dumps({"session_id": "late-hook"}))
        note = await h.recv()
        assert note["params"]["content"] == "while waiting for the hook"
        live = fake_daemon.subscribes()[1]
        assert live["session_id"] == "late-hook"
        assert live["cursor"] == 0
        await h.stdin_send.aclose()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
rpc_like = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0"),
        "id": json_values,
        "method": st.sampled_from(["initialize", "ping", "tools/list", "server/discover"])
        | st.text(),
        "params": json_values,
        "result": json_values,
    },
)


@given(msg=json_values | rpc_like)
@settings(max_examples=300, deadline=None)
def test_any_json_gets_an_answer_or_none_never_a_crash(msg: object) -> None:
    reply = ad.rpc_response(msg)
    if reply is not None:
        json.dumps(reply)  # always encodable
        assert ("result" in reply) != ("error" in reply)


@given(line=st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_bytes_decode_or_raise_decode_error(line: bytes) -> None:
    try:
        ad._json_decoder.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass  # what handle_line turns into -32700


async def test_replies_of_an_unexpected_shape_are_retried_not_fatal(fake_daemon: Any) -> None:
    fake_daemon.weird_replies = True
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: [m for m, _ in fake_daemon.requests].count("workspace.list") >= 2)
        await h.send({"jsonrpc": "2.0", "id": 5, "method": "ping"})
        assert await h.recv() == {"jsonrpc": "2.0", "id": 5, "result": {}}
        fake_daemon.weird_replies = False
        await wait_until(lambda: fake_daemon.live_subscribes())
        fake_daemon.message(body="fine again")
        assert (await h.recv())["params"]["content"] == "fine again"
        await h.stdin_send.aclose()


async def test_a_stream_the_daemon_ends_with_an_error_is_resubscribed(fake_daemon: Any) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.live_subscribes())
        fake_daemon.message(body="one")
        assert (await h.recv())["params"]["content"] == "one"
        fake_daemon.fail_streams()
        await wait_until(lambda: len(fake_daemon.live_subscribes()) == 2)
        assert fake_daemon.live_subscribes()[1]["cursor"] == 1
        fake_daemon.message(body="two")
        assert (await h.recv())["params"]["content"] == "two"
        await h.stdin_send.aclose()


async def test_a_workspace_recreated_under_the_same_name_is_read_from_its_start(
    fake_daemon: Any,
) -> None:
    h = Harness(fake_daemon.home, session_id="s1", settle_s=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: fake_daemon.live_subscribes())
        for i in range(3):
            fake_daemon.message(body=f"old{i}")
        for _ in range(3):
            await h.recv()
        fake_daemon.stop()
        fake_daemon.log.clear()  # left and joined again: a new store, cursors from 1
        fake_daemon.message(body="fresh")
        await nursery.start(fake_daemon.serve)
        assert (await h.recv())["params"]["content"] == "fresh"
        await h.stdin_send.aclose()
        fake_daemon.stop()


async def test_a_workspace_joined_while_running_is_subscribed_too(
    short_home: Path, fake_daemon_cls: Any
) -> None:
    daemon = fake_daemon_cls(short_home, workspaces=("acme",))
    h = Harness(short_home, session_id="s1", settle_s=0, workspace_poll_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        nursery.start_soon(h.adapter.serve, h.stdin_recv)
        await h.handshake()
        await wait_until(lambda: daemon.live_subscribes())
        daemon.message("acme", body="a1")
        assert (await h.recv())["params"]["content"] == "a1"
        daemon.workspaces = ("acme", "beta")  # joined meanwhile
        await wait_until(lambda: any(p["workspace"] == "beta" for p in daemon.live_subscribes()))
        daemon.message("beta", body="b1")
        note = await h.recv()
        assert note["params"]["content"] == "b1"
        assert note["params"]["meta"]["workspace"] == "beta"
        assert h.adapter.statistics()["pushed"] == 2  # a1 was not pushed again
        await h.stdin_send.aclose()
        daemon.stop()
