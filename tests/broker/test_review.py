"""Review findings: replay and resource bounds, with real clients on loopback."""

from __future__ import annotations

from pathlib import Path

import trio
from cmtest.broker import (
    new_key,
    now_ms,
    open_inproc_broker,
    open_peer,
    session_hello,
    signed_hello,
    wait_until,
)

from claudemesh.shared.protocol import errors, wire


async def test_hello_replay_with_respelled_signature_is_refused(tmp_path: Path) -> None:
    # bytes.fromhex accepts upper case and spaces: the same signature spelled
    # differently must still count as a replay.
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        good = signed_hello(alice)
        async with open_peer(b.url) as p:
            await p.send(good)
            await p.expect(wire.HelloAck)
        fields = {f: getattr(good, f) for f in good.__struct_fields__}
        for sig in (
            good.signature.upper(),
            " ".join(good.signature[i : i + 2] for i in range(0, 128, 2)),
        ):
            replay = wire.Hello(**{**fields, "signature": sig})
            async with open_peer(b.url) as p:
                await p.send(replay)
                err = await p.expect(wire.Error)
                assert err.code == errors.BAD_SIGNATURE
                assert await p.closed() == 1008


async def test_a_recipient_that_does_not_read_cannot_make_the_broker_hold_unbounded_bytes(
    tmp_path: Path,
) -> None:
    # The outgoing queue was bounded in frames only (20,000 frames of up to
    # ~90 KB each): one member that stops reading could pin gigabytes.
    cap = 2 * 1024 * 1024
    async with open_inproc_broker(tmp_path, outgoing_bytes=cap) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        bob = b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as _silent:
            body = b"x" * 40_000
            for _ in range(400):
                ack = await a.dm(bob.pubkey, body)
                assert ack.queued
                held = sum(c.out_bytes for conns in b.broker.member_conns.values() for c in conns)
                assert held <= cap
            await wait_until(lambda: bob.member_id not in b.broker.member_conns)
            assert b.store.db.counts()["pending"] == 400


async def test_a_backlog_flush_stays_within_the_byte_budget(tmp_path: Path) -> None:
    cap = 2 * 1024 * 1024
    async with open_inproc_broker(tmp_path, outgoing_bytes=cap) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        bob = b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            for _ in range(200):
                assert (await a.dm(bob.pubkey, b"y" * 40_000)).queued
        async with open_peer(b.url, bob) as p:
            await trio.sleep(1)
            (conn,) = b.broker.member_conns[bob.member_id]
            assert conn.out_bytes <= cap
            # It stays connected and gets all 200 once it reads.
            got = set()
            while len(got) < 200:
                m = await p.message()
                got.add(m.message_id)
                await p.send(wire.ClientAck(broker_message_id=m.message_id))


async def test_an_ack_by_client_message_id_covers_only_the_push_it_answers(
    tmp_path: Path,
) -> None:
    # Client message ids are chosen by each sender: another member reusing
    # one must not get its row acked (and a false `delivered`) by that ack.
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, carol, bob = (b.member(mesh, n) for n in ("alice", "carol", "bob"))
        async with open_peer(b.url, alice) as a, open_peer(b.url, carol) as c:
            async with open_peer(b.url, bob) as bb:
                first = await a.dm(bob.pubkey, b"from alice", cmid="same")
                second = await c.dm(bob.pubkey, b"from carol", cmid="same")
                p1 = await bb.message()
                p2 = await bb.message()
                assert [p1.message_id, p2.message_id] == [first.message_id, second.message_id]
                await bb.send(wire.ClientAck(client_message_id="same"))
                r = await a.expect(wire.Receipt)
                assert r.state == "delivered"
                await c.expect_none(wire.Receipt, 0.5)
            # carol's row was never acked: bob gets it again
            async with open_peer(b.url, bob) as bb:
                again = await bb.message()
                assert again.message_id == second.message_id


async def test_acks_that_answer_nothing_are_rate_limited(tmp_path: Path) -> None:
    # Acks are exempt from the rate limit so that answering pushes never
    # causes redelivery; acks of nothing were exempt too, and each one is a
    # write in the transaction every peer's sends wait behind.
    async with open_inproc_broker(tmp_path, rate_per_second=5.0, rate_burst=20) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a, open_peer(b.url, bob) as bb:
            # genuine acks of pushes and receipts stay free
            for _ in range(12):
                ack = await a.dm(bob.pubkey, b"hi")
                push = await bb.message()
                await bb.send(wire.ClientAck(broker_message_id=push.message_id))
                r = await a.expect(
                    wire.Receipt, where=lambda r, m=ack.message_id: r.message_id == m
                )
                await a.send(wire.ClientAck(receipt_id=r.receipt_id))
                await trio.sleep(0.25)
            assert not [f for f in a.backlog + bb.backlog if isinstance(f, wire.Error)]
            for i in range(100):
                await bb.send(wire.ClientAck(broker_message_id=f"bogus-{i}"))
                await bb.send(wire.ClientAck(receipt_id=f"bogus-{i}"))
            err = await bb.expect(wire.Error)
            assert err.code == errors.RATE_LIMITED


