"""The local API on real unix sockets: hello rules, typed errors, uid refusal, permissions."""

from __future__ import annotations

import base64
import os
import struct
from math import nan
from pathlib import Path

import pytest
import trio

from claudemesh.daemon.home import Home, WorkspaceConfig
from claudemesh.daemon.ipcserver import IpcServer, Streaming, peer_uid
from claudemesh.shared.protocol import ipc
from claudemesh.shared.protocol.framing import HEADER

from .conftest import open_client, open_daemon


async def test_welcome_and_status(short_tmp: Path) -> None:
    async with open_daemon(short_tmp / "h") as d, open_client(d.home.control_socket) as c:
        r = await c.request("daemon.status")
        assert r.ok
        assert r.result["pid"] == os.getpid()
        assert r.result["workspaces"] == []
    assert not (short_tmp / "h" / "daemon.sock").exists()  # unlinked on stop


async def test_permissions(short_tmp: Path) -> None:
    async with open_daemon(short_tmp / "h") as d:
        root = d.home.root
        for p in (root, root / "identity", root / "sockets", root / "workspaces", root / "logs"):
            assert p.stat().st_mode & 0o777 == 0o700, p
        assert (root / "identity" / "root.key").stat().st_mode & 0o777 == 0o600
        assert len((root / "identity" / "root.key").read_bytes()) == 32
        assert d.home.control_socket.stat().st_mode & 0o777 == 0o600


async def test_newer_api_gets_restart_advice(short_tmp: Path) -> None:
    async with (
        open_daemon(short_tmp / "h") as d,
        open_client(d.home.control_socket, hello=False) as c,
    ):
        await c.send(ipc.Hello(api_version=ipc.IPC_API_VERSION + 1))
        f = await c.read()
        assert isinstance(f, ipc.Error)
        assert f.code == ipc.API_MISMATCH
        assert "restart the daemon" in f.message
        with pytest.raises(EOFError):
            await c.read()


async def test_request_before_hello_is_refused(short_tmp: Path) -> None:
    async with (
        open_daemon(short_tmp / "h") as d,
        open_client(d.home.control_socket, hello=False) as c,
    ):
        await c.send(ipc.Request(id=1, method="daemon.status"))
        f = await c.read()
        assert isinstance(f, ipc.Error)
        assert f.code == "no_hello"


async def test_typed_errors_and_connection_survives(short_tmp: Path) -> None:
    async with open_daemon(short_tmp / "h") as d, open_client(d.home.control_socket) as c:
        r = await c.request("no.such.method")
        assert r.error is not None
        assert r.error.code == ipc.UNKNOWN_METHOD
        r = await c.request("workspace.create", name="Bad Name!", broker_url="ws://x/ws")
        assert r.error is not None
        assert r.error.code == ipc.INVALID_PARAMS
        assert "name" in r.error.message
        r = await c.request("workspace.create", name="ok")
        assert r.error is not None
        assert "broker_url" in r.error.message
        r = await c.request("workspace.use", name=5)
        assert r.error is not None
        assert r.error.code == ipc.INVALID_PARAMS
        r = await c.request("message.send", to="bob", body="x")
        assert r.error is not None
        assert r.error.code == ipc.NO_WORKSPACE
        # A body that is not a frame: typed error, connection stays open.
        await c.stream.send_all(HEADER.pack(3) + b"\xc1\xc1\xc1")
        f = await c.read()
        assert isinstance(f, ipc.Error)
        assert f.code == "malformed"
        await c.stream.send_all(ipc.encode_ipc(ipc.Welcome(daemon_version="x")))
        f = await c.read()
        assert isinstance(f, ipc.Error)
        assert f.code == "unknown_type"
        r = await c.request("daemon.status")
        assert r.ok


async def test_broken_framing_closes(short_tmp: Path) -> None:
    async with open_daemon(short_tmp / "h") as d, open_client(d.home.control_socket) as c:
        await c.stream.send_all(struct.pack(">I", 50 * 1024 * 1024))
        f = await c.read()
        assert isinstance(f, ipc.Error)
        assert f.code == "frame_too_large"
        with pytest.raises(EOFError):
            await c.read()
        # The daemon itself is fine.
        async with open_client(d.home.control_socket) as c2:
            assert (await c2.request("daemon.status")).ok


