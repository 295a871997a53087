"""A broker that sends malformed or hostile frames must not break the daemon.

A real in-process daemon (real SQLite, real unix sockets) talks over a real
loopback WebSocket to a scripted broker, so the test controls every byte the
daemon receives.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from claudemesh.daemon.home import Home, WorkspaceConfig
from claudemesh.shared.protocol import crypto, ipc

from .conftest import open_client, open_daemon

MESH = "mesh-hostile"
BOB = crypto.KeyPair(b"\2" * 32)


class ScriptedBroker:
    """Answers hello and list_peers; records everything the daemon sends."""

    def __init__(self) -> None:
        self.hellos = 0
        self.received: list[dict[str, Any]] = []
        self.changed = trio.Event()
        self.conn: Any = None
        self.connected = trio.Event()

    def _note(self, frame: dict[str, Any]) -> None:
        self.received.append(frame)
        self.changed.set()
        self.changed = trio.Event()

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "hello"
            self.hellos += 1
            await ws.send_message(
                json.dumps({"type": "hello_ack", "presenceId": "p1", "memberDisplayName": "alice"})
            )
            self.conn = ws
            self.connected.set()
            while True:
                frame = json.loads(await ws.get_message())
                self._note(frame)
                if frame["type"] == "list_peers":
                    peer = {"pubkey": BOB.public_hex, "displayName": "bob", "online": True}
                    await ws.send_message(
                        json.dumps({"type": "peers_list", "id": frame["id"], "peers": [peer]})
                    )
        except ConnectionClosed:
            pass

    async def push(self, frame: dict[str, Any]) -> None:
        await self.conn.send_message(json.dumps(frame))

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool]) -> None:
        with trio.fail_after(10):
            while not any(pred(f) for f in self.received):
                await self.changed.wait()


@asynccontextmanager
async def hostile_setup(root: Path) -> AsyncIterator[tuple[ScriptedBroker, Path]]:
    broker = ScriptedBroker()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, broker.handler, "127.0.0.1", 0, None)
        port = server.port
        home = Home(root)
        home.ensure()
        home.save_workspace(
            WorkspaceConfig(
                name="team",
                mesh_id=MESH,
                member_id="m-alice",
                broker_url=f"ws://127.0.0.1:{port}/ws",
                display_name="alice",
                role="member",
                root_key=base64.b64encode(os.urandom(32)).decode(),
            )
        )
        async with open_daemon(root):
            with trio.fail_after(10):
                await broker.connected.wait()
                # The daemon lists peers once connected: wait for that answer.
                await broker.wait_for(lambda f: f["type"] == "list_peers")
            yield broker, root / "daemon.sock"
        nursery.cancel_scope.cancel()


async def _request(sock: Path, method: str, **params: Any) -> ipc.Reply:
    async with open_client(sock) as c:
        with trio.fail_after(10):
            return await c.request(method, **params)


async def test_system_push_with_mistyped_event_data_breaks_nothing(short_tmp: Path) -> None:
    async with hostile_setup(short_tmp / "h") as (broker, sock), open_client(sock) as sub:
        with trio.fail_after(10):
            await sub.request("subscribe", kinds=["peer"])
        await broker.push(
            {
                "type": "push",
                "messageId": "sys-1",
                "meshId": MESH,
                "senderPubkey": "",
                "priority": "low",
                "subtype": "system",
                "event": "peer_joined",
                "eventData": {"pubkey": 5, "name": None, "isSession": "yes"},
            }
        )
        with trio.fail_after(10):
            ev = await sub.read()
        assert isinstance(ev, ipc.Event)
        assert ev.kind == "peer"
        assert ev.data["pubkey"] == ""
        assert ev.data["name"] == ""
        peers = await _request(sock, "peer.list", refresh=False)
        assert peers.error is None
        for p in peers.result["peers"]:
            assert isinstance(p["pubkey"], str), p
            assert isinstance(p["display_name"], str), p
        sent = await _request(sock, "message.send", to="bob", body="still works")
        assert sent.error is None, sent.error
        assert sent.result["recipients"][0]["pubkey"] == BOB.public_hex


async def test_a_receipt_sqlite_cannot_store_does_not_flap_the_link(short_tmp: Path) -> None:
    async with hostile_setup(short_tmp / "h") as (broker, sock):
        await broker.push(
            {
                "type": "receipt",
                "receiptId": "r-bad",
                "messageId": "b-1",
                "client_message_id": "c-1",
                "recipientPubkey": BOB.public_hex,
                "state": "delivered",
                "at": 2**63,
            }
        )
        # A real message after it is still stored and acked on the same link.
        status = await _request(sock, "daemon.status")
        me = status.result["workspaces"][0]["member_pubkey"]
        nonce, ct = crypto.box_encrypt(
            b"after the bad receipt", sender=BOB, recipient_pubkey_hex=me
        )
        await broker.push(
            {
                "type": "push",
                "messageId": "b-2",
                "meshId": MESH,
                "senderPubkey": BOB.public_hex,
                "priority": "next",
                "nonce": nonce,
                "ciphertext": ct,
                "createdAt": "2026-11-26T15:00:00Z",
            }
        )
        await broker.wait_for(
            lambda f: f["type"] == "client_ack" and f.get("brokerMessageId") == "b-2"
        )
        inbox = await _request(sock, "message.inbox")
        assert [m["body"] for m in inbox.result["messages"]] == ["after the bad receipt"]
        # The poison receipt is acked (never re-pushed forever) and the link never dropped.
        await broker.wait_for(lambda f: f["type"] == "client_ack" and f.get("receiptId") == "r-bad")
        assert broker.hellos == 1


async def test_a_huge_retry_after_hint_is_capped_not_fatal(short_tmp: Path) -> None:
    async with hostile_setup(short_tmp / "h") as (broker, sock):
        sent = await _request(sock, "message.send", to="bob", body="x", client_message_id="c-9")
        assert sent.error is None
        await broker.wait_for(lambda f: f["type"] == "send")
        await broker.push(
            {
                "type": "ack",
                "id": "c-9",
                "client_message_id": "c-9",
                "queued": False,
                "error": {"code": "rate_limited", "message": "slow down", "retryAfterMs": 2**63},
            }
        )
        with trio.fail_after(10):
            for _ in range(1000):  # poll the condition; the deadline bounds it
                st = await _request(sock, "message.status", client_message_id="c-9")
                if st.result["outbox_state"] == "pending":
                    break
                await trio.sleep(0.01)
        assert "rate_limited" in st.result["last_error"]
        assert broker.hellos == 1


async def test_two_readers_taking_one_message_send_one_surfaced_receipt(short_tmp: Path) -> None:
    async with (
        hostile_setup(short_tmp / "h") as (broker, sock),
        open_client(sock) as r1,
        open_client(sock) as r2,
    ):
        with trio.fail_after(10):
            await r1.request("subscribe", kinds=["message"], mark_seen=True)
            await r2.request("subscribe", kinds=["message"], mark_seen=True)
        status = await _request(sock, "daemon.status")
        me = status.result["workspaces"][0]["member_pubkey"]
        for i in range(5):
            nonce, ct = crypto.box_encrypt(f"m{i}".encode(), sender=BOB, recipient_pubkey_hex=me)
            await broker.push(
                {
                    "type": "push",
                    "messageId": f"b-{i}",
                    "meshId": MESH,
                    "senderPubkey": BOB.public_hex,
                    "priority": "next",
                    "nonce": nonce,
                    "ciphertext": ct,
                    "createdAt": "2026-11-26T15:00:00Z",
                }
            )
        with trio.fail_after(10):
            for _ in range(5):
                await r1.read()
                await r2.read()
        await broker.wait_for(lambda f: f["type"] == "receipt" and f.get("messageId") == "b-4")
        # Then a marker frame: every receipt sent before it has arrived.
        await _request(sock, "peer.list", refresh=True)
        await broker.wait_for(lambda f: f["type"] == "list_peers" and f is broker.received[-1])
        surfaced = [f["messageId"] for f in broker.received if f["type"] == "receipt"]
        assert sorted(surfaced) == [f"b-{i}" for i in range(5)], surfaced