async def test_connections_that_never_say_hello_are_capped(tmp_path: Path) -> None:
    # No cap counted a connection before its hello: anyone could hold
    # thousands of them (each with a frame buffer) for the hello timeout.
    async with open_inproc_broker(tmp_path, max_handshaking=2) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        async with open_peer(b.url, hello=False), open_peer(b.url, hello=False):
            port = int(b.url.rsplit(":", 1)[1].split("/")[0])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                assert await stream.receive_some(1024) == b""
            await stream.aclose()
        # once they are gone, a peer connects and says hello as usual
        await wait_until(lambda: b.broker.handshaking == 0)
        async with open_peer(b.url, alice) as p:
            assert p.hello_ack is not None
            assert b.broker.handshaking == 0


async def test_a_receipt_id_is_never_read_as_a_client_message_id(tmp_path: Path) -> None:
    async with open_inproc_broker(tmp_path) as b:
        mesh = b.mesh()
        alice, bob = b.member(mesh, "alice"), b.member(mesh, "bob")
        async with open_peer(b.url, alice) as a:
            async with open_peer(b.url, bob) as bb:
                sent = await a.dm(bob.pubkey, b"hi", cmid="x1")
                await bb.message()
                await bb.send(wire.ClientAck(receipt_id="cmid:x1"))
                await a.expect_none(wire.Receipt, 0.5)
            async with open_peer(b.url, bob) as bb:
                assert (await bb.message()).message_id == sent.message_id


async def test_one_connection_cannot_present_unbounded_sessions(tmp_path: Path) -> None:
    from claudemesh.broker import server

    async with open_inproc_broker(tmp_path, rate_per_second=10_000.0) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        async with open_peer(b.url, alice) as p:
            for i in range(server.MAX_SESSIONS_PER_CONN):
                reply = await p.request(session_hello(alice, new_key(), id=f"s{i}"))
                assert isinstance(reply, wire.Ok), reply
            over = await p.request(session_hello(alice, new_key(), id="over"))
            assert isinstance(over, wire.Error)
            assert over.code == errors.TOO_MANY_CONNECTIONS
            long_cwd = await p.request(session_hello(alice, new_key(), id="cwd", cwd="x" * 5000))
            assert isinstance(long_cwd, wire.Error)


async def test_one_member_cannot_join_unbounded_groups(tmp_path: Path) -> None:
    from claudemesh.broker import server

    async with open_inproc_broker(tmp_path, rate_per_second=10_000.0) as b:
        mesh = b.mesh()
        alice = b.member(mesh, "alice")
        async with open_peer(b.url, alice) as p:
            for i in range(server.MAX_GROUPS_PER_CONN):
                await p.send(wire.JoinGroup(name=f"g{i}"))
            await p.request(wire.ListPeers(id="sync"))
            assert not [f for f in p.backlog if isinstance(f, wire.Error)]
            await p.send(wire.JoinGroup(name="one-too-many"))
            err = await p.expect(wire.Error)
            assert err.code == errors.INVALID_FIELD
            # re-joining a group it is in (a role change) is still fine
            await p.send(wire.JoinGroup(name="g0", role="lead"))
            await p.request(wire.ListPeers(id="sync2"))
            assert not [f for f in p.backlog if isinstance(f, wire.Error)]
        assert len(b.store.db.get_member(alice.member_id).groups) == server.MAX_GROUPS_PER_CONN


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: Path) -> None:
    # If COMMIT itself fails, SQLite keeps the transaction open; the next
    # _tx() then took it for a nested one and never committed again, so every
    # later "accepted" row was acked and lost at the next kill -9.
    import sqlite3

    import pytest

    from claudemesh.broker.store import SqliteDB

    db = SqliteDB(tmp_path / "b.db")
    try:

        def orphan_row() -> None:
            with db._tx():
                db.conn.execute("PRAGMA defer_foreign_keys = ON")
                db.conn.execute(
                    "INSERT INTO queue (message_id, member_id, target_pubkey, expires_at)"
                    " VALUES ('no-such-message', 'm', 'k', 0)"
                )

        with pytest.raises(sqlite3.IntegrityError):
            orphan_row()
        assert not db.conn.in_transaction
        mesh, _ = db.create_mesh("m", now=now_ms())
    finally:
        db.close()
    again = SqliteDB(tmp_path / "b.db")
    try:
        assert [m.id for m in again.list_meshes()] == [mesh.id]
    finally:
        again.close()


async def test_endless_empty_fragments_close_the_connection(tmp_path: Path) -> None:
    # Zero-length continuation frames never grew the message size, so one
    # unauthenticated client could grow a fragment list without end.
    import base64
    import os

    async with open_inproc_broker(tmp_path) as b:
        port = int(b.url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        assert b" 101 " in head.split(b"\r\n", 1)[0]
        mask = b"\0\0\0\0"
        first = bytes([0x01, 0x80]) + mask  # text, not final, empty
        empty = bytes([0x00, 0x80]) + mask  # continuation, not final, empty
        closed = False
        with trio.move_on_after(10):
            try:
                await stream.send_all(first)
                for _ in range(200):
                    await stream.send_all(empty * 1000)
                while await stream.receive_some(4096):
                    pass
                closed = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed = True
        assert closed
        await stream.aclose()