async def test_bad_link_names_the_part(short_tmp: Path) -> None:
    good = "claudemesh://join/m1/i1?broker=ws%3A%2F%2F127.0.0.1%3A1%2Fws#" + "A" * 43
    cases = {
        "https://example.com": "claudemesh://",
        good.split("#")[0]: "secret",
        good[:-5]: "secret",
        good.replace("?broker=ws%3A%2F%2F127.0.0.1%3A1%2Fws", ""): "broker URL",
        good.replace("ws%3A", "http%3A"): "broker URL",
        good.replace("/m1/i1", "/m1"): "path",
    }
    async with open_daemon(short_tmp / "h") as d, open_client(d.home.control_socket) as c:
        for link, part in cases.items():
            r = await c.request("workspace.join", link=link)
            assert r.error is not None, link
            assert r.error.code == ipc.INVALID_PARAMS, link
            assert part in r.error.message, (link, r.error.message)
        r = await c.request("workspace.join", link=good)
        assert r.error is not None
        assert r.error.code == ipc.BROKER_UNREACHABLE
        assert not r.error.message.rstrip().endswith(":"), r.error.message  # says why
        r = await c.request("workspace.use", name="nope")
        assert r.error is not None
        assert r.error.code == ipc.NOT_FOUND
        assert "candidates" not in (r.error.details or {})  # no workspaces: nothing to suggest


async def test_foreign_uid_is_refused(short_tmp: Path) -> None:
    """The real server, told to allow another uid, refuses our real connection."""
    calls = []

    async def handler(conn: object, req: ipc.Request) -> object:
        calls.append(req)
        return {}

    server = IpcServer(short_tmp / "s.sock", handler, allowed_uid=os.getuid() + 1)
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        stream = await trio.open_unix_socket(str(short_tmp / "s.sock"))
        assert peer_uid(stream.socket) == os.getuid()
        await stream.send_all(ipc.encode_ipc(ipc.Hello()))
        with trio.fail_after(5):
            data = b""
            while True:
                try:
                    chunk = await stream.receive_some(1024)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                data += chunk
        assert data == b""  # closed without a Welcome
        assert server.refused == 1
        assert calls == []
        await stream.aclose()
        n.cancel_scope.cancel()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")
async def test_foreign_uid_process_is_refused(short_tmp: Path) -> None:
    """A real process running as another uid cannot get a Welcome."""
    import sys

    async with open_daemon(short_tmp / "h") as d:
        code = (
            "import os,socket,sys\n"
            "from claudemesh.shared.protocol import ipc\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s=socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
            "try:\n"
            f"  s.connect({str(d.home.control_socket)!r})\n"
            "  s.sendall(ipc.encode_ipc(ipc.Hello()))\n"
            "  print('got', len(s.recv(100)))\n"
            "except OSError as e: print('refused', type(e).__name__)\n"
        )
        res = await trio.run_process(
            [sys.executable, "-c", code],
            capture_stdout=True,
            check=False,
        )
        out = res.stdout.decode()
        assert out.startswith("refused") or out.strip() == "got 0", out


async def test_garbage_never_takes_the_daemon_down(short_tmp: Path) -> None:
    import random

    import msgspec

    rnd = random.Random(1234)
    bodies: list[bytes] = [rnd.randbytes(rnd.randrange(0, 300)) for _ in range(150)]
    enc = msgspec.msgpack.encode
    bodies += [
        enc({"type": "req", "id": "x", "method": 5}),
        enc({"type": "req", "id": 1, "method": "message.send", "params": [1, 2]}),
        enc({"type": "req", "id": 2, "method": "message.send", "params": {"to": 3}}),
        enc({"type": "req", "id": 3, "method": "subscribe", "params": {"cursor": "z"}}),
        enc({"type": "req", "id": 4, "method": "message.inbox", "params": {"limit": True}}),
        enc({"type": "hello", "api_version": "new"}),
        enc([1, 2, 3]),
        b"",
    ]
    async with open_daemon(short_tmp / "h") as d:
        async with open_client(d.home.control_socket) as c:
            for body in bodies:
                await c.stream.send_all(HEADER.pack(len(body)) + body)
            # Every frame gets exactly one answer, in order, and the link stays open.
            answered = 0
            with trio.fail_after(10):
                while answered < len(bodies):
                    f = await c.read()
                    assert isinstance(f, ipc.Error | ipc.Reply)
                    if isinstance(f, ipc.Reply):
                        assert f.error is not None
                    answered += 1
            r = await c.request("daemon.status")
            assert r.ok
        async with open_client(d.home.control_socket) as c2:
            assert (await c2.request("daemon.status")).ok


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")
async def test_peer_uid_check_refuses_a_real_foreign_process(short_tmp: Path) -> None:
    """Even with the file permissions opened up, the uid check alone refuses nobody."""
    import sys

    calls: list[ipc.Request] = []

    async def handler(conn: object, req: ipc.Request) -> object:
        calls.append(req)
        return {}

    os.chmod(short_tmp, 0o755)
    path = short_tmp / "open.sock"
    server = IpcServer(path, handler)  # allowed uid: ours (root)
    code = (
        "import os,socket\n"
        "from claudemesh.shared.protocol import ipc\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s=socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
        f"s.connect({str(path)!r})\n"
        "try:\n"
        "  s.sendall(ipc.encode_ipc(ipc.Hello()))\n"
        "  print('got', len(s.recv(100)))\n"
        "except (BrokenPipeError, ConnectionResetError): print('got 0')\n"
    )
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        os.chmod(path, 0o666)  # only for this test: let the foreign uid reach the check
        res = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
        n.cancel_scope.cancel()
    assert res.stdout.decode().strip() == "got 0", res.stderr.decode()
    assert server.refused == 1
    assert calls == []


async def test_out_of_range_numbers_get_invalid_params(short_tmp: Path) -> None:
    root = short_tmp / "h"
    home = Home(root)
    home.ensure()
    home.save_workspace(
        WorkspaceConfig(
            name="team",
            mesh_id="m1",
            member_id="u1",
            broker_url="ws://127.0.0.1:9/ws",
            display_name="me",
            role="member",
            root_key=base64.b64encode(os.urandom(32)).decode(),
        )
    )
    async with open_daemon(root), open_client(root / "daemon.sock") as c:
        with trio.fail_after(10):
            for method, params in [
                ("message.inbox", {"after_cursor": 2**64 - 1}),
                ("message.inbox", {"before_cursor": 2**63}),
                ("subscribe", {"cursor": 2**64 - 1}),
                ("message.wait", {"client_message_id": "x", "state": "sent", "timeout_s": nan}),
            ]:
                r = await c.request(method, **params)
                assert r.error is not None, (method, params)
                assert r.error.code == "invalid_params", (method, r.error)
            assert (await c.request("daemon.status")).error is None


async def test_a_stream_that_fails_ends_with_one_error_frame_not_a_second_reply(
    short_tmp: Path,
) -> None:
    async def handler(conn: object, req: ipc.Request) -> object:
        async def stream() -> None:
            raise RuntimeError("a bug in a subscription")

        return Streaming({"cursor": 0}, stream)

    server = IpcServer(short_tmp / "s.sock", handler)
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        async with open_client(short_tmp / "s.sock") as c:
            with trio.fail_after(5):
                await c.send(ipc.Request(id=1, method="subscribe", params={}))
                first = await c.read()
                second = await c.read()
        assert isinstance(first, ipc.Reply)
        assert first.error is None
        assert isinstance(second, ipc.Error), second  # the client knows its stream ended
        assert second.id == 1
        assert second.code == "internal"
        n.cancel_scope.cancel()


async def test_a_cursor_from_another_store_is_refused_and_leave_ends_streams(
    short_tmp: Path,
) -> None:
    root = short_tmp / "h"
    home = Home(root)
    home.ensure()
    home.save_workspace(
        WorkspaceConfig(
            name="team",
            mesh_id="m1",
            member_id="u1",
            broker_url="ws://127.0.0.1:9/ws",
            display_name="me",
            role="member",
            root_key=base64.b64encode(os.urandom(32)).decode(),
        )
    )
    async with (
        open_daemon(root),
        open_client(root / "daemon.sock") as c,
        open_client(root / "daemon.sock") as sub,
    ):
        with trio.fail_after(10):
            # A cursor past the newest event belongs to an earlier store of the same
            # name (left and joined again): silently waiting for it would lose mail.
            r = await c.request("subscribe", cursor=5)
            assert r.error is not None
            assert r.error.code == "cursor_ahead"
            assert r.error.details == {"head": 0}
            ok = await sub.request("subscribe")
            assert ok.error is None
            assert (await c.request("workspace.leave", name="team")).error is None
            ended = await sub.read()
        assert isinstance(ended, ipc.Error), ended  # the stream ends instead of hanging
        assert ended.id == ok.id
